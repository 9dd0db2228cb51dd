"""brainenc: train and compare image-to-fMRI encoding models."""

__version__ = "0.1.0"

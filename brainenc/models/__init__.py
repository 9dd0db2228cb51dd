"""brainenc.models."""

"""brainenc.data."""

"""brainenc.lit."""

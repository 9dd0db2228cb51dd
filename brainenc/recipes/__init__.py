"""brainenc.recipes."""

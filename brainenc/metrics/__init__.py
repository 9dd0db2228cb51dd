"""brainenc.metrics."""

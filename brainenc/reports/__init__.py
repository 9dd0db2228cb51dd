"""brainenc.reports."""

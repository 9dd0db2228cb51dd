"""brainenc.metrics: per-voxel correlation, noise ceilings, ROI summaries, identification."""

from brainenc.metrics.correlation import VoxelPearson, pearson_np, pearson_torch
from brainenc.metrics.noise_ceiling import ceiling_r, estimate_ncsnr, noise_ceiling, normalised_score
from brainenc.metrics.retrieval import identification_accuracy, pattern_correlations
from brainenc.metrics.roi import frac_oracle, roi_summary

__all__ = [
    "VoxelPearson",
    "pearson_np",
    "pearson_torch",
    "noise_ceiling",
    "estimate_ncsnr",
    "normalised_score",
    "ceiling_r",
    "roi_summary",
    "frac_oracle",
    "identification_accuracy",
    "pattern_correlations",
]

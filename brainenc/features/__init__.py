"""Feature caches: frozen-backbone features computed once per stimulus and reused across epochs,
runs and sweep cells (see :mod:`brainenc.features.cache` and docs/performance.md)."""

from .cache import FeatureCache

__all__ = ["FeatureCache"]

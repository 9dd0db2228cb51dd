"""Analyses of trained encoders (e.g. functional maps from learned voxel embeddings)."""

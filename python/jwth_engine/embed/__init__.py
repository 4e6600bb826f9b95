"""Tile embeddings out of the scoring pipeline: `jwth-engine embed` (run.py), the feature kinds and
observers (pipeline/features.py), and tiling with another tool's coordinates (coords.py)."""

"""Tile embeddings out of the scoring pipeline: `jwth-engine embed` (run.py) and tiling with another
tool's coordinates (coords.py); the feature kinds and their batch observer are pipeline/features.py."""

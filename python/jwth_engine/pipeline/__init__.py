"""Tile scoring loops: `run_streaming` (default, overlapped) and `run_sequential` (reference)."""

from .sequential import run_sequential
from .stages import ModelStage, StageTimer
from .streaming import run_streaming

__all__ = ["ModelStage", "StageTimer", "run_sequential", "run_streaming"]

"""Tile scoring loops: `run_streaming` (default, overlapped, bounded memory) and `run_sequential`
(the reference every optimisation is checked against).

`TilePrefetcher` reads a slide's tile batches ahead of the model and can be started on the next
slide while the current one finishes; `plan_reads` / `GridReader` read along the stored tile grid
so each stored tile is decoded once per pass. The measurements behind `jwth-engine bench` live
in `jwth_engine.bench`, above this package.
"""

from .locality import GridReader, ReadPlan, plan_reads
from .prefetch import TileBatch, TilePrefetcher
from .sequential import run_sequential
from .stages import BatchObserver, ModelStage, StageTimer
from .streaming import PipelineStats, run_streaming

__all__ = [
    "BatchObserver", "GridReader", "ModelStage", "PipelineStats", "ReadPlan", "StageTimer", "TileBatch", "TilePrefetcher",
    "plan_reads", "run_sequential", "run_streaming",
]

"""Reference pipeline: read, preprocess, embed and classify one batch after another.

Slow by design (nothing overlaps); the streaming pipeline must produce exactly its results.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..tiling import TileGrid
from .stages import ModelStage, StageTimer, synchronize


def run_sequential(slide, grid: TileGrid, model: ModelStage, *, batch_size: int,
                   progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    timer = StageTimer()
    size = (grid.read_size, grid.read_size)
    out = []
    for start in range(0, len(grid.coords), batch_size):
        coords = grid.coords[start:start + batch_size]
        t = time.perf_counter()
        tiles = np.stack([slide.read_region((int(x), int(y)), grid.level, size) for x, y in coords])
        t = timer.add("decode", t)
        images = model.preprocess(tiles)
        synchronize(model.backend.device)
        t = timer.add("preprocess", t)
        tokens = model.embed(images)
        synchronize(model.backend.device)
        t = timer.add("backbone", t)
        out.append(model.classify(tokens))
        timer.add("head", t)
        if progress:
            progress(len(coords))
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return probs, timer.seconds

"""Streaming pipeline: decode in a background thread while the model runs on earlier batches.

A bounded queue between the reader and the model keeps memory independent of the slide's size
(at most `prefetch` decoded batches exist at once). Errors in the reader are re-raised in the
caller's thread after the reader is joined, so a bad region stops the run cleanly.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np

from ..tiling import TileGrid
from .stages import ModelStage, StageTimer, synchronize

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _reader(slide, grid: TileGrid, batch_size: int, num_workers: int, out: queue.Queue,
            stop: threading.Event, timer: StageTimer) -> None:
    size = (grid.read_size, grid.read_size)
    try:
        for start in range(0, len(grid.coords), batch_size):
            if stop.is_set():
                return
            t = time.perf_counter()
            coords = [(int(x), int(y)) for x, y in grid.coords[start:start + batch_size]]
            tiles = np.stack(list(slide.read_regions(coords, grid.level, size, num_workers=num_workers)))
            timer.add("decode", t)
            while not stop.is_set():
                try:
                    out.put(tiles, timeout=0.1)
                    break
                except queue.Full:
                    continue
        out.put(_DONE)
    except BaseException as exc:  # re-raised in the consumer thread; nothing is swallowed
        out.put(_Failure(exc))


def run_streaming(slide, grid: TileGrid, model: ModelStage, *, batch_size: int,
                  num_workers: int = 2, prefetch: int = 2,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    timer = StageTimer()
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    reader = threading.Thread(target=_reader, name="jwth-reader", daemon=True,
                              args=(slide, grid, batch_size, num_workers, batches, stop, timer))
    reader.start()
    out = []
    try:
        while True:
            item = batches.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.exc
            t = time.perf_counter()
            images = model.preprocess(item)
            synchronize(model.backend.device)
            t = timer.add("preprocess", t)
            tokens = model.embed(images)
            synchronize(model.backend.device)
            t = timer.add("backbone", t)
            out.append(model.classify(tokens))
            timer.add("head", t)
            if progress:
                progress(len(item))
    finally:
        stop.set()
        # Drain so a reader blocked on put() sees the stop flag and exits.
        while reader.is_alive():
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                pass
        reader.join()
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return probs, timer.seconds

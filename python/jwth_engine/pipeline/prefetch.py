"""`TilePrefetcher`: decode a slide's tile batches in a background thread, ahead of the model.

The prefetcher owns everything between the slide file and a batch of uint8 tiles: the read plan
(locality.py), a reader thread, a bounded queue of decoded batches and a fixed pool of batch
buffers (page-locked when the batches go to a GPU, so host-to-device copies are asynchronous).
Memory is bounded by construction: at most `prefetch + 2` batch buffers exist, however large the
slide, and the reader blocks when the model falls behind.

It is usable on its own, which is how the next slide of a screen is read while the current one
finishes:

    nxt = TilePrefetcher(next_slide, next_grid, batch_size=64).start()   # starts decoding now
    ...                                                                # current slide finishes
    probs, seconds = run_streaming(next_slide, next_grid, stage, batch_size=64, prefetcher=nxt)

Batches come out in grid order with the same composition as `run_sequential`'s (tiles
[k*B, (k+1)*B)), which is what makes the two pipelines' scores bitwise equal. A reader error is
delivered in order, after the batches before it; `close()` stops and joins the thread whatever
state it is in.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..config import RuntimeConfig
from .locality import GridReader
from .queues import BoundedQueue, Closed

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BufferPool:
    """A fixed number of [B, R, R, 3] uint8 buffers, allocated on first use, handed out and returned."""

    def __init__(self, count: int, shape: tuple[int, ...], *, pin_memory: bool = False):
        self.count = int(count)
        self.shape = tuple(int(s) for s in shape)
        self.pin_memory = bool(pin_memory)
        self._free: list = []
        self._allocated = 0
        self._cond = threading.Condition()
        self._closed = False
        self.in_use_high_water = 0

    def _allocate(self):
        import torch

        tensor = torch.empty(self.shape, dtype=torch.uint8, pin_memory=self.pin_memory)
        return tensor

    def acquire(self):
        """A free buffer (a CPU torch tensor); blocks while all are in use; Closed after close()."""
        with self._cond:
            while not self._free and self._allocated >= self.count and not self._closed:
                self._cond.wait()
            if self._closed:
                raise Closed("buffer pool")
            if self._free:
                buf = self._free.pop()
            else:
                buf = self._allocate()
                self._allocated += 1
            self.in_use_high_water = max(self.in_use_high_water, self._allocated - len(self._free))
            return buf

    def release(self, buf) -> None:
        with self._cond:
            if not self._closed:
                self._free.append(buf)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()


@dataclass
class TileBatch:
    """Tiles [start, start + n) of the grid; `tiles` is a view into a pooled buffer: call
    `release()` once its pixels have been consumed (copied to the GPU, or preprocessed)."""

    index: int
    start: int
    tiles: object                  # torch.uint8 [n, R, R, 3] on the CPU (pinned when pin_memory)
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def array(self) -> np.ndarray:
        return self.tiles.numpy()

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


@dataclass
class PrefetchStats:
    batches: int = 0
    tiles: int = 0
    decode_s: float = 0.0          # reader thread busy decoding and cutting tiles
    reader_blocked_s: float = 0.0  # reader waiting for a free buffer or queue slot (model-bound: good)
    queue_capacity: int = 0
    queue_high_water: int = 0
    buffers: int = 0
    buffers_high_water: int = 0


class TilePrefetcher:
    """Reads `grid`'s tiles from `slide` in batches of `batch_size`, `prefetch` batches ahead.

    `num_workers` decode threads (inside `Slide.read_regions`); `locality` "auto"/"on"/"off" (see
    locality.py); `pin_memory` for batches bound to a GPU; `nice` lowers the reader threads'
    scheduling priority by that much (Linux; 0 = unchanged), see run_streaming.
    """

    def __init__(self, slide, grid, *, batch_size: int, num_workers: int = RuntimeConfig.num_workers,
                 prefetch: int = 2,
                 locality: str = "auto", pin_memory: bool = False, nice: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.slide, self.grid = slide, grid
        self.batch_size = int(batch_size)
        self.prefetch = int(prefetch)
        self.nice = int(nice)
        self.reader = GridReader(slide, grid, num_workers=num_workers, locality=locality)
        size = grid.read_size
        # Buffers in use at once: `prefetch` queued + 1 being filled + 1 held by the consumer
        # (2 on a GPU, where one is in flight on the copy stream).
        rows = max(1, min(self.batch_size, len(self.reader)))
        self._pool = BufferPool(self.prefetch + 2 + int(pin_memory), (rows, size, size, 3),
                                pin_memory=pin_memory)
        self._queue = BoundedQueue(self.prefetch, "decoded batches")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = False
        self.stats = PrefetchStats(queue_capacity=self.prefetch, buffers=self._pool.count)

    @property
    def num_tiles(self) -> int:
        return len(self.reader)

    @property
    def queue(self) -> BoundedQueue:
        return self._queue

    @property
    def plan(self):
        return self.reader.plan

    @property
    def counters(self):
        return self.reader.counters

    def start(self) -> "TilePrefetcher":
        """Start decoding (idempotent); returns self."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jwth-prefetch", daemon=True)
                self._thread.start()
        return self

    def _run(self) -> None:
        if self.nice > 0 and hasattr(os, "setpriority"):
            try:  # per thread on Linux; threads created from here (decode pools) inherit it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except OSError:
                pass  # not permitted here: run at normal priority
        stats = self.stats
        try:
            for index, start in enumerate(range(0, self.num_tiles, self.batch_size)):
                if self._stop.is_set():
                    return
                t = time.perf_counter()
                try:
                    buf = self._pool.acquire()
                except Closed:
                    return
                t1 = time.perf_counter()
                n = min(self.batch_size, self.num_tiles - start)
                try:
                    self.reader.read_into(start, buf.numpy()[:n])
                except BaseException:
                    self._pool.release(buf)
                    raise
                t2 = time.perf_counter()
                batch = TileBatch(index, start, buf[:n], _release=lambda b=buf: self._pool.release(b))
                ok = self._queue.put(batch)
                t3 = time.perf_counter()
                stats.decode_s += t2 - t1
                stats.reader_blocked_s += (t1 - t) + (t3 - t2)
                if not ok:
                    batch.release()
                    return
                stats.batches += 1
                stats.tiles += n
            self._queue.put(_END)
        except BaseException as exc:  # delivered to the consumer, in order; nothing is swallowed
            self._queue.put(_Failure(exc))
        finally:
            self.reader.close()

    def get(self) -> TileBatch | None:
        """The next batch, None after the last; re-raises the reader's error (then closes)."""
        if self._done:
            return None
        self.start()
        try:
            item = self._queue.get()
        except Closed:
            self._done = True
            return None
        if item is _END:
            self._done = True
            self.close()
            return None
        if isinstance(item, _Failure):
            self._done = True
            self.close()
            raise item.exc
        return item

    def __iter__(self) -> Iterator[TileBatch]:
        while (batch := self.get()) is not None:
            yield batch

    def close(self) -> None:
        """Stop the reader and join it; queued batches are dropped. Safe to call more than once."""
        self._stop.set()
        for item in self._queue.close():
            if isinstance(item, TileBatch):
                item.release()
        self._pool.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.stats.queue_high_water = self._queue.high_water
        self.stats.buffers_high_water = self._pool.in_use_high_water

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "TilePrefetcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

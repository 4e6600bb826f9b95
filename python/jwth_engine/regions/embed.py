"""Streaming region embedding: region blocks are decoded ahead in threads, their tiles flow through the
backbone stage in fixed-size batches (one batch may hold tiles of several regions and magnifications),
and each region's [L, D] sequence is handed to a sink as soon as its last tile is embedded.

    reader thread (+ `num_workers` decode threads)  region -> [L, T, T, 3] uint8     [planning.py]
        |  bounded queue of decoded regions
    main thread   batches of B tiles -> ModelStage.preprocess -> ModelStage.embed -> class token

Memory is bounded by the queue (a couple of batches' worth of regions), the decode window and one
batch: nothing grows with the slide except what the sink keeps. Regions reach the sink in plan order.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from ..config import field_default
from ..pipeline.memory import HeapTrimmer
from ..pipeline.queues import BoundedQueue, Closed
from .planning import RegionPlan, read_region_tiles
from .resample import empty_like_tiles

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


@dataclass
class RegionEmbedStats:
    regions: int = 0
    tiles: int = 0
    batches: int = 0
    decoded_px: int = 0            # level pixels decoded (blocks), what the reader paid for
    wall_s: float = 0.0
    decode_s: float = 0.0          # summed over decode threads
    backbone_s: float = 0.0        # preprocess + backbone in the main thread
    input_wait_s: float = 0.0      # main thread waiting for decoded regions
    queue_capacity: int = 0
    queue_high_water: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def class_token(tokens: torch.Tensor) -> torch.Tensor:
    """The tile feature: the backbone's class token, as float32 [N, D]."""
    return tokens[:, 0].float()


def _reader(slide, plan: RegionPlan, num_workers: int, dest: BoundedQueue, busy: list, blocks) -> None:
    def read(i: int) -> tuple[int, np.ndarray]:
        t = time.perf_counter()
        tiles = read_region_tiles(slide, plan, i, blocks=blocks)
        busy[0] += time.perf_counter() - t   # float += under the GIL: per-thread races only blur a statistic
        return i, tiles

    try:
        workers = max(1, num_workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="jwth-region") as pool:
            window: deque = deque()
            pending = iter(range(len(plan)))
            for i in pending:
                window.append(pool.submit(read, i))
                if len(window) >= 2 * workers:
                    break
            try:
                while window:
                    item = window.popleft().result()
                    nxt = next(pending, None)
                    if nxt is not None:
                        window.append(pool.submit(read, nxt))
                    if not dest.put(item):
                        return
            finally:
                for future in window:
                    future.cancel()
        dest.put(_END)
    except BaseException as exc:  # delivered to the main thread, in order
        dest.put(_Failure(exc))


def embed_regions(slide, plan: RegionPlan, stage, *, batch_size: int, sink: Callable[[int, np.ndarray], None],
                  num_workers: int = field_default("num_workers"), feature: Callable[[torch.Tensor], torch.Tensor] = class_token,
                  progress: Callable[[int], None] | None = None, stats: RegionEmbedStats | None = None,
                  blocks=None) -> RegionEmbedStats:
    """Embed every region of `plan`; `sink(region_index, features [L, D] float32)` in plan order.

    `stage` is a pipeline ModelStage (only its preprocess and embed are used); `blocks` (a
    regions/blocks.BlockSource) reads the level blocks, the slide reader when None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = stats or RegionEmbedStats()
    t_start = time.perf_counter()
    L, T = plan.layout.length, plan.layout.tile_size
    capacity = max(2, math.ceil(2 * batch_size / L))
    queue = BoundedQueue(capacity, "decoded regions")
    busy = [0.0]
    thread = threading.Thread(target=_reader, name="jwth-region-reader", daemon=True,
                              args=(slide, plan, num_workers, queue, busy, blocks))
    batch = None        # uint8 [batch_size, T, T, 3] where the tiles arrive: host, or the GPU they were decoded on
    fill = 0
    owners: list[tuple[int, int, int]] = []    # (region, first slot, count) of the tiles in `batch`
    open_regions: dict[int, np.ndarray] = {}   # region -> [L, D] features being filled
    done_slots: dict[int, int] = {}
    trimmer = HeapTrimmer()

    def run_batch() -> None:
        nonlocal fill, owners
        t = time.perf_counter()
        images = stage.preprocess(batch[:fill])
        feats = feature(stage.embed(images)).cpu().numpy()
        stats.backbone_s += time.perf_counter() - t
        stats.batches += 1
        stats.tiles += fill
        row = 0
        for region, first, count in owners:
            target = open_regions.get(region)
            if target is None:
                target = open_regions[region] = np.empty((L, feats.shape[1]), np.float32)
            target[first:first + count] = feats[row:row + count]
            row += count
            done_slots[region] = done_slots.get(region, 0) + count
            if done_slots[region] == L:
                sink(region, open_regions.pop(region))
                del done_slots[region]
                stats.regions += 1
                if progress:
                    progress(1)
        fill, owners = 0, []
        trimmer.tick()

    thread.start()
    try:
        while True:
            try:
                item = queue.get()
            except Closed:
                break
            if item is _END:
                break
            if isinstance(item, _Failure):
                raise item.exc
            region, tiles = item
            if batch is None:
                batch = empty_like_tiles(tiles, (batch_size, T, T, 3))
            first = 0
            while first < L:
                count = min(L - first, batch_size - fill)
                batch[fill:fill + count] = tiles[first:first + count]
                owners.append((region, first, count))
                fill += count
                first += count
                if fill == batch_size:
                    run_batch()
        if fill:
            run_batch()
    finally:
        queue.close()
        thread.join()
    stats.decoded_px += plan.block_read_px() * stats.regions
    stats.decode_s += busy[0]
    stats.input_wait_s += queue.get_wait_s
    stats.queue_capacity, stats.queue_high_water = capacity, queue.high_water
    stats.wall_s += time.perf_counter() - t_start
    return stats

"""Streaming pipeline: decode, preprocess, backbone and head overlap; memory is bounded.

    reader thread        decode units → cut tiles into pooled (pinned) buffers   [prefetch.py]
        │  bounded queue of decoded batches (`prefetch`)
    GPU: upload thread   H2D copy + fused preprocess on a copy stream
        │  bounded queue of device batches (2), ordered by CUDA events
    main thread          backbone + head on a compute stream; probabilities copied back into
                         pinned memory asynchronously, collected two batches later (no per-batch
                         synchronisation, so the GPU always has the next batch queued)

On the CPU there is no upload thread: the main thread preprocesses (one fused native pass, small
beside the backbone: `bench` times it) and runs the model while the reader decodes the next batches.

Memory: `prefetch + 2` uint8 batch buffers (+1 on a GPU), two device batches and the decode units
the read plan holds (a few stored-tile rows of the tissue's width): nothing grows with the number
of tiles except the [N, C] output. The heap is trimmed every few batches (memory.py), without which
glibc's fragmentation alone grows RSS by ~1 GB over a 100k x 80k slide.

Exactness: batches have the composition of `run_sequential`'s (tiles [k*B, (k+1)*B) in grid order)
and go through the same ModelStage calls, so the probabilities are bitwise equal on the CPU.

Errors: a reader error reaches the caller in order, after the batches before it, once every thread
this function started has been joined; an error in the model stops the reader the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import RuntimeConfig
from ..tiling import TileGrid
from .memory import HeapTrimmer
from .prefetch import TilePrefetcher, _END, _Failure
from .queues import BoundedQueue, Closed
from .stages import ModelStage, StageTimer

GPU_IN_FLIGHT = 2   # batches whose probabilities are still being copied back


@dataclass
class PipelineStats:
    """What one streaming pass did; `run_streaming(..., stats=PipelineStats())` fills it."""

    tiles: int = 0
    batches: int = 0
    wall_s: float = 0.0
    read_plan: dict = field(default_factory=dict)
    decoded_px: int = 0
    needed_px: int = 0
    decode_ratio: float | None = None          # decoded / needed pixels
    decoded_is_estimate: bool = False
    regions_read: int = 0
    max_units_held: int = 0
    queue_capacity: int = 0
    queue_high_water: int = 0
    buffers: int = 0
    buffers_high_water: int = 0
    device_queue_high_water: int = 0
    batch_done_s: list = field(default_factory=list)   # completion time of each batch, from the start

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("batch_done_s")
        return out


def run_streaming(slide, grid: TileGrid, model: ModelStage, *, batch_size: int,
                  num_workers: int = RuntimeConfig.num_workers, prefetch: int = 2,
                  progress: Callable[[int], None] | None = None,
                  locality: str = "auto", prefetcher: TilePrefetcher | None = None,
                  stats: PipelineStats | None = None, nice: int = 0) -> tuple[np.ndarray, dict]:
    """Score every tile of `grid`; returns (probabilities [N, C] float32 in grid order, stage seconds).

    `prefetcher`: a TilePrefetcher already started on this slide and grid (see prefetch.py); it is
    closed on return. `locality`: read plan, see locality.py. `nice`: lower the reader threads'
    priority (Linux) so decoding yields the cores to the backbone on a small CPU.
    """
    t_start = time.perf_counter()
    device = model.backend.device
    on_gpu = device.type == "cuda"
    if prefetcher is None:
        prefetcher = TilePrefetcher(slide, grid, batch_size=batch_size, num_workers=num_workers,
                                    prefetch=prefetch, locality=locality, pin_memory=on_gpu, nice=nice)
    elif prefetcher.slide is not slide or prefetcher.grid is not grid or prefetcher.batch_size != batch_size:
        prefetcher.close()
        raise ValueError("prefetcher was made for another slide, grid or batch size")
    timer = StageTimer()
    done_at: list[float] = []
    device_queue = None
    try:
        prefetcher.start()
        if on_gpu:
            device_queue = BoundedQueue(2, "device batches")
            out = _run_gpu(prefetcher, model, device, device_queue, timer, progress, done_at)
        else:
            out = _run_cpu(prefetcher, model, timer, progress, done_at)
    finally:
        prefetcher.close()
    timer.seconds["decode"] = prefetcher.stats.decode_s
    # Time the model stage sat waiting for input: the part of the wall time decoding did not hide.
    timer.seconds["input_wait"] = (device_queue if device_queue is not None else prefetcher.queue).get_wait_s
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    if stats is not None:
        _fill_stats(stats, prefetcher, device_queue, len(probs), len(out), time.perf_counter() - t_start,
                    [t - t_start for t in done_at])
    return probs, timer.seconds


def _run_cpu(prefetcher: TilePrefetcher, model: ModelStage, timer: StageTimer,
             progress, done_at: list) -> list[np.ndarray]:
    out = []
    trimmer = HeapTrimmer()
    for batch in prefetcher:
        trimmer.tick()
        t = time.perf_counter()
        try:
            images = model.preprocess(batch.tiles)
        finally:
            batch.release()  # preprocess wrote a new tensor; the buffer can be refilled
        t = timer.add("preprocess", t)
        tokens = model.embed(images)
        t = timer.add("backbone", t)
        out.append(model.classify(tokens))
        done_at.append(timer.add("head", t))
        if progress:
            progress(len(batch))
    return out


def _upload(prefetcher: TilePrefetcher, model: ModelStage, device: torch.device,
            copy_stream, dest: BoundedQueue, busy: list) -> None:
    """Upload thread: pinned uint8 batch → device (copy stream) → preprocessed images."""
    try:
        with torch.inference_mode(), torch.cuda.device(device), torch.cuda.stream(copy_stream):
            for batch in prefetcher:
                t = time.perf_counter()
                copied = None
                try:
                    tiles = batch.tiles.to(device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(copy_stream)
                    images = model.preprocess(tiles)
                    ready = torch.cuda.Event()
                    ready.record(copy_stream)
                finally:
                    # The pinned buffer goes back to the reader only once the copy out of it has
                    # run, also when preprocessing failed (the reader would refill it mid-copy).
                    if copied is not None:
                        copied.synchronize()
                    else:
                        copy_stream.synchronize()
                    batch.release()
                busy[0] += time.perf_counter() - t
                if not dest.put((images, ready, len(batch))):
                    return
        dest.put(_END)
    except BaseException as exc:  # delivered to the main thread, in order
        dest.put(_Failure(exc))


def _run_gpu(prefetcher: TilePrefetcher, model: ModelStage, device: torch.device, device_queue: BoundedQueue,
             timer: StageTimer, progress, done_at: list) -> list[np.ndarray]:
    copy_stream = torch.cuda.Stream(device)
    busy = [0.0]
    uploader = threading.Thread(target=_upload, name="jwth-upload", daemon=True,
                                args=(prefetcher, model, device, copy_stream, device_queue, busy))
    uploader.start()
    out: list[np.ndarray] = []
    pending: deque = deque()
    gpu_ms = {"backbone": 0.0, "head": 0.0}

    trimmer = HeapTrimmer()

    def collect() -> None:
        trimmer.tick()
        host, events, n = pending.popleft()
        events[-1].synchronize()
        gpu_ms["backbone"] += events[0].elapsed_time(events[1])
        gpu_ms["head"] += events[1].elapsed_time(events[2])
        # A pageable copy: holding the pinned buffer would keep torch's pinned-memory cache from
        # reusing it, and every batch would pay a fresh cudaHostAlloc.
        out.append(host.numpy().copy())
        done_at.append(time.perf_counter())
        if progress:
            progress(n)

    # A stream of our own for compute: the legacy default stream would serialise with the copy
    # stream (and TensorRT synchronises around it).
    stream = torch.cuda.Stream(device)
    try:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            while True:
                try:
                    item = device_queue.get()
                except Closed:
                    break
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                images, ready, n = item
                stream.wait_event(ready)
                images.record_stream(stream)  # allocated on the copy stream, read on this one
                events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                events[0].record(stream)
                tokens = model.embed(images)
                events[1].record(stream)
                probs = model.probabilities(tokens)
                host = torch.empty(probs.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(probs, non_blocking=True)
                events[2].record(stream)
                pending.append((host, events, n))
                del images, tokens, probs
                while len(pending) > GPU_IN_FLIGHT:
                    collect()
            while pending:
                collect()
    finally:
        for item in device_queue.close():
            pass  # device tensors: freed with the references
        prefetcher.close()   # unblocks an uploader waiting on the reader
        uploader.join()
    timer.seconds["preprocess"] = busy[0]
    timer.seconds["backbone"] = gpu_ms["backbone"] / 1e3
    timer.seconds["head"] = gpu_ms["head"] / 1e3
    return out


def _fill_stats(stats: PipelineStats, prefetcher: TilePrefetcher, device_queue, tiles: int, batches: int,
                wall: float, done_at: list[float]) -> None:
    counters = prefetcher.counters
    ps = prefetcher.stats
    stats.tiles, stats.batches, stats.wall_s = tiles, batches, wall
    stats.read_plan = prefetcher.plan.to_dict()
    stats.decoded_px, stats.needed_px = counters.decoded_px, counters.needed_px
    stats.decode_ratio = counters.decode_ratio
    stats.decoded_is_estimate = counters.decoded_is_estimate
    stats.regions_read = counters.regions
    stats.max_units_held = counters.max_units_held
    stats.queue_capacity, stats.queue_high_water = ps.queue_capacity, ps.queue_high_water
    stats.buffers, stats.buffers_high_water = ps.buffers, ps.buffers_high_water
    stats.device_queue_high_water = device_queue.high_water if device_queue is not None else 0
    stats.batch_done_s = done_at

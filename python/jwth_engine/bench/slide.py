"""Measurements behind `jwth-engine bench SLIDE`: each stage alone, then end to end.

What is timed, on the slide's own tissue tiles (the grid `score` would use):

  decode          the pipeline's reader alone (TilePrefetcher: stored-tile read plan, `num_workers`
                  decode threads), and the same reader one region per tile (locality off)
  openslide       the baseline: OpenSlide `read_region` of the same tiles, one thread, converted
                  to RGB, as TRIDENT / CLAM-style loops do
  preprocess      the fused resize + normalise of one batch, repeated
  backbone        the backend alone on preprocessed batches of the slide's batch sizes
  head            the head alone on one batch of tokens, repeated
  end_to_end      `run_streaming` over the slide (reader, preprocess, backbone, head)
  sequential      `run_sequential` (nothing overlapped), once, and whether its scores equal
                  the streaming pipeline's bit for bit

pipeline efficiency = end-to-end tiles/s ÷ backbone-only tiles/s. Other processes on a shared
machine slow both alike only if they run at the same time, so backbone-only and end-to-end
passes are interleaved (B E B E ... B) and each end-to-end pass is compared with the mean of the
backbone passes on either side; the median of those ratios is reported, with each ratio.

Decode figures count a stored tile once per pass: with cuCIM's own decoded-tile cache, repeated
passes would measure the cache, so `jwth-engine bench` turns it off (JWTH_CUCIM_CACHE_MB=0)
unless the environment sets it; the JSON records the setting.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from typing import Callable

import numpy as np
import torch

from ..config import RunConfig
from ..errors import BackendUnavailable, ConfigError
from ..pipeline import GridReader, ModelStage, PipelineStats, TilePrefetcher, run_sequential, run_streaming
from ..pipeline.stages import synchronize
from ..runtime import library_versions, machine
from ..scoring import load_scoring_model, open_for_scoring
from ..slide.openslide_reader import import_openslide
from ..tiling import plan_tiles
from ..tissue import detect_tissue

BENCH_SCHEMA = "jwth-engine/bench/v1"


# --- memory ----------------------------------------------------------------------------------------

class PeakMemory:
    """Peak resident set size of this process while the block runs (sampled every 10 ms, and the
    kernel's lifetime high-water mark), and peak GPU memory allocated by torch."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self) -> "PeakMemory":
        self.peak_rss = self._rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, name="jwth-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())

    def report(self) -> dict:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
        out = {"peak_rss_mb": round(self.peak_rss / 2**20, 1),
               "process_lifetime_peak_rss_mb": round(lifetime / 2**20, 1)}
        if torch.cuda.is_available():
            out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        else:
            out["peak_gpu_allocated_mb"] = None
        return out


# --- small helpers --------------------------------------------------------------------------------

def latency_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(seconds, np.float64) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _summary(rates: list[float]) -> dict:
    return {"tiles_per_s": round(statistics.median(rates), 2), "passes": [round(r, 2) for r in rates]}


# --- the stages, alone ----------------------------------------------------------------------------

def time_decode(slide, grid, *, batch_size: int, num_workers: int, prefetch: int, locality: str) -> tuple[float, object]:
    """One pass of the reader alone; (seconds, ReadCounters)."""
    prefetcher = TilePrefetcher(slide, grid, batch_size=batch_size, num_workers=num_workers,
                                prefetch=prefetch, locality=locality)
    t = time.perf_counter()
    with prefetcher:
        for batch in prefetcher:
            batch.release()
    return time.perf_counter() - t, prefetcher.counters


def openslide_level(path: str, downsample: float):
    """(OpenSlide handle factory, level) whose downsample matches, or (None, why not)."""
    try:
        openslide = import_openslide()
    except BackendUnavailable as exc:
        return None, str(exc)
    try:
        handle = openslide.OpenSlide(path)
    except openslide.OpenSlideError as exc:
        return None, f"OpenSlide cannot open the slide: {exc}"
    try:
        for level, ds in enumerate(handle.level_downsamples):
            if abs(ds - downsample) <= 0.01 * downsample:
                return (lambda: openslide.OpenSlide(path)), level
        return None, f"OpenSlide has no level with downsample {downsample:g}"
    finally:
        handle.close()


def time_openslide(factory, level: int, coords: np.ndarray, size: int) -> float:
    """Single-thread OpenSlide reads of every tile, as RGB arrays; seconds for one pass (fresh handle)."""
    handle = factory()
    try:
        t = time.perf_counter()
        for x, y in coords:
            region = handle.read_region((int(x), int(y)), level, (size, size))
            np.asarray(region.convert("RGB"))
        return time.perf_counter() - t
    finally:
        handle.close()


def time_repeated(fn: Callable[[], object], device: torch.device, iterations: int) -> list[float]:
    out = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t)
    return out


def time_backbone_pass(stage: ModelStage, images: torch.Tensor, sizes: list[int]) -> list[float]:
    """The backend on batches of the slide's sizes (same composition as a pass over the slide)."""
    device = stage.backend.device
    out = []
    for n in sizes:
        t = time.perf_counter()
        stage.embed(images[:n])
        synchronize(device)
        out.append(time.perf_counter() - t)
    return out


# --- the whole benchmark --------------------------------------------------------------------------

def bench_slide(path: str, config: RunConfig, *, prefetch: int = 2, repeats: int = 3, locality: str = "auto",
                baseline: bool = True, sequential: bool = True, nice: int = 0,
                log: Callable[[str], None] = print) -> dict:
    """Run every measurement on one slide; returns the JSON-ready result (schema BENCH_SCHEMA).
    `config` is the scoring configuration (its aggregation group has no effect here)."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}", field="repeats")
    path = os.fspath(path)
    batch_size, num_workers = config.runtime.batch_size, config.runtime.num_workers
    min_tissue = config.tiling.min_tissue
    result: dict = {"schema": BENCH_SCHEMA, "slide": path,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": machine(), "versions": library_versions("cucim")}
    mem = PeakMemory()
    with mem:
        t0 = time.perf_counter()
        slide, slide_mpp = open_for_scoring(path, config)
        try:
            t_open = time.perf_counter() - t0
            log(f"loading {config.model.model or 'default'} model")
            loaded = load_scoring_model(config, announce=log)
            stage = loaded.stage()
            dev = stage.backend.device
            t = time.perf_counter()
            tissue = detect_tissue(slide, mpp=slide_mpp)
            t_tissue = time.perf_counter() - t
            t = time.perf_counter()
            grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=loaded.target_mpp,
                              tile_size=loaded.tile_size, tissue=tissue, min_tissue=min_tissue)
            t_plan = time.perf_counter() - t
            n = len(grid.coords)
            if n == 0:
                raise ConfigError(f"{path}: no tile reaches min_tissue {min_tissue}; nothing to benchmark",
                                  field="min_tissue")
            sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
            result["config"] = {
                "model": loaded.preset.name, "backend": stage.backend.describe(), "device": str(dev),
                "batch_size": batch_size, "num_workers": num_workers, "prefetch": prefetch,
                "locality": locality, "repeats": repeats, "reader": slide.info.reader,
                "pooling": loaded.head.meta.pooling, "nice": nice,
                "cucim_cache_mb": os.environ.get("JWTH_CUCIM_CACHE_MB", "reader default"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active spinning)"),
            }
            result["grid"] = {"tiles": n, "candidates": grid.num_candidates, "level": grid.level,
                              "read_size": grid.read_size, "tile_size": grid.tile_size,
                              "batches": len(sizes), "min_tissue": min_tissue,
                              "level_dimensions": list(slide.info.level_dimensions[grid.level]),
                              "stored_tile": list(slide.info.level_tile_sizes[grid.level])}
            result["setup_s"] = {"open": round(t_open, 4), "tissue": round(t_tissue, 4), "plan": round(t_plan, 4)}
            log(f"{n} tiles in {len(sizes)} batches of up to {batch_size}")

            result["decode"] = _bench_decode(slide, grid, path, batch_size, num_workers, prefetch, locality,
                                             repeats, baseline, log)

            # One real batch of tiles feeds the isolated model stages.
            first = np.empty((sizes[0], grid.read_size, grid.read_size, 3), np.uint8)
            GridReader(slide, grid, num_workers=num_workers, locality=locality).read_into(0, first)
            result["preprocess"] = _bench_preprocess(stage, first, repeats)
            images = stage.preprocess(first)   # sizes[0] is the largest batch
            tokens = stage.embed(images[:sizes[0]])
            result["head"] = _bench_head(stage, tokens, repeats)

            log("backbone alone and end to end, interleaved")
            result.update(_bench_model_and_e2e(slide, grid, stage, images, sizes, batch_size, num_workers,
                                               prefetch, locality, repeats, nice, log))
            e2e_wall = statistics.median(result["end_to_end"]["wall_s"])
            result["end_to_end"]["slides_per_hour"] = round(3600.0 / (t_open + t_tissue + t_plan + e2e_wall), 2)
            if sequential:
                log("sequential reference")
                t = time.perf_counter()
                ref, _ = run_sequential(slide, grid, stage, batch_size=batch_size)
                t_seq = time.perf_counter() - t
                result["sequential"] = {"tiles_per_s": round(_rate(n, t_seq), 2),
                                        "matches_streaming_bitwise": bool(np.array_equal(ref, result.pop("_probs")))}
            else:
                result.pop("_probs")
        finally:
            slide.close()
    result["memory"] = mem.report()
    bb = result["backbone"]["tiles_per_s"]
    result["summary"] = {
        "tiles": n,
        "end_to_end_tiles_per_s": result["end_to_end"]["tiles_per_s"],
        "backbone_tiles_per_s": bb,
        "pipeline_efficiency": result["pipeline_efficiency"]["median"],
        "decode_tiles_per_s": result["decode"]["pipeline"]["tiles_per_s"],
        "openslide_tiles_per_s": (result["decode"].get("openslide") or {}).get("tiles_per_s"),
        "decode_vs_openslide": result["decode"].get("speedup_vs_openslide"),
        "decoded_to_needed_px": result["decode"]["pipeline"]["decoded_to_needed_px"],
        "slides_per_hour": result["end_to_end"]["slides_per_hour"],
        "peak_rss_mb": result["memory"]["peak_rss_mb"],
        "peak_gpu_allocated_mb": result["memory"]["peak_gpu_allocated_mb"],
    }
    return result


def _bench_decode(slide, grid, path, batch_size, num_workers, prefetch, locality, repeats, baseline, log) -> dict:
    """Reader alone (read plan, then one region per tile) and the OpenSlide baseline, interleaved
    pass by pass so that load from other processes hits them alike; the speedup is the median of
    the per-repeat ratios."""
    n = len(grid.coords)
    modes = [("pipeline", locality)] + ([] if locality == "off" else [("per_tile_regions", "off")])
    rates: dict = {name: [] for name, _ in modes}
    counters: dict = {}
    factory = level = None
    skipped = None
    if baseline:
        factory, level = openslide_level(path, float(slide.info.level_downsamples[grid.level]))
        if factory is None:
            skipped = level
        rates["openslide"] = []
    log("decode alone (pipeline reader, one region per tile, OpenSlide one thread), interleaved")
    # Warm-up pass of each (first use starts decode threads, maps the file, faults in buffers).
    for _, mode in modes:
        time_decode(slide, grid, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch, locality=mode)
    if factory is not None:
        time_openslide(factory, level, grid.coords[:batch_size], grid.read_size)
    for _ in range(repeats):
        for name, mode in modes:
            seconds, counters[name] = time_decode(slide, grid, batch_size=batch_size, num_workers=num_workers,
                                                  prefetch=prefetch, locality=mode)
            rates[name].append(_rate(n, seconds))
        if factory is not None:
            rates["openslide"].append(_rate(n, time_openslide(factory, level, grid.coords, grid.read_size)))
    out: dict = {}
    for name, mode in modes:
        ratio = counters[name].decode_ratio
        out[name] = {**_summary(rates[name]), "read_plan": GridReader(slide, grid, locality=mode).plan.to_dict(),
                     "decoded_to_needed_px": round(ratio, 4) if ratio is not None else None,
                     "decoded_is_estimate": counters[name].decoded_is_estimate,
                     "regions_per_pass": counters[name].regions, "max_units_held": counters[name].max_units_held}
    if baseline and factory is None:
        out["openslide"] = None
        out["openslide_skipped"] = skipped
    elif baseline:
        out["openslide"] = {**_summary(rates["openslide"]), "threads": 1, "level": level}
        ratios = [p / o for p, o in zip(rates["pipeline"], rates["openslide"])]
        out["speedup_vs_openslide"] = round(statistics.median(ratios), 3)
        out["speedup_passes"] = [round(r, 3) for r in ratios]
    return out


def _bench_preprocess(stage: ModelStage, tiles: np.ndarray, repeats: int) -> dict:
    device = stage.backend.device
    tensor = torch.from_numpy(tiles)
    if device.type == "cuda":
        tensor = tensor.to(device)   # the pipeline preprocesses on the GPU after the upload
    stage.preprocess(tensor)
    times = time_repeated(lambda: stage.preprocess(tensor), device, max(10, 5 * repeats))
    return {"tiles_per_s": round(_rate(len(tiles) * len(times), sum(times)), 2), "batch": len(tiles),
            **latency_ms(times)}


def _bench_head(stage: ModelStage, tokens: torch.Tensor, repeats: int) -> dict:
    device = stage.backend.device
    stage.probabilities(tokens)
    times = time_repeated(lambda: stage.probabilities(tokens), device, max(10, 5 * repeats))
    return {"tiles_per_s": round(_rate(tokens.shape[0] * len(times), sum(times)), 2), "batch": int(tokens.shape[0]),
            **latency_ms(times)}


def _bench_model_and_e2e(slide, grid, stage, images, sizes, batch_size, num_workers, prefetch, locality,
                         repeats, nice, log) -> dict:
    n = len(grid.coords)
    device = stage.backend.device
    # Warm-up: first calls allocate, pick kernels, compile.
    for size in sorted(set(sizes)):
        stage.embed(images[:size])
    synchronize(device)
    run_streaming(slide, grid, stage, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch,
                  locality=locality, nice=nice)
    bb_rates, bb_lat, e2e_rates, e2e_walls, e2e_lat, ratios = [], [], [], [], [], []
    stats = probs = seconds = None

    def backbone_pass() -> None:
        times = time_backbone_pass(stage, images, sizes)
        bb_rates.append(_rate(n, sum(times)))
        bb_lat.extend(times)

    backbone_pass()
    for rep in range(repeats):
        stats = PipelineStats()
        t = time.perf_counter()
        probs, seconds = run_streaming(slide, grid, stage, batch_size=batch_size, num_workers=num_workers,
                                       prefetch=prefetch, locality=locality, stats=stats, nice=nice)
        wall = time.perf_counter() - t
        e2e_walls.append(wall)
        e2e_rates.append(_rate(n, wall))
        done = [0.0] + list(stats.batch_done_s)
        e2e_lat.extend(b - a for a, b in zip(done, done[1:]))
        backbone_pass()
        ratios.append(e2e_rates[-1] / ((bb_rates[-2] + bb_rates[-1]) / 2))
        log(f"  pass {rep + 1}: backbone {bb_rates[-1]:.2f} tiles/s, end to end {e2e_rates[-1]:.2f} tiles/s, "
            f"efficiency {ratios[-1]:.3f}")
    return {
        "backbone": {**_summary(bb_rates), **latency_ms(bb_lat)},
        "end_to_end": {**_summary(e2e_rates), **latency_ms(e2e_lat), "wall_s": [round(w, 4) for w in e2e_walls],
                       "latency_note": "interval between consecutive batch completions",
                       "stage_seconds_last_pass": {k: round(v, 4) for k, v in seconds.items()},
                       "pipeline": stats.to_dict()},
        "pipeline_efficiency": {
            "median": round(statistics.median(ratios), 4),
            "passes": [round(r, 4) for r in ratios],
            "of_medians": round(statistics.median(e2e_rates) / statistics.median(bb_rates), 4),
            "definition": "end-to-end tiles/s / backbone-only tiles/s (neighbouring passes)",
        },
        "_probs": probs,
    }


def format_table(result: dict) -> list[str]:
    """Human-readable lines for the terminal."""
    s = result["summary"]
    dec = result["decode"]
    lines = [
        f"slide        {result['slide']}  ({s['tiles']} tiles, {result['grid']['batches']} batches)",
        f"machine      {result['machine']['cpu']} x{result['machine']['usable_cpus']}"
        + (f", {', '.join(result['machine']['gpus'])}" if result["machine"]["gpus"] else ""),
        f"model        {result['config']['model']} on {result['config']['device']} "
        f"({result['config']['backend']['name']} {result['config']['backend']['precision']})",
        "stage                 tiles/s     p50 ms     p99 ms",
    ]

    def row(name, d):
        if not d:
            return
        p50 = d.get("p50_ms")
        p99 = d.get("p99_ms")
        lines.append(f"{name:<20}{d['tiles_per_s']:>9.1f}  {p50 if p50 is not None else '':>9}  "
                     f"{p99 if p99 is not None else '':>9}")

    row("decode (pipeline)", dec["pipeline"])
    row("decode (per tile)", dec.get("per_tile_regions"))
    row("openslide 1 thread", dec.get("openslide"))
    row("preprocess", result["preprocess"])
    row("backbone", result["backbone"])
    row("head", result["head"])
    row("end to end", result["end_to_end"])
    if "sequential" in result:
        row("sequential", result["sequential"])
    lines += [
        f"pipeline efficiency   {s['pipeline_efficiency']:.3f}  (end to end / backbone; passes "
        f"{result['pipeline_efficiency']['passes']})",
        f"decode vs OpenSlide   {s['decode_vs_openslide']}x   decoded/needed pixels {s['decoded_to_needed_px']}",
        f"slides/h {s['slides_per_hour']}   peak RSS {s['peak_rss_mb']} MB   peak GPU {s['peak_gpu_allocated_mb']} MB",
    ]
    if "sequential" in result:
        lines.append(f"streaming == sequential (bitwise): {result['sequential']['matches_streaming_bitwise']}")
    return lines


__all__ = ["BENCH_SCHEMA", "PeakMemory", "bench_slide", "format_table"]

"""`jwth-engine bench SLIDE --pooling both`: the latency JWTH pooling adds over a linear probe.
Above `pipeline/` and `scoring/` like slide.py: it measures them.

Two measurements on the slide's own tissue tiles, with one backbone and two heads (the JWTH head
and a linear probe on the same tokens):

  per batch   one pass over the slide: each batch is decoded, preprocessed and embedded ONCE, then
              both heads run on the same tokens (order alternating batch by batch). Latencies of
              preprocess, backbone, each head, and each configuration's whole batch
              (preprocess + backbone + head), per batch and per tile, p50/p99.
  end to end  `run_streaming` with the JWTH stage and with the probe stage, interleaved
              (J P P J J P ...: the order alternates so drift hits both alike), `repeats` passes
              each. The difference is taken pass pair by pass pair; its noise band is the spread
              (min to max) of those differences, and of the JWTH-vs-JWTH differences between
              consecutive passes, which is what the same configuration differs from itself.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import numpy as np
import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..heads import random_head
from ..heads.native import make_head_runner
from ..pipeline import ModelStage, TilePrefetcher, run_streaming
from ..pipeline.stages import synchronize
from ..runtime import library_versions, machine
from ..scoring import load_scoring_model, open_for_scoring
from ..tiling import plan_tiles
from ..tissue import detect_tissue
from .slide import latency_ms

POOLING_SCHEMA = "jwth-engine/bench-pooling/v1"
CONFIGS = ("jwth", "linear-probe")


def _stat(values: list[float], digits: int = 3) -> dict:
    return {"statistic": f"median of {len(values)}", "median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "values": [round(v, digits) for v in values]}


def per_batch_latency(slide, grid, stages: dict[str, ModelStage], *, batch_size: int, num_workers: int,
                      prefetch: int) -> dict:
    """One pass: each batch through preprocess and the backbone once, then every head on its tokens."""
    first = next(iter(stages.values()))
    device = first.backend.device
    times: dict[str, list[float]] = {"preprocess": [], "backbone": [], **{f"head_{c}": [] for c in stages}}
    sizes: list[int] = []
    with TilePrefetcher(slide, grid, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch,
                        pin_memory=device.type == "cuda") as prefetcher:
        for i, batch in enumerate(prefetcher):
            n = len(batch)
            t = time.perf_counter()
            try:
                tiles = batch.tiles.to(device) if device.type == "cuda" else batch.tiles
                images = first.preprocess(tiles)
                synchronize(device)
            finally:
                batch.release()
            t1 = time.perf_counter()
            tokens = first.embed(images)
            synchronize(device)
            t2 = time.perf_counter()
            times["preprocess"].append(t1 - t)
            times["backbone"].append(t2 - t1)
            order = list(stages) if i % 2 == 0 else list(reversed(stages))
            for name in order:
                t = time.perf_counter()
                stages[name].probabilities(tokens)
                synchronize(device)
                times[f"head_{name}"].append(time.perf_counter() - t)
            sizes.append(n)
    for name in stages:
        times[f"tile_{name}"] = [p + b + h for p, b, h in zip(times["preprocess"], times["backbone"],
                                                               times[f"head_{name}"])]
    per_tile = {k: [s / n for s, n in zip(v, sizes)] for k, v in times.items()}
    out = {"batches": len(sizes), "tiles": int(sum(sizes)),
           "per_batch": {k: latency_ms(v) for k, v in times.items()},
           "per_tile": {k: latency_ms(v) for k, v in per_tile.items()}}
    # Paired difference per batch (same tokens): what the JWTH head costs over the probe.
    if set(CONFIGS) <= set(stages):
        diff = [j - p for j, p in zip(times["head_jwth"], times["head_linear-probe"])]
        share = [(j - p) / t for j, p, t in zip(times["head_jwth"], times["head_linear-probe"],
                                                  times["tile_linear-probe"])]
        out["jwth_minus_probe_per_batch"] = latency_ms(diff)
        out["jwth_minus_probe_share_of_tile"] = {"p50": round(float(np.percentile(share, 50)), 5),
                                                 "p99": round(float(np.percentile(share, 99)), 5),
                                                 "definition": "(head_jwth - head_probe) / tile_probe, per batch"}
    return out


def end_to_end(slide, grid, stages: dict[str, ModelStage], *, batch_size: int, num_workers: int, prefetch: int,
               repeats: int, log: Callable[[str], None]) -> dict:
    n = len(grid.coords)
    device = next(iter(stages.values())).backend.device
    rates: dict[str, list[float]] = {c: [] for c in stages}
    for name, stage in stages.items():   # warm-up of each
        run_streaming(slide, grid, stage, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch)
    synchronize(device)
    names = list(stages)
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else list(reversed(names))):
            t = time.perf_counter()
            run_streaming(slide, grid, stages[name], batch_size=batch_size, num_workers=num_workers,
                          prefetch=prefetch)
            synchronize(device)
            rates[name].append(n / (time.perf_counter() - t))
        log(f"  pass {rep + 1}: " + ", ".join(f"{c} {rates[c][-1]:.1f} tiles/s" for c in names))
    out: dict = {c: _stat(rates[c], 2) for c in names}
    if set(CONFIGS) <= set(stages):
        j, p = rates["jwth"], rates["linear-probe"]
        rel = [(b - a) / b for a, b in zip(j, p)]   # how much slower JWTH is, pass pair by pass pair
        self_noise = [abs(b - a) / a for a, b in zip(j, j[1:])] + [abs(b - a) / a for a, b in zip(p, p[1:])]
        out["jwth_slowdown_vs_probe"] = {**_stat(rel, 4), "definition": "(probe - jwth) / probe tiles/s, per pass pair"}
        out["same_config_pass_to_pass"] = _stat(self_noise, 4) if self_noise else None
        band = max(abs(min(rel)), abs(max(rel)))
        noise = max(self_noise) if self_noise else None
        out["resolvable"] = bool(noise is not None and abs(statistics.median(rel)) > noise)
        out["note"] = ("difference within the pass-to-pass noise: not resolvable" if not out["resolvable"]
                       else "difference exceeds the pass-to-pass noise")
        out["band"] = round(band, 4)
    return out


def bench_pooling(path: str, config: RunConfig, *, prefetch: int = 2, repeats: int = 3,
                  log: Callable[[str], None] = print) -> dict:
    """`config` must describe a JWTH head (pooling jwth, no head file): the probe is built beside it."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}", field="repeats")
    if config.model.head or config.model.pooling not in (None, "jwth"):
        raise ConfigError("--pooling both builds a random JWTH head and a random linear probe itself; "
                          "drop --head", field="pooling")
    batch_size, num_workers = config.runtime.batch_size, config.runtime.num_workers
    min_tissue, seed = config.tiling.min_tissue, config.model.seed
    loaded = load_scoring_model(config, announce=log)
    jwth = loaded.head
    probe = random_head("linear-probe", dim=jwth.meta.dim, num_prefix_tokens=jwth.meta.num_prefix_tokens,
                        classes=list(jwth.meta.classes), num_heads=0, backbone_preset=jwth.meta.backbone_preset,
                        backbone_weights_hash=jwth.meta.backbone_weights_hash, tile_size=loaded.tile_size,
                        target_mpp=loaded.target_mpp, seed=seed)
    dev = loaded.backend.device
    stages = {"jwth": loaded.stage(),
              "linear-probe": ModelStage(loaded.backend, make_head_runner(probe.module).to(dev), loaded.tile_size,
                                         loaded.preset.mean, loaded.preset.std)}
    slide, slide_mpp = open_for_scoring(path, config)
    try:
        tissue = detect_tissue(slide, mpp=slide_mpp)
        grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=loaded.target_mpp, tile_size=loaded.tile_size,
                          tissue=tissue, min_tissue=min_tissue)
        n = len(grid.coords)
        if n == 0:
            raise ConfigError(f"{path}: no tile reaches min_tissue {min_tissue}; nothing to benchmark",
                              field="min_tissue")
        log(f"{n} tiles; per-batch latency of both heads on the same tokens")
        per_batch = per_batch_latency(slide, grid, stages, batch_size=batch_size, num_workers=num_workers,
                                      prefetch=prefetch)
        log("end to end, jwth and linear-probe interleaved")
        e2e = end_to_end(slide, grid, stages, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch,
                         repeats=repeats, log=log)
    finally:
        slide.close()
    return {"schema": POOLING_SCHEMA, "slide": os.fspath(path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(), "versions": library_versions("cucim"),
            "config": {"model": loaded.preset.name, "backend": loaded.backend.describe(), "device": str(dev),
                       "batch_size": batch_size, "num_workers": num_workers, "repeats": repeats,
                       "heads": {"jwth": {"num_heads": jwth.meta.num_heads,
                                          "kernel": getattr(stages["jwth"].head, "kernel_name", "?")},
                                 "linear-probe": {"kernel": getattr(stages["linear-probe"].head, "kernel_name", "?")}},
                       "torch_threads": torch.get_num_threads()},
            "grid": {"tiles": n, "batches": per_batch["batches"], "read_size": grid.read_size, "level": grid.level},
            "per_batch": per_batch, "end_to_end": e2e}


def format_pooling_table(result: dict) -> list[str]:
    pb, e2e = result["per_batch"], result["end_to_end"]
    lines = [f"slide   {result['slide']}  ({result['grid']['tiles']} tiles, {result['grid']['batches']} batches "
             f"of up to {result['config']['batch_size']})",
             f"model   {result['config']['model']} ({result['config']['backend']['name']} "
             f"{result['config']['backend']['precision']} on {result['config']['device']})",
             f"{'':<26}{'jwth':>22}{'linear-probe':>22}{'jwth - probe':>22}",
             f"{'':<26}{'p50 / p99 ms':>22}{'p50 / p99 ms':>22}{'p50 / p99 ms':>22}"]

    def cell(d: dict | None) -> str:
        return f"{d['p50_ms']:.3f} / {d['p99_ms']:.3f}" if d and d.get("p50_ms") is not None else "-"

    for scope in ("per_batch", "per_tile"):
        for what in ("head", "tile"):
            j, p = pb[scope].get(f"{what}_jwth"), pb[scope].get(f"{what}_linear-probe")
            diff = pb.get("jwth_minus_probe_per_batch") if (scope, what) == ("per_batch", "head") else None
            lines.append(f"{(what + ' (' + scope.replace('_', ' ') + ')'):<26}{cell(j):>22}{cell(p):>22}"
                         f"{cell(diff):>22}")
    lines.append(f"{'backbone (per batch)':<26}{cell(pb['per_batch']['backbone']):>22}  (shared)")
    lines.append(f"{'preprocess (per batch)':<26}{cell(pb['per_batch']['preprocess']):>22}  (shared)")
    j, p = e2e["jwth"], e2e["linear-probe"]
    lines.append(f"{'end to end tiles/s':<26}{j['median']:>14.1f} [{j['min']:.0f}-{j['max']:.0f}]"
                 f"{p['median']:>14.1f} [{p['min']:.0f}-{p['max']:.0f}]")
    s = e2e["jwth_slowdown_vs_probe"]
    noise = e2e.get("same_config_pass_to_pass")
    lines.append(f"jwth slower than probe end to end: {100 * s['median']:.2f} % (per pass pair "
                 f"{100 * s['min']:.2f} to {100 * s['max']:.2f} %); same-config pass-to-pass noise up to "
                 f"{100 * noise['max']:.2f} % -> {e2e['note']}" if noise else
                 f"jwth slower than probe end to end: {100 * s['median']:.2f} % (one pass: no noise estimate)")
    share = pb.get("jwth_minus_probe_share_of_tile")
    if share:
        lines.append(f"jwth head's extra cost as a share of a probe tile's latency: p50 {100 * share['p50']:.3f} %")
    return lines


__all__ = ["POOLING_SCHEMA", "bench_pooling", "format_pooling_table"]

"""The plain OpenSlide loop: the baseline the pipeline's feed rate is compared with.

What TRIDENT/CLAM-style extraction does for every tile: `read_region` at the level the tiles are
cut from, convert to RGB, resize to the model's input size (PIL, antialiased bilinear), turn into
a normalised float array. One process per core, each over its own share of the SAME tissue tiles
`jwth-engine score` would read (the grid comes from the engine's tissue detection and tiling), so
the figure is tiles/s per core of a loop with the whole machine to itself.

    python benchmarks/openslide_loop.py SLIDE [--mpp 0.25] [--processes 2] [--passes 3]

Prints one JSON object (tiles/s in total and per core, median of the passes with min/max).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def tile_grid(path: str, *, mpp: float | None, model: str, min_tissue: float) -> dict:
    """The tiles the engine would score: level, read size, tile size and level-0 coordinates."""
    from jwth_engine.config import RunConfig
    from jwth_engine.models import get_preset
    from jwth_engine.scoring import open_for_scoring
    from jwth_engine.tiling import plan_tiles
    from jwth_engine.tissue import detect_tissue

    preset = get_preset(model)
    slide, slide_mpp = open_for_scoring(path, RunConfig.from_kwargs(mpp=mpp))
    try:
        tissue = detect_tissue(slide, mpp=slide_mpp)
        grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=preset.native_mpp, tile_size=preset.input_size,
                          tissue=tissue, min_tissue=min_tissue)
        downsample = float(slide.info.level_downsamples[grid.level])
    finally:
        slide.close()
    return {"level": int(grid.level), "downsample": downsample, "read_size": int(grid.read_size),
            "tile_size": int(grid.tile_size), "coords": np.asarray(grid.coords, np.int64)}


def _openslide_level(handle, downsample: float) -> int:
    for level, ds in enumerate(handle.level_downsamples):
        if abs(ds - downsample) <= 0.01 * downsample:
            return level
    raise SystemExit(f"OpenSlide has no level with downsample {downsample:g}")


def _worker(path: str, coords: np.ndarray, downsample: float, read_size: int, tile_size: int, start, out) -> None:
    import openslide
    from PIL import Image

    handle = openslide.OpenSlide(path)
    level = _openslide_level(handle, downsample)
    start.wait()
    t = time.perf_counter()
    for x, y in coords:
        region = handle.read_region((int(x), int(y)), level, (read_size, read_size)).convert("RGB")
        if read_size != tile_size:
            region = region.resize((tile_size, tile_size), Image.BILINEAR, reducing_gap=None)
        pixels = (np.asarray(region, np.float32) / 255.0 - MEAN) / STD
        del pixels
    out.put(time.perf_counter() - t)
    handle.close()


def run_pass(path: str, grid: dict, processes: int) -> float:
    """Wall seconds for `processes` processes to read every tile once (split evenly)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes + 1), ctx.Queue()
    shares = np.array_split(grid["coords"], processes)
    procs = [ctx.Process(target=_worker, args=(path, share, grid["downsample"], grid["read_size"], grid["tile_size"],
                                               start, out)) for share in shares]
    for p in procs:
        p.start()
    start.wait()
    t = time.perf_counter()
    times = [out.get() for _ in procs]
    wall = time.perf_counter() - t
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"OpenSlide worker failed with exit code {p.exitcode}")
    return max(wall, max(times))


def measure(path: str, *, mpp: float | None = None, model: str = "jwth_vits14_reg4", min_tissue: float = 0.25,
            processes: int | None = None, passes: int = 3, max_tiles: int | None = None) -> dict:
    """`max_tiles`: read an evenly spaced subset of the grid (a slow loop on a large slide)."""
    processes = processes or len(os.sched_getaffinity(0))
    grid = tile_grid(path, mpp=mpp, model=model, min_tissue=min_tissue)
    total = len(grid["coords"])
    if max_tiles and total > max_tiles:
        grid["coords"] = grid["coords"][np.linspace(0, total - 1, max_tiles).round().astype(np.int64)]
    n = len(grid["coords"])
    run_pass(path, {**grid, "coords": grid["coords"][: max(processes, 8 * processes)]}, processes)  # warm-up
    rates = [n / run_pass(path, grid, processes) for _ in range(passes)]
    return {"slide": path, "tiles": n, "grid_tiles": total, "processes": processes, "level": grid["level"], "read_size": grid["read_size"],
            "tile_size": grid["tile_size"], "statistic": f"median of {passes}",
            "tiles_per_s": {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1),
                            "max": round(max(rates), 1), "values": [round(r, 1) for r in rates]},
            "tiles_per_s_per_core": round(statistics.median(rates) / processes, 1),
            "what": "read_region + RGB + PIL bilinear resize to the tile size + normalise, one process per core"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide")
    parser.add_argument("--mpp", type=float, default=None)
    parser.add_argument("--model", default="jwth_vits14_reg4", help="preset whose tile size and MPP cut the grid")
    parser.add_argument("--min-tissue", type=float, default=0.25)
    parser.add_argument("--processes", type=int, default=None, help="default: one per usable core")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--max-tiles", type=int, default=None, help="read an evenly spaced subset of the tiles")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.slide, mpp=args.mpp, model=args.model, min_tissue=args.min_tissue,
                             processes=args.processes, passes=args.passes, max_tiles=args.max_tiles), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

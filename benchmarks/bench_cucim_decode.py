"""cuCIM decode on the GPU vs on the CPU: the same tissue tiles read with `device="cuda"` and `device="cpu"`.

The tiles are the ones `jwth-engine score` would read (engine tissue detection and tiling), one
`read_region` per tile at the grid's level, passes interleaved (CPU, GPU, CPU, GPU ...), median of
--passes with min/max. The GPU figure includes getting the pixels into device memory (what the
pipeline needs); the CPU figure ends with the pixels in host memory.

    python benchmarks/bench_cucim_decode.py SLIDE [--mpp X] --out results/cucim_decode_cuda.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import add_dry_run, dry_run_exit, finish, provenance, spread, write_result  # noqa: E402
from openslide_loop import tile_grid  # noqa: E402


def read_all(image, grid: dict, level: int, device: str) -> float:
    import numpy as np

    t = time.perf_counter()
    for x, y in grid["coords"]:
        region = image.read_region((int(x), int(y)), (grid["read_size"], grid["read_size"]), level, device=device)
        if device == "cuda":
            import cupy

            cupy.asarray(region)
            cupy.cuda.Device().synchronize()
        else:
            np.asarray(region)
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide")
    parser.add_argument("--mpp", type=float, default=None)
    parser.add_argument("--model", default="jwth_vitl14_reg4")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cucim_decode.json")
    add_dry_run(parser)
    args = parser.parse_args(argv)
    dry_run_exit(args)
    from cucim import CuImage

    prov = provenance(argv)
    grid = tile_grid(args.slide, mpp=args.mpp, model=args.model, min_tissue=0.25)
    n = len(grid["coords"])
    image = CuImage(args.slide)
    rates: dict[str, list[float]] = {"cpu": [], "cuda": []}
    for device in rates:     # warm-up: decoder start, GPU context
        read_all(image, {**grid, "coords": grid["coords"][:8]}, grid["level"], device)
    for _ in range(args.passes):
        for device in rates:
            rates[device].append(n / read_all(image, grid, grid["level"], device))
    report = {"benchmark": "cucim_decode", "provenance": finish(prov), "slide": args.slide, "tiles": n,
              "read_size": grid["read_size"], "statistic": f"median of {args.passes} interleaved passes, min/max",
              "tiles_per_s": {d: spread(r, 1) for d, r in rates.items()},
              "gpu_over_cpu": spread([g / c for g, c in zip(rates["cuda"], rates["cpu"])], 3)}
    write_result(args.out, report)
    print({d: report["tiles_per_s"][d]["median"] for d in rates}, "gpu/cpu", report["gpu_over_cpu"]["median"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

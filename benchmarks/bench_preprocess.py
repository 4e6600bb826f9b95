"""Tile preprocessing (resize + normalise, one fused native kernel) on the CPU or a GPU.

uint8 tiles [B, R, R, 3] -> [B, 3, 224, 224] in the backbone's input dtype, for R in --reads
(224: normalise only; 448: a 40x scan read at 20x; 1024: heavy downscaling), B = --batch. The
tiles are already on the device (the pipeline uploads uint8 first). Rows are interleaved pass by
pass; each sample times --calls calls (CPU: perf_counter; GPU: CUDA events behind a sleep kernel
so host launch time is outside them). Reported: tiles/s and GB/s of uint8 input read, median of
--passes with min/max, and the error against the float64 reference on one batch.

    python benchmarks/bench_preprocess.py                   # -> results/preprocess_cpu.json
    python benchmarks/bench_preprocess.py --device cuda     # -> results/preprocess_cuda.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import add_dry_run, dry_run_exit, finish, provenance, spread, write_result  # noqa: E402
from bench_heads import Timer  # noqa: E402

from jwth_engine.preprocess import preprocess, preprocess_reference  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reads", type=int, nargs="+", default=[224, 448, 1024])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--calls", type=int, default=None, help="calls per sample (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--out", type=Path, default=None)
    add_dry_run(parser)
    args = parser.parse_args(argv)
    dry_run_exit(args)
    device = torch.device(args.device)
    dtypes = args.dtypes or (["float32"] if device.type == "cpu" else ["bfloat16"])
    calls = args.calls or (3 if device.type == "cpu" else 20)
    prov = provenance(argv, torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        prov["machine"]["gpu"] = torch.cuda.get_device_name(device)
    timer = Timer(device)
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        for read in args.reads:
            tiles = torch.randint(0, 256, (args.batch, read, read, 3), dtype=torch.uint8, generator=gen).to(device)
            got = preprocess(tiles, args.size, MEAN, STD, dtype=dtype, device=device)
            want = preprocess_reference(tiles.cpu()[:8], args.size, MEAN, STD, dtype=torch.float64)
            err = float((got[:8].double().cpu() - want).norm() / want.norm())
            cases[f"{name}-R{read}"] = {"dtype": name, "read": read, "tiles": tiles, "dtype_t": dtype,
                                        "rel_err_vs_float64_reference": float(f"{err:.3g}"), "samples": []}
    for _ in range(args.passes):
        for case in cases.values():
            fn = (lambda c=case: preprocess(c["tiles"], args.size, MEAN, STD, dtype=c["dtype_t"], device=device))
            case["samples"].append(timer(fn, calls))
    rows = []
    for key, case in cases.items():
        nbytes = case["tiles"].numel()
        rows.append({"case": key, "dtype": case["dtype"], "read": case["read"], "size": args.size,
                     "batch": args.batch, "rel_err_vs_float64_reference": case["rel_err_vs_float64_reference"],
                     "tiles_per_s": spread([args.batch / s for s in case["samples"]], 1),
                     "input_GBps": spread([nbytes / s / 1e9 for s in case["samples"]], 2)})
        t = rows[-1]["tiles_per_s"]
        print(f"{key:>16}: {t['median']:>10.1f} tiles/s [{t['min']:.0f}-{t['max']:.0f}]  "
              f"err {case['rel_err_vs_float64_reference']:.2e}")
    report = {"benchmark": "preprocess", "provenance": finish(prov),
              "statistic": f"median of {args.passes} interleaved passes, min/max; {calls} calls per sample",
              "device": str(device), "rows": rows}
    out = args.out or Path(__file__).resolve().parent / "results" / f"preprocess_{device.type}.json"
    write_result(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""JWTH vs linear probe, latency: `jwth-engine bench SLIDE --pooling both` in a fresh process, with
provenance (see `jwth-engine bench --help` and python/jwth_engine/bench/pooling.py for the method).

    python benchmarks/bench_pooling.py --out benchmarks/results/pooling_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _provenance import add_dry_run, dry_run_exit, finish, log, provenance, write_result  # noqa: E402
from bench_pipeline import DATA, bench, child_env  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", default=str(DATA / "wsi" / "aperio_svs" / "CMU-1-Small-Region.svs"))
    parser.add_argument("--model", default="jwth_vits14_reg4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `jwth-engine bench` options")
    parser.add_argument("--out", default=str(HERE / "results" / "pooling_cpu.json"))
    add_dry_run(parser)
    args = parser.parse_args(argv)
    dry_run_exit(args)
    prov = provenance(argv)

    result = bench(args.slide, ["--model", args.model, "--device", args.device, "--pooling", "both", "--batch-size",
                                str(args.batch_size), "--repeats", str(args.repeats), *args.extra], child_env(), log)
    e2e = result["end_to_end"]
    report = {"benchmark": "pooling", "provenance": finish(prov),
              "statistic": "latency: p50/p99 over the slide's batches (one pass, both heads on the same tokens); "
                           "end to end: median of --repeats interleaved passes per configuration, min/max",
              "summary": {"head_jwth_ms_per_batch": result["per_batch"]["per_batch"]["head_jwth"],
                          "head_probe_ms_per_batch": result["per_batch"]["per_batch"]["head_linear-probe"],
                          "tile_jwth_ms_per_tile": result["per_batch"]["per_tile"]["tile_jwth"],
                          "tile_probe_ms_per_tile": result["per_batch"]["per_tile"]["tile_linear-probe"],
                          "end_to_end_jwth": e2e["jwth"], "end_to_end_probe": e2e["linear-probe"],
                          "jwth_slowdown_vs_probe": e2e["jwth_slowdown_vs_probe"],
                          "same_config_pass_to_pass": e2e["same_config_pass_to_pass"], "resolvable": e2e["resolvable"]},
              "result": result}
    write_result(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

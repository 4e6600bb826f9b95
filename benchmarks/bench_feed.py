"""Feed rate: how many tiles per second, per CPU core, the pipeline can feed a free backbone.

For each slide, in fresh processes (cold caches, the CLI's own environment):

  feed        `jwth-engine bench SLIDE --backbone null`: decode, preprocess and the head run for
              real; the backbone returns fixed tokens of the preset's shape at no cost. End-to-end
              tiles/s over --repeats interleaved passes (median, min, max), divided by the usable
              cores, is the feed rate per core. Its `setup_s` is the per-slide fixed cost: open
              (with the crash-isolation probe), tissue detection, tile planning.
  score       `jwth-engine score SLIDE --backend null`: the same with the outputs written, so the
              fixed cost gets its write time and the total wall time of one slide.
  openslide   benchmarks/openslide_loop.py: a plain OpenSlide loop (read_region, RGB, resize,
              normalise) over the same tiles, one process per core: the baseline per core.

Slides: CMU-1-Small-Region (JPEG), the TCGA JPEG 2000 slide (--mpp 0.25) and a synthetic 40x scan
(0.25 µm/px, generated with synthetic_slide.py) read at 20x (0.5 µm/px): 448 px read per 224 px tile,
4x the pixels per tile. Goal: >= 250 tiles/s per core on the 40x case; the verdict comes from the
spread of the passes ("not resolvable" when it straddles the goal).

`--decode-heavy` adds the case the backbone does not hide: the tiny test backbone on the 40x slide
(`jwth-engine bench`, pipeline efficiency over >= 20 batches).

    python benchmarks/bench_feed.py --out benchmarks/results/feed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _provenance import add_dry_run, dry_run_exit, finish, log, provenance, spread, verdict, write_result  # noqa: E402
from bench_pipeline import DATA, MIN_BATCHES, bench, child_env, cli, run_measured  # noqa: E402

GOAL_PER_CORE_40X = 250.0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def score_null(path: str, extra: list[str], args, log) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rc, wall, rss, stdout, stderr = run_measured(
            cli("score", path, "--model", args.model, "--backend", "null", "--device", "cpu", "--batch-size",
                str(args.batch_size), "--workers", str(args.workers), "--json", "--out", tmp, *extra),
            child_env(), log)
        if rc != 0:
            raise SystemExit(f"score --backend null failed on {path} ({rc}):\n{stderr[-3000:]}")
        summary = json.loads(stdout[stdout.index("{"):])
    return {"process_wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1), "timings_s": summary["timings_s"],
            "tiles": summary["tiles"]["scored"], "throughput": summary["throughput"]}


def feed_case(name: str, path: str, extra: list[str], args, log) -> dict:
    n_cores = cores()
    result = bench(path, ["--model", args.model, "--backbone", "null", "--device", "cpu", "--batch-size",
                          str(args.batch_size), "--workers", str(args.workers), "--repeats", str(args.repeats),
                          "--no-sequential", "--no-baseline", *extra], child_env(), log)
    per_core = spread([r / n_cores for r in result["end_to_end"]["passes"]], 2)
    out = {"name": name, "slide": path, "args": extra, "tiles": result["grid"]["tiles"],
           "batches": result["grid"]["batches"], "read_size": result["grid"]["read_size"],
           "tile_size": result["grid"]["tile_size"], "cores": n_cores,
           "feed_tiles_per_s": spread(result["end_to_end"]["passes"], 2),
           "feed_tiles_per_s_per_core": per_core,
           "fixed_cost_s": result["setup_s"],
           "stages_alone_tiles_per_s": {"decode": result["decode"]["pipeline"]["tiles_per_s"],
                                        "preprocess": result["preprocess"]["tiles_per_s"],
                                        "head": result["head"]["tiles_per_s"]},
           "stage_seconds_last_pass": result["end_to_end"]["stage_seconds_last_pass"],
           "bench_load_average": result["machine"].get("load_average")}
    out["score_with_writes"] = score_null(path, extra, args, log)
    if not args.no_openslide:
        from openslide_loop import measure

        mpp = float(extra[extra.index("--mpp") + 1]) if "--mpp" in extra else None
        loop = measure(path, mpp=mpp, model=args.model, processes=n_cores, passes=args.repeats,
                       max_tiles=args.openslide_tiles)
        out["openslide_loop"] = loop
        out["feed_vs_openslide_loop"] = round(out["feed_tiles_per_s"]["median"] / loop["tiles_per_s"]["median"], 2)
    log(f"{name}: {per_core['median']} tiles/s per core [{per_core['min']}-{per_core['max']}]")
    return out


def decode_heavy(path: str, args, log) -> dict:
    result = bench(path, ["--model", args.tiny_model, "--device", "cpu", "--batch-size", str(args.batch_size),
                          "--workers", str(args.workers), "--repeats", str(args.repeats), "--no-sequential",
                          "--no-baseline"], child_env(), log)
    eff = spread(result["pipeline_efficiency"]["passes"])
    batches = result["grid"]["batches"]
    return {"model": args.tiny_model, "tiles": result["grid"]["tiles"], "batches": batches,
            "end_to_end_tiles_per_s": spread(result["end_to_end"]["passes"], 2),
            "backbone_tiles_per_s": spread(result["backbone"]["passes"], 2),
            "pipeline_efficiency": eff,
            "verdict_vs_0.95": verdict(eff, 0.95) if batches >= MIN_BATCHES
            else f"not reported: {batches} batches < {MIN_BATCHES}",
            "stage_seconds_last_pass": result["end_to_end"]["stage_seconds_last_pass"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="jwth_vitl14_reg4", help="preset whose token shape the null backbone has")
    parser.add_argument("--tiny-model", default="test_tiny_patch14_reg4", help="--decode-heavy: the real tiny backbone")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decode threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["cmu", "tcga", "synthetic40x"],
                        choices=["cmu", "tcga", "synthetic40x"])
    parser.add_argument("--width", type=int, default=30_000, help="synthetic 40x slide, level-0 px")
    parser.add_argument("--height", type=int, default=22_000)
    parser.add_argument("--fraction", type=float, default=0.3, help="synthetic slide's tissue fraction")
    parser.add_argument("--decode-heavy", action="store_true")
    parser.add_argument("--no-openslide", action="store_true")
    parser.add_argument("--openslide-tiles", type=int, default=256,
                        help="the OpenSlide loop reads an evenly spaced subset of at most this many tiles")
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "feed_cpu.json"))
    add_dry_run(parser)
    args = parser.parse_args(argv)
    dry_run_exit(args)
    prov = provenance(argv)

    report: dict = {"benchmark": "feed", "provenance": prov,
                    "statistic": "median of --repeats passes with min/max (per core = tiles/s / usable cores)",
                    "goal": {"synthetic40x_tiles_per_s_per_core": f">= {GOAL_PER_CORE_40X}"}, "cases": []}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        synthetic = Path(tmp) / "synthetic_40x.tiff"
        if "synthetic40x" in args.cases or args.decode_heavy:
            from synthetic_slide import write_slide

            report["synthetic_slide"] = write_slide(synthetic, width=args.width, height=args.height, mpp=0.25,
                                                    fraction=args.fraction, seed=1, log=log)
        cases = {"cmu": ("CMU-1-Small-Region (Aperio JPEG, 20x)",
                         str(DATA / "wsi" / "aperio_svs" / "CMU-1-Small-Region.svs"), []),
                 "tcga": ("TCGA-CR-7395 (Aperio JPEG 2000, --mpp 0.25: a 40x scan read at 20x)",
                          str(DATA / "wsi" / "aperio_svs" / "tcga-cr-7395-01a-01-ts1.svs"), ["--mpp", "0.25"]),
                 "synthetic40x": (f"synthetic {args.width} x {args.height} at 0.25 µm/px (40x) read at 20x",
                                  str(synthetic), [])}
        for key in args.cases:
            name, path, extra = cases[key]
            report["cases"].append(feed_case(name, path, extra, args, log))
        if args.decode_heavy:
            report["decode_heavy"] = decode_heavy(str(synthetic), args, log)
    big = next((c for c in report["cases"] if "synthetic" in c["name"]), None)
    if big is not None:
        report["goal"]["verdict"] = verdict(big["feed_tiles_per_s_per_core"], GOAL_PER_CORE_40X)
    finish(prov)
    write_result(args.out, report)
    for c in report["cases"]:
        pc = c["feed_tiles_per_s_per_core"]
        loop = c.get("openslide_loop", {}).get("tiles_per_s_per_core")
        print(f"{c['name']}: {c['tiles']} tiles ({c['batches']} batches), feed {pc['median']} tiles/s per core "
              f"[{pc['min']}-{pc['max']}], OpenSlide loop {loop} per core; fixed cost {c['fixed_cost_s']} s, "
              f"write {c['score_with_writes']['timings_s'].get('write')} s")
    if "verdict" in report["goal"]:
        print(f"goal >= {GOAL_PER_CORE_40X} tiles/s per core on the 40x case: {report['goal']['verdict']}")
    if "decode_heavy" in report:
        d = report["decode_heavy"]
        print(f"decode-heavy ({d['model']} on the 40x slide, {d['batches']} batches): efficiency "
              f"{d['pipeline_efficiency']['median']} [{d['pipeline_efficiency']['min']}-"
              f"{d['pipeline_efficiency']['max']}] -> {d['verdict_vs_0.95']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the pictures cost: `score` end to end with and without --heatmap --geojson, and with
--attention K (the attention-off path is the plain run: no observer, no attention buffer).

    python benchmarks/bench_visual_outputs.py --model jwth_vits14_reg4 --repeats 5 \
        --out benchmarks/results/visual_outputs_cpu.json

One process, the model loaded once; each repeat scores the slide once per variant (prepare:
open, tissue, tiles; then finish: backbone, head, outputs), in an order rotated every repeat so
that a slow spell of a shared machine does not fall on one variant. Reported per variant: the
median end-to-end seconds and, as the overhead, the median over repeats of (variant / plain of
the same repeat) - 1, with every ratio listed; the plain runs' own spread (max/min - 1) is the
noise floor an overhead must rise above. The time the variant spent in the picture step itself
(`timings_s.visuals`, measured inside the run) is reported too; it is the part that can only be
overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "plain": None,
    "heatmap+geojson": {"heatmap": True, "geojson": True},
    "attention 8": {"attention": 8},
    "report+geojson+attention 8": {"report": True, "geojson": True, "attention": 8},
}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def head_attention_cost(head_runner, tokens, repeats: int = 50) -> dict:
    """The head kernel alone on one batch of the slide's tokens, attention weights off and on,
    interleaved; µs per tile, medians."""
    import torch

    times = {"off": [], "on": []}
    with torch.inference_mode():
        for _ in range(3):
            head_runner(tokens)
            head_runner(tokens, need_attn=True)
        for _ in range(repeats):
            for key, need in (("off", False), ("on", True)):
                t = time.perf_counter()
                head_runner(tokens, need_attn=need)
                times[key].append(time.perf_counter() - t)
    n = tokens.shape[0]
    off, on = statistics.median(times["off"]) / n * 1e6, statistics.median(times["on"]) / n * 1e6
    return {"batch": n, "tokens": list(tokens.shape), "off_us_per_tile": round(off, 3),
            "on_us_per_tile": round(on, 3), "on_over_off": round(on / off, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("JWTH_TEST_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--slide", default=str(data / "wsi" / "aperio_svs" / "CMU-1-Small-Region.svs"))
    parser.add_argument("--model", default="jwth_vits14_reg4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to time ('plain' is always included: the baseline)")
    parser.add_argument("--out", default=None, help="JSON result file (default: print only).")
    args = parser.parse_args()

    from jwth_engine import runtime
    from jwth_engine.config import RunConfig
    from jwth_engine.scoring import SlideScorer
    from jwth_engine.scoring.visuals import VisualOptions

    config = RunConfig.from_kwargs(model=args.model, device=args.device)
    scorer = SlideScorer(config)
    name = Path(args.slide).name.rsplit(".", 1)[0]
    names = ["plain", *[v for v in args.variants if v != "plain"]]
    seconds = {v: [] for v in names}
    visual_seconds = {v: [] for v in names}
    with tempfile.TemporaryDirectory() as tmp:
        def run(variant: str) -> float:
            options = VARIANTS[variant]
            t = time.perf_counter()
            prepared = scorer.prepare(args.slide)
            result = scorer.finish(prepared, out=Path(tmp) / variant.replace(" ", "_"), name=name, started=t,
                                   visuals=VisualOptions(**options) if options else None)
            elapsed = time.perf_counter() - t
            visual_seconds[variant].append(result.summary["timings_s"].get("visuals", 0.0))
            return elapsed

        for variant in names:             # warm-up: first-call costs (allocator, matplotlib import)
            run(variant)
        for v in names:
            visual_seconds[v].clear()
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for variant in order:
                seconds[variant].append(run(variant))
                print(f"repeat {r + 1}/{args.repeats} {variant:<28} {seconds[variant][-1]:.3f} s", file=sys.stderr)

    # One batch of real tokens of this slide for the head-kernel measurement.
    import torch

    prepared = scorer.prepare(args.slide)
    try:
        batch = next(iter(prepared.prefetcher))
        stage = scorer.model.stage()
        with torch.inference_mode():
            tokens = stage.embed(stage.preprocess(batch.tiles))
    finally:
        prepared.close()
    kernel = head_attention_cost(scorer.model.head_runner, tokens.float().contiguous())

    plain = seconds["plain"]
    result = {
        "benchmark": "visual_outputs", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
        "machine": {**runtime.machine(), "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "slide": args.slide, "model": args.model, "device": args.device, "repeats": args.repeats,
        "statistic": "median over repeats; overhead = median of per-repeat (variant / plain) - 1",
        "noise_plain_max_over_min_minus_1": round(max(plain) / min(plain) - 1, 4),
        "head_kernel_attention": kernel,
        "variants": {},
    }
    for variant in names:
        ratios = [s / p for s, p in zip(seconds[variant], plain)]
        result["variants"][variant] = {
            "options": VARIANTS[variant], "seconds": [round(s, 4) for s in seconds[variant]],
            "median_s": round(statistics.median(seconds[variant]), 4),
            "overhead_vs_plain": round(statistics.median(ratios) - 1, 4),
            "ratios_vs_plain": [round(x, 4) for x in ratios],
            "picture_step_median_s": round(statistics.median(visual_seconds[variant]), 4),
            "picture_step_share": round(statistics.median(visual_seconds[variant]) / statistics.median(seconds[variant]), 4),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

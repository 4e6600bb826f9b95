"""Screening throughput (slides/h) over the shared slides: local worker processes vs Ray actors.

    python benchmarks/bench_screen.py --out benchmarks/results/screen_cpu.json

The folder `$JWTH_TEST_DATA/wsi` (default ../shared/data/wsi) is copied `--copies` times into a
temporary folder (distinct names, so every copy is a slide of its own), then screened with the CLI
exactly as a user would: once with `--jobs N` local workers and once on a one-node Ray cluster
started for the purpose on 127.0.0.1 with the same number of CPU workers. Wall time includes
starting the workers (model load), so it is the time a user waits. Throughput counts SCORED slides
only (slides/h, and tiles/s over them); failed slides (the JP2K TCGA slide has no MPP and fails by
design) and no-tissue slides are reported beside it, with the time they took. "Where the time
goes" sums each scored slide's own timings (open, tissue, plan, decode, preprocess, backbone,
head, write) from its summary JSON; the rest of the wall time is worker start-up and the driver.

    python benchmarks/bench_screen.py --copies 13 --backend null --no-ray --out results/screen_null_cpu.json

`--backend null` screens with a free backbone (fixed tokens): what the rest of the pipeline costs
per slide. `--link` symlinks the copies instead of copying (13 copies = 52 slides, no extra disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _provenance import finish, provenance, write_result  # noqa: E402
NOTE = ("Wall time includes starting the workers (torch import, model load) and the driver; slides/h counts "
        "scored slides only (failed and no-tissue slides are listed separately). The machine's load average is "
        "recorded before and after: with other jobs on its cores, compare runs only within their spread.")


def machine() -> dict:
    from jwth_engine import runtime

    return {**runtime.machine(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "versions": runtime.library_versions("ray")}


def copy_slides(data: Path, dest: Path, copies: int, link: bool = False) -> list[str]:
    dest.mkdir(parents=True)
    names = []
    for c in range(copies):
        for slide in sorted((data / "wsi").rglob("*")):
            if slide.is_file():
                target = dest / f"c{c}-{slide.name}"
                if link:
                    target.symlink_to(slide.resolve())
                else:
                    shutil.copy(slide, target)
                names.append(target.name)
    return names


STAGES = ("open", "model_load", "tissue", "plan", "decode", "preprocess", "backbone", "head", "input_wait",
          "scoring_wall", "write", "total")


def ledger_stats(out: Path) -> dict:
    """Scored, no-tissue and failed slides (with their seconds), tiles scored, and the sum of each
    scored slide's stage timings (from its summary JSON)."""
    with sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT slide_id, status, seconds, result FROM slides").fetchall()
    scored, no_tissue, failed = [], [], []
    tiles = 0
    stages = dict.fromkeys(STAGES, 0.0)
    for slide_id, status, seconds, result in rows:
        if status == "failed":
            failed.append(seconds or 0.0)
            continue
        if status != "done":
            continue
        result = json.loads(result or "{}")
        if result.get("result") != "scored":
            no_tissue.append(seconds or 0.0)
            continue
        scored.append(seconds or 0.0)
        tiles += int(result.get("tiles_scored") or 0)
        for summary in (out / "slides" / slide_id).glob("*.summary.json"):
            for key, value in json.loads(summary.read_text()).get("timings_s", {}).items():
                if key in stages:
                    stages[key] += float(value)
    return {"scored": len(scored), "no_tissue": len(no_tissue), "failed": len(failed), "tiles_scored": tiles,
            "seconds_scored": round(sum(scored), 2), "seconds_no_tissue": round(sum(no_tissue), 2),
            "seconds_failed": round(sum(failed), 2),
            "stage_seconds_scored_slides": {k: round(v, 2) for k, v in stages.items()}}


def screen(cli: list[str], src: Path, out: Path, extra: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([*cli, "screen", str(src), "--out", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise SystemExit(f"screen failed ({proc.returncode}):\n{proc.stderr}")
    stats = ledger_stats(out)
    return {"wall_s": round(wall, 2), **stats,
            "scored_slides_per_hour": round(stats["scored"] / wall * 3600, 1),
            "tiles_per_s_over_scored": round(stats["tiles_scored"] / wall, 2),
            "summary_line": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else None}


def start_ray(cpus: int) -> tuple[str, int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="jwth-ray-", dir="/tmp")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false",
         "--disable-usage-stats", "--object-store-memory=150000000", f"--temp-dir={temp_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        raise SystemExit(f"ray start failed:\n{output}")
    return f"127.0.0.1:{port}", proc.pid, temp_dir


def stop_ray(session: int, temp_dir: str) -> None:
    """Kill the processes of our cluster only (`ray stop` would stop every cluster on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == session:
                        os.kill(int(entry), sig)
                except (ProcessLookupError, PermissionError):
                    continue
        time.sleep(2)
    shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("JWTH_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--model", action="append", default=None,
                        help="backbone preset; repeat for several (default: test_tiny_patch14_reg4)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="auto", help="null: a free backbone (what the rest costs)")
    parser.add_argument("--link", action="store_true", help="symlink the copies instead of copying them")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "screen_cpu.json")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    cli = [sys.executable, "-m", "jwth_engine.cli"]
    models = args.model or ["test_tiny_patch14_reg4"]
    results = {"benchmark": "bench_screen", "provenance": provenance(),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "precision": args.precision, "backend": args.backend, "note": NOTE,
               "statistic": "one screening run per row (wall time of the CLI process)", "runs": {}}
    with tempfile.TemporaryDirectory(prefix="jwth-bench-screen-") as tmp:
        tmp = Path(tmp)
        names = copy_slides(args.data, tmp / "slides", args.copies, link=args.link)
        results["slides"] = len(names)
        results["source"] = f"{args.data / 'wsi'} copied {args.copies}x ({len(names)} slides)"
        for model in models:
            options = ["--model", model, "--precision", args.precision, "--backend", args.backend,
                       "--device", "cpu", "--batch-size", "32",
                       "--workers", "1", "--slide-timeout", "1800", "--no-progress"]
            runs = results["runs"][model] = {"command_options": options}
            for jobs in sorted({1, args.jobs}):
                key = f"local_jobs{jobs}"
                runs[key] = screen(cli, tmp / "slides", tmp / f"{model}-{key}", [*options, "--jobs", str(jobs)])
                print(model, key, runs[key], flush=True)
            if not args.no_ray:
                address, session, temp_dir = start_ray(args.jobs)
                try:
                    key = f"ray_{args.jobs}_cpu_actors"
                    runs[key] = screen(cli, tmp / "slides", tmp / f"{model}-{key}",
                                       [*options, "--ray-address", address, "--jobs", str(args.jobs)])
                    print(model, key, runs[key], flush=True)
                finally:
                    stop_ray(session, temp_dir)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finish(results["provenance"])
    write_result(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Screening throughput (slides/h) over the shared slides: local worker processes vs Ray actors.

    python benchmarks/bench_screen.py --out benchmarks/results/screen_cpu.json

The folder `$JWTH_TEST_DATA/wsi` (default ../shared/data/wsi) is copied `--copies` times into a
temporary folder (distinct names, so every copy is a slide of its own), then screened with the CLI
exactly as a user would: once with `--jobs N` local workers and once on a one-node Ray cluster
started for the purpose on 127.0.0.1 with the same number of CPU workers. Wall time includes
starting the workers (model load), so it is the time a user waits. slides/h counts every finished
slide (the JP2K TCGA slide has no MPP and fails in well under a second, as it would in a real run).
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
NOTE = ("Wall time includes starting the workers (torch import, model load) and the driver; slides/h counts "
        "done + failed slides. The machine's load average is recorded before and after: with other jobs on "
        "its cores, differences of ~20% between runs are noise.")


def machine() -> dict:
    from jwth_engine import runtime

    return {**runtime.machine(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "versions": runtime.library_versions("ray")}


def copy_slides(data: Path, dest: Path, copies: int) -> list[str]:
    dest.mkdir(parents=True)
    names = []
    for c in range(copies):
        for slide in sorted((data / "wsi").rglob("*")):
            if slide.is_file():
                target = dest / f"c{c}-{slide.name}"
                shutil.copy(slide, target)
                names.append(target.name)
    return names


def ledger_stats(out: Path) -> dict:
    with sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT status, seconds FROM slides").fetchall()
    done = [s for status, s in rows if status == "done"]
    return {"done": len(done), "failed": sum(1 for status, _ in rows if status == "failed"),
            "slide_seconds_done": round(sum(s or 0 for s in done), 2)}


def screen(cli: list[str], src: Path, out: Path, extra: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([*cli, "screen", str(src), "--out", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise SystemExit(f"screen failed ({proc.returncode}):\n{proc.stderr}")
    stats = ledger_stats(out)
    finished = stats["done"] + stats["failed"]
    return {"wall_s": round(wall, 2), **stats, "slides_per_hour": round(finished / wall * 3600, 1)}


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
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "screen_cpu.json")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    cli = [sys.executable, "-m", "jwth_engine.cli"]
    models = args.model or ["test_tiny_patch14_reg4"]
    results = {"benchmark": "bench_screen", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "precision": args.precision, "note": NOTE, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="jwth-bench-screen-") as tmp:
        tmp = Path(tmp)
        names = copy_slides(args.data, tmp / "slides", args.copies)
        results["slides"] = len(names)
        results["source"] = f"{args.data / 'wsi'} copied {args.copies}x ({len(names)} slides)"
        for model in models:
            options = ["--model", model, "--precision", args.precision, "--device", "cpu", "--batch-size", "32",
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

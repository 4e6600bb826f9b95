"""Cost of the crash-isolated cuCIM probe per start method: the warm probe server (forkserver,
the default: first call, then warm calls) and a fresh interpreter per probe (spawn).

    python benchmarks/probe_start.py SLIDE [--repeats N] [--json results/probe_start.json]

The old default, a fork of the calling process, is not offered any more (unsafe from a threaded
caller); its cost was a fork of the caller plus cuCIM's open.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("slide")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from jwth_engine.slide.probe import probe_slide

    t = time.perf_counter()
    assert probe_slide(args.slide, method="forkserver").ok
    first = time.perf_counter() - t
    warm, spawn = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        assert probe_slide(args.slide, method="forkserver").ok
        warm.append(time.perf_counter() - t)
    for _ in range(max(3, args.repeats // 5)):
        t = time.perf_counter()
        assert probe_slide(args.slide, method="spawn").ok
        spawn.append(time.perf_counter() - t)
    result = {
        "schema": "jwth-engine/probe-start/v1",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "statistic": "median seconds per probe (min, max)",
        "forkserver_first_call_s": round(first, 4),
        "forkserver_warm_s": [round(statistics.median(warm), 4), round(min(warm), 4), round(max(warm), 4)],
        "spawn_s": [round(statistics.median(spawn), 4), round(min(spawn), 4), round(max(spawn), 4)],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Provenance of every benchmark result: where it ran, from which tree, by which command, and how
the figures were reduced. One helper for all scripts in benchmarks/, so that a result file can
always be traced back to the code and the invocation that produced it.

    from _provenance import provenance, spread, write_result
    report = {"provenance": provenance(), ...}
    report["x"] = spread(samples)            # {"statistic": "median of 5", "median", "min", "max", ...}
    write_result(path, report)               # atomic: temp file, fsync, rename

A figure in a README table or a runtime string must come from such a file; `spread` is also what
decides whether a goal is resolvable (`verdict`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from jwth_engine.runtime import cpu_model  # one machine probe (runtime.py)

REPO = Path(__file__).resolve().parents[1]
_DISTS = ("jwth-engine", "torch", "timm", "numpy", "onnxruntime", "cucim-cu13", "cucim-cu12", "openslide-python",
          "openslide-bin", "ray")


def git_state(repo: Path = REPO) -> dict:
    """{"commit", "dirty", "describe"}; commit None outside a git checkout (an installed copy)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in _DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def command(argv: list[str] | None = None) -> str:
    """The exact command, runnable from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    return shlex.join([Path(sys.executable).name, *argv])


def provenance(argv: list[str] | None = None, **extra) -> dict:
    """Everything a result needs to be traced: git commit (and whether the tree was dirty), the
    command, the time, the machine (with its load average now: the machine is shared) and versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "git": git_state(),
        "command": command(argv),
        "cwd": os.getcwd(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
                    "platform": platform.platform(), "load_average_start": load_average()},
        "versions": versions(),
    }
    out.update(extra)
    return out


def finish(prov: dict) -> dict:
    """Record the load average at the end (a result measured under load says so)."""
    prov["machine"]["load_average_end"] = load_average()
    return prov


def spread(values: list[float], digits: int = 4) -> dict:
    """Median of N with min and max, and the relative spread (max - min) / median."""
    values = [float(v) for v in values]
    if not values:
        return {"statistic": "median of 0", "median": None, "min": None, "max": None, "values": []}
    med = statistics.median(values)
    return {"statistic": f"median of {len(values)}", "median": round(med, digits), "min": round(min(values), digits),
            "max": round(max(values), digits),
            "rel_spread": round((max(values) - min(values)) / abs(med), 4) if med else None,
            "values": [round(v, digits) for v in values]}


def rotation(names: list, p: int) -> list:
    """The order of the arms in pass `p`: each arm takes each place in turn, so that no arm always
    runs right after the same other one (whatever one arm leaves behind, e.g. a thread pool still
    spinning, falls on every arm alike)."""
    shift = p % len(names)
    return list(names[shift:]) + list(names[:shift])


def verdict(stat: dict, goal: float, higher_is_better: bool = True) -> str:
    """"met" / "not met" when every pass lies on one side of the goal, else "not resolvable":
    the spread of the passes reaches across the goal, so the noise exceeds the distance to it."""
    lo, hi = stat["min"], stat["max"]
    if lo is None:
        return "not measured"
    if higher_is_better:
        return "met" if lo >= goal else ("not met" if hi < goal else "not resolvable")
    return "met" if hi <= goal else ("not met" if lo > goal else "not resolvable")


def write_result(path: str | os.PathLike, data: dict) -> Path:
    """Atomic JSON write (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def add_dry_run(parser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="parse the arguments, print what would run, write nothing (gpu_check.sh --dry-run)")


def dry_run_exit(args) -> None:
    """With --dry-run: the arguments parsed (so every flag a caller uses still exists); exit 0."""
    if getattr(args, "dry_run", False):
        shown = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dry_run"}
        print(f"dry run: {Path(sys.argv[0]).name} {json.dumps(shown, default=str)}")
        raise SystemExit(0)


def log(message: str) -> None:
    """Progress lines go to stderr, so that stdout stays the result."""
    print(message, file=sys.stderr, flush=True)

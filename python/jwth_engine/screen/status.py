"""`jwth-engine screen-status DIR`: the ledger, read-only (safe while a run is writing it)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from .config import IDENTITY_KEYS
from .layout import ScreenLayout
from .ledger import Ledger
from .progress import format_duration


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def collect_status(out: str | Path) -> dict:
    layout = ScreenLayout(out)
    with Ledger(layout.ledger, readonly=True) as ledger:
        config_hash, config = ledger.config()
        slides = ledger.slides()
        runs = ledger.runs()
    running_run = next((r for r in reversed(runs) if r["state"] == "running"), None)
    status = {
        "folder": str(layout.root),
        "config_hash": config_hash,
        "config": config,
        "counts": {s: sum(1 for r in slides if r.status == s) for s in ("pending", "running", "done", "failed")},
        "total": len(slides),
        "runs": [{**r, "started": _iso(r["started"]), "finished": _iso(r["finished"])} for r in runs],
        "live": running_run is not None and _lock_held(layout),
        "slides": [
            {"slide_id": r.slide_id, "path": r.path, "status": r.status, "attempts": r.attempts,
             "error_kind": r.error_kind, "error": r.error, "note": r.note, "worker": r.worker,
             "seconds": r.seconds, "started": _iso(r.started_at), "finished": _iso(r.finished_at),
             "config_hash": r.config_hash}
            for r in slides
        ],
    }
    finished = [r for r in slides if r.status in ("done", "failed") and r.finished_at]
    if running_run and finished:
        recent = [r for r in finished if r.finished_at >= running_run["started"]]
        elapsed = time.time() - running_run["started"]
        status["slides_per_hour"] = len(recent) / elapsed * 3600 if recent and elapsed > 0 else None
    return status


def _lock_held(layout: ScreenLayout) -> bool:
    import fcntl
    import os

    lock = layout.root / ".lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def render_status(status: dict, *, show_all: bool = False) -> str:
    counts = status["counts"]
    lines = [f"{status['folder']}: {status['total']} slides — done {counts['done']}, failed {counts['failed']}, "
             f"running {counts['running']}, pending {counts['pending']}"
             + ("  (a run is active)" if status["live"] else "")]
    if status.get("slides_per_hour"):
        lines.append(f"current run: {status['slides_per_hour']:.1f} slides/h")
    config = status.get("config") or {}
    if config:
        shown = ", ".join(f"{k}={_short(config.get(k))}" for k in IDENTITY_KEYS if config.get(k) is not None)
        lines.append(f"configuration {status['config_hash']}: {shown}")
    if status["runs"]:
        last = status["runs"][-1]
        lines.append(f"runs: {len(status['runs'])}; last #{last['run_id']} {last['state']} "
                     f"({last['runner']}, {last['workers']} workers, started {last['started']})")
    for row in status["slides"]:
        if row["status"] == "failed":
            lines.append(f"  FAILED   {row['slide_id']}: [{row['error_kind']}] {row['error']}")
        elif row["status"] == "running":
            lines.append(f"  running  {row['slide_id']} on {row['worker']}")
        elif show_all:
            extra = f"  {format_duration(row['seconds'])}" if row["seconds"] else ""
            lines.append(f"  {row['status']:<8} {row['slide_id']}{extra}" + (f"  ({row['note']})" if row["note"] else ""))
    return "\n".join(lines)


def _short(value):
    return value[:12] if isinstance(value, str) and len(value) == 64 else value

"""One slide's outputs, `NAME.tiles.parquet` and `NAME.summary.json`, as one consistent unit.

Two files cannot be replaced in one atomic step, so the pair is committed like a tiny journal:

1. the Parquet is written (atomically) under a pending name, `.jwth-pending-NAME.tiles.parquet`;
2. the summary, which records the Parquet's sha256, is written under its pending name: from this
   moment the new pair is decided;
3. the pending Parquet is renamed into place, then the pending summary (the summary last).

A kill before step 2 leaves only a pending Parquet: the old pair is untouched and the pending file
is dropped by the next run. A kill after step 2 leaves a decided commit: the next run of the same
slide rolls it forward (`recover_slide_outputs`) before it scores anything. In between, a reader
may see a new Parquet beside the old summary; `load_slide_outputs` therefore checks the Parquet
against the checksum in the summary and, when a decided commit is pending, reads that instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DiskFull, OutputError
from .atomic import atomic_path, atomic_write_bytes, fsync_dir, is_disk_full, sha256_file

PENDING_PREFIX = ".jwth-pending-"


def slide_output_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{name}.tiles.parquet", out / f"{name}.summary.json"


def _pending(path: Path) -> Path:
    return path.with_name(PENDING_PREFIX + path.name)


def _disk_full(out_dir: Path, what: str, exc: OSError) -> DiskFull:
    return DiskFull(f"{out_dir}: no space left on the device while writing {what} ({exc.strerror}); "
                       f"the previous outputs are unchanged; free space and run again")


class SlideOutputWriter:
    """`write_tiles(table)` (returns the summary's "outputs" record), then `commit(summary)`."""

    def __init__(self, out_dir: str | os.PathLike, name: str):
        self.out_dir = Path(out_dir)
        self.tiles_path, self.summary_path = slide_output_paths(out_dir, name)
        self._tiles_sha256: str | None = None

    def write_tiles(self, table: pa.Table) -> dict:
        pending = _pending(self.tiles_path)
        try:
            with atomic_path(pending) as tmp:
                pq.write_table(table, tmp, compression="zstd")
        except OSError as exc:
            if is_disk_full(exc):
                raise _disk_full(self.out_dir, self.tiles_path.name, exc) from exc
            raise
        self._tiles_sha256 = sha256_file(pending)
        return {"tiles_parquet": self.tiles_path.name, "tiles_parquet_sha256": self._tiles_sha256}

    def commit(self, summary: dict) -> None:
        recorded = summary.get("outputs", {}).get("tiles_parquet_sha256")
        if self._tiles_sha256 is None or recorded != self._tiles_sha256:
            raise ValueError("commit(summary) needs the record write_tiles returned in summary['outputs']")
        pending_tiles, pending_summary = _pending(self.tiles_path), _pending(self.summary_path)
        try:
            atomic_write_bytes(pending_summary, (json.dumps(summary, indent=2) + "\n").encode())
        except OSError as exc:
            pending_tiles.unlink(missing_ok=True)     # not decided: the old pair stays
            if is_disk_full(exc):
                raise _disk_full(self.out_dir, self.summary_path.name, exc) from exc
            raise
        # Decided. Renames need no space, so from here a full disk cannot stop the commit.
        os.replace(pending_tiles, self.tiles_path)
        os.replace(pending_summary, self.summary_path)
        fsync_dir(self.out_dir)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return None       # a pending summary is written atomically: unreadable means foreign


def _recorded_sha(summary: dict | None) -> str | None:
    return (summary or {}).get("outputs", {}).get("tiles_parquet_sha256")


def recover_slide_outputs(out_dir: str | os.PathLike, name: str) -> str | None:
    """Finish or drop what a killed commit of slide `name` left in `out_dir`; returns what was done
    (None when there was nothing to do). Call before scoring the slide again."""
    tiles, summary = slide_output_paths(out_dir, name)
    pending_tiles, pending_summary = _pending(tiles), _pending(summary)
    if not pending_summary.exists():
        if pending_tiles.exists():
            pending_tiles.unlink()
            return f"{name}: dropped the tiles of an interrupted run that never finished"
        return None
    expected = _recorded_sha(_read_json(pending_summary))
    if pending_tiles.exists() and expected and sha256_file(pending_tiles) == expected:
        os.replace(pending_tiles, tiles)
    if expected and tiles.is_file() and sha256_file(tiles) == expected:
        os.replace(pending_summary, summary)
        fsync_dir(Path(out_dir))
        return f"{name}: finished committing the outputs of an interrupted run"
    pending_summary.unlink()
    pending_tiles.unlink(missing_ok=True)
    return f"{name}: dropped an interrupted run's outputs whose tiles were lost"


@dataclass
class SlideOutputs:
    summary: dict
    tiles: pa.Table
    summary_path: Path
    tiles_path: Path


def verify_slide_outputs(out_dir: str | os.PathLike, name: str) -> str | None:
    """None when `name`'s summary and Parquet in `out_dir` belong together, else the problem."""
    try:
        _load(Path(out_dir), name, parse=False)
    except OutputError as exc:
        return str(exc)
    return None


def load_slide_outputs(out_dir: str | os.PathLike, name: str) -> SlideOutputs:
    """The summary and the per-tile table of slide `name`, checked to belong together (the
    Parquet's sha256 is the one the summary records). Raises OutputError naming the file and the
    problem when they are missing or do not match."""
    return _load(Path(out_dir), name, parse=True)


def _load(out_dir: Path, name: str, *, parse: bool) -> SlideOutputs:
    tiles_path, summary_path = slide_output_paths(out_dir, name)
    # A committing writer renames the Parquet, then the summary; read the summary, then the
    # Parquet, and when they disagree look at the decided commit in flight (if any) once more.
    for _ in range(3):
        summary = _read_json(summary_path)
        data = _read_bytes(tiles_path)
        if summary is not None and data is not None and _sha(data) == _recorded_sha(summary):
            break
        pending = _read_json(_pending(summary_path))
        if pending is not None and data is not None and _sha(data) == _recorded_sha(pending):
            summary = pending
            break
    else:
        if summary is None:
            raise OutputError(f"{summary_path}: missing or unreadable (the slide was not scored into "
                              f"{out_dir}, or its run did not finish)")
        if data is None:
            raise OutputError(f"{tiles_path}: missing (its summary lists it)")
        if _recorded_sha(summary) is None:
            raise OutputError(f"{summary_path}: records no tiles Parquet checksum")
        raise OutputError(f"{tiles_path}: does not match the checksum in {summary_path.name} (an "
                          f"interrupted or foreign write); score the slide again")
    table = pq.read_table(pa.BufferReader(data)) if parse else None
    return SlideOutputs(summary, table, summary_path, tiles_path)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

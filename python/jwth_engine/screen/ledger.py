"""The screening ledger: one SQLite database per output folder, written only by the driver.

It is the single source of truth for what a run has done: each slide's state (pending, running,
done, failed), attempts, the cause of a failure, timings, the checksums of its outputs and the
configuration it was scored with. WAL mode, `synchronous=FULL` and one short transaction per state
change mean a kill -9 at any moment loses at most the change being made, and a concurrent reader
(`screen-status`) never blocks the run.

A slide becomes `done` in two steps (see `layout.publish`): first its checksums and result are
recorded while it is still `running` (`phase = 'staged'`), then its staging folder is moved into
place and it is marked done. `recover()` finishes or undoes whatever a killed run left half-way.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ConfigError, DiskFull
from .sources import SlideSource

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    started     REAL NOT NULL,
    finished    REAL,
    state       TEXT NOT NULL,          -- running | finished | interrupted (or killed: left running)
    config_hash TEXT NOT NULL,
    runner      TEXT NOT NULL,          -- local | ray
    workers     INTEGER,
    host        TEXT,
    pid         INTEGER,
    argv        TEXT,
    done        INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS slides (
    slide_id       TEXT PRIMARY KEY,
    path           TEXT NOT NULL,
    mpp            REAL,
    extra          TEXT NOT NULL DEFAULT '{}',
    source_order   INTEGER,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    phase          TEXT,                -- 'staged': checksums recorded, folder not yet in place
    attempts       INTEGER NOT NULL DEFAULT 0,
    error_kind     TEXT,                -- error | exception | crash | timeout | lost | outputs
    error          TEXT,
    note           TEXT,
    config_hash    TEXT,
    run_id         INTEGER,
    worker         TEXT,
    staging        TEXT,
    queued_at      REAL,
    started_at     REAL,
    finished_at    REAL,
    seconds        REAL,
    tiles_sha256   TEXT,
    summary_sha256 TEXT,
    result         TEXT                 -- JSON: the slide's row of summary.csv (scores, tiles, ...)
);
CREATE INDEX IF NOT EXISTS slides_status ON slides (status);
"""


def ledger_full(exc: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """SQLite's "database or disk is full" (SQLITE_FULL); or, with the ledger's `folder`, the I/O
    error SQLite reports when it cannot even grow its shared-memory file on a full file system."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "database or disk is full" in str(exc):
        return True
    if folder is not None and ((code is not None and code & 0xFF == sqlite3.SQLITE_IOERR)
                               or "disk I/O error" in str(exc)):
        try:
            stat = os.statvfs(folder)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < _FULL_BELOW_BYTES
    return False


_FULL_BELOW_BYTES = 256 * 1024   # less than this free: an I/O error is taken for a full disk


@dataclass
class SlideRow:
    slide_id: str
    path: str
    mpp: float | None
    extra: dict
    source_order: int | None
    status: str
    phase: str | None
    attempts: int
    error_kind: str | None
    error: str | None
    note: str | None
    config_hash: str | None
    run_id: int | None
    worker: str | None
    staging: str | None
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    tiles_sha256: str | None
    summary_sha256: str | None
    result: dict | None

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> "SlideRow":
        values = dict(row)
        values["extra"] = json.loads(values["extra"] or "{}")
        values["result"] = json.loads(values["result"]) if values["result"] else None
        return cls(**values)


class Ledger:
    """Open (creating if needed) `path`; use as a context manager or call `close()`."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise ConfigError(f"{self.path}: no screening ledger here")
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        else:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._init_meta()
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if ledger_full(exc, self.path.parent):
                raise DiskFull(f"{self.path}: cannot write the screening ledger: the disk is full ({exc}); "
                               f"free space and run again") from exc
            raise ConfigError(f"{self.path}: not a usable screening ledger ({exc})") from exc

    # --- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error:
                    self._rollback()
                    raise
            self._rollback()

        def _rollback(self) -> None:
            # SQLite may already have rolled back by itself (a full disk does that); a second
            # ROLLBACK would then replace the real error with "no transaction is active".
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")

    def _tx(self) -> "_Tx":
        return Ledger._Tx(self._db)

    def _init_meta(self) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (str(time.time()),))

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise ConfigError(f"{self.path}: ledger schema version {found}, this jwth-engine reads {SCHEMA_VERSION}")

    # --- configuration --------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def config(self) -> tuple[str | None, dict | None]:
        """(hash, identity dict) of the configuration this folder is being screened with."""
        value = self.meta("config")
        return self.meta("config_hash"), (json.loads(value) if value else None)

    def run_config(self) -> dict | None:
        """The latest run's full configuration (RunConfig.to_dict()), as it was given."""
        value = self.meta("run_config")
        return json.loads(value) if value else None

    def set_config(self, config_hash: str, identity: dict, run_config: dict | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('config_hash', ?)", (config_hash,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (json.dumps(identity, sort_keys=True),))
            if run_config is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('run_config', ?)", (json.dumps(run_config),))

    # --- runs -----------------------------------------------------------------------------------
    def begin_run(self, config_hash: str, runner: str, workers: int, argv: Iterable[str] = ()) -> int:
        with self._tx() as db:
            # A run still marked running here was killed (we hold the folder lock, so it is not live).
            db.execute("UPDATE runs SET state = 'killed' WHERE state = 'running'")
            cur = db.execute(
                "INSERT INTO runs (started, state, config_hash, runner, workers, host, pid, argv) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
                (time.time(), config_hash, runner, workers, socket.gethostname(), os.getpid(),
                 json.dumps(list(argv))),
            )
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, state: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET finished = ?, state = ?, "
                "done = (SELECT COUNT(*) FROM slides WHERE run_id = ? AND status = 'done'), "
                "failed = (SELECT COUNT(*) FROM slides WHERE run_id = ? AND status = 'failed') "
                "WHERE run_id = ?",
                (time.time(), state, run_id, run_id, run_id),
            )

    def runs(self) -> list[dict]:
        return [dict(r) for r in self._db.execute("SELECT * FROM runs ORDER BY run_id")]

    # --- slides ---------------------------------------------------------------------------------
    def sync_sources(self, sources: list[SlideSource]) -> dict[str, str]:
        """Add new slides as pending; a known slide whose file or MPP override changed is reset to
        pending (its old outputs describe something else). Returns {slide_id: note} of resets."""
        resets = {}
        with self._tx() as db:
            for order, src in enumerate(sources):
                extra = json.dumps(src.extra, sort_keys=True)
                old = db.execute("SELECT path, mpp, status FROM slides WHERE slide_id = ?",
                                 (src.slide_id,)).fetchone()
                if old is None:
                    db.execute(
                        "INSERT INTO slides (slide_id, path, mpp, extra, source_order, status) "
                        "VALUES (?, ?, ?, ?, ?, 'pending')",
                        (src.slide_id, src.path, src.mpp, extra, order),
                    )
                    continue
                changed = []
                if old["path"] != src.path:
                    changed.append(f"path {old['path']} -> {src.path}")
                if old["mpp"] != src.mpp:
                    changed.append(f"mpp {old['mpp']} -> {src.mpp}")
                if changed and old["status"] != "pending":
                    note = "source changed (" + "; ".join(changed) + ")"
                    resets[src.slide_id] = note
                    db.execute(
                        "UPDATE slides SET status = 'pending', phase = NULL, attempts = 0, error = NULL, "
                        "error_kind = NULL, note = ?, result = NULL, tiles_sha256 = NULL, "
                        "summary_sha256 = NULL WHERE slide_id = ?",
                        (note, src.slide_id),
                    )
                db.execute("UPDATE slides SET path = ?, mpp = ?, extra = ?, source_order = ? WHERE slide_id = ?",
                           (src.path, src.mpp, extra, order, src.slide_id))
        return resets

    def get(self, slide_id: str) -> SlideRow | None:
        row = self._db.execute("SELECT * FROM slides WHERE slide_id = ?", (slide_id,)).fetchone()
        return SlideRow.from_sql(row) if row else None

    def slides(self, status: str | None = None) -> list[SlideRow]:
        if status is None:
            rows = self._db.execute("SELECT * FROM slides ORDER BY source_order, slide_id")
        else:
            rows = self._db.execute("SELECT * FROM slides WHERE status = ? ORDER BY source_order, slide_id",
                                    (status,))
        return [SlideRow.from_sql(r) for r in rows]

    def __iter__(self) -> Iterator[SlideRow]:
        return iter(self.slides())

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM slides GROUP BY status"):
            counts[status] = n
        return counts

    def _update(self, slide_id: str, **values) -> None:
        columns = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as db:
            cur = db.execute(f"UPDATE slides SET {columns} WHERE slide_id = ?", (*values.values(), slide_id))
            if cur.rowcount != 1:
                raise KeyError(slide_id)

    def mark_pending(self, slide_id: str, note: str | None = None) -> None:
        self._update(slide_id, status="pending", phase=None, staging=None, worker=None, note=note)

    def mark_queued(self, slide_id: str, *, run_id: int, config_hash: str, worker: str, staging: str) -> None:
        """Sent to a worker (it may still be queued there behind another slide)."""
        self._update(slide_id, status="running", phase=None, run_id=run_id, config_hash=config_hash,
                     worker=worker, staging=staging, queued_at=time.time(), started_at=None,
                     finished_at=None, seconds=None, error=None, error_kind=None)

    def mark_started(self, slide_id: str, worker: str, started_at: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE slides SET attempts = attempts + 1, started_at = ?, worker = ? WHERE slide_id = ?",
                       (started_at, worker, slide_id))

    def mark_staged(self, slide_id: str, *, tiles_sha256: str, summary_sha256: str, result: dict,
                    seconds: float | None) -> None:
        self._update(slide_id, phase="staged", tiles_sha256=tiles_sha256, summary_sha256=summary_sha256,
                     result=json.dumps(result, sort_keys=True), seconds=seconds)

    def mark_done(self, slide_id: str) -> None:
        self._update(slide_id, status="done", phase=None, staging=None, error=None, error_kind=None,
                     note=None, finished_at=time.time())

    def mark_failed(self, slide_id: str, kind: str, error: str, seconds: float | None = None) -> None:
        self._update(slide_id, status="failed", phase=None, staging=None, error_kind=kind,
                     error=" ".join(error.split()), seconds=seconds, finished_at=time.time(),
                     result=None, tiles_sha256=None, summary_sha256=None)

    def mark_requeued(self, slide_id: str, note: str) -> None:
        """Back to pending without counting as done or failed (its worker went away)."""
        self._update(slide_id, status="pending", phase=None, staging=None, note=note)

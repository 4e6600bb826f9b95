"""The screening output folder and the moves that keep it consistent under kill -9.

```
DIR/ledger.sqlite            state of every slide (ledger.py); -wal/-shm beside it
DIR/slides/<slide_id>/       <slide_id>.tiles.parquet + <slide_id>.summary.json, exactly as `score`
DIR/summary.csv|.parquet     one row per slide (results.py)
DIR/logs/                    worker stderr, one file per worker
DIR/.staging/                where workers write; a folder appears under slides/ only when complete
DIR/.trash/                  replaced outputs on their way out
DIR/.lock                    flock held by the run, so two runs never share a folder
```
A worker writes a slide's files into its own staging folder; the driver checks them, records their
checksums, then renames the whole folder into `slides/` (one atomic rename). A reader therefore
never sees a slide folder with one file, a partial file, or files from two different attempts.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..outputs.atomic import TMP_PREFIX, fsync_dir, remove_stale_temps, sha256_file
from ..outputs.slide_outputs import verify_slide_outputs

LEDGER_NAME = "ledger.sqlite"


class ScreenLayout:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.ledger = self.root / LEDGER_NAME
        self.slides = self.root / "slides"
        self.staging = self.root / ".staging"
        self.trash = self.root / ".trash"
        self.logs = self.root / "logs"
        self.summary_csv = self.root / "summary.csv"
        self.summary_parquet = self.root / "summary.parquet"
        self._lock_fd: int | None = None

    def create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root}: out exists and is not a folder", field="out")
        try:
            for folder in (self.root, self.slides, self.staging, self.trash, self.logs):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.root}: cannot create screening folder ({exc.strerror})") from exc
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"{self.root}: screening folder is not writable")

    # --- one run per folder -----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock on the folder for the life of this process (freed by the kernel
        even on kill -9)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.root}: another screening run is using this folder (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- per-slide paths ----------------------------------------------------------------------------
    def slide_dir(self, slide_id: str) -> Path:
        return self.slides / slide_id

    @staticmethod
    def output_names(slide_id: str) -> tuple[str, str]:
        return f"{slide_id}.tiles.parquet", f"{slide_id}.summary.json"

    def staging_dir(self, slide_id: str, run_id: int, attempt: int) -> Path:
        return self.staging / f"{slide_id}.r{run_id}.a{attempt}"

    # --- checks and moves ---------------------------------------------------------------------------
    def check_outputs(self, folder: Path, slide_id: str, tiles_sha256: str | None,
                      summary_sha256: str | None) -> str | None:
        """None when `folder` holds exactly the two outputs with these checksums, else the problem."""
        tiles_name, summary_name = self.output_names(slide_id)
        for name, expected in ((tiles_name, tiles_sha256), (summary_name, summary_sha256)):
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if expected is None:
                return f"{name} has no recorded checksum"
            if sha256_file(path) != expected:
                return f"{name} does not match its recorded checksum"
        # The pair must also agree with itself: the summary records its Parquet's checksum.
        return verify_slide_outputs(folder, slide_id)

    def publish(self, staging: Path, slide_id: str) -> Path:
        """Move a complete staging folder to `slides/<slide_id>`, replacing older outputs."""
        final = self.slide_dir(slide_id)
        remove_stale_temps(staging)
        if final.exists():
            old = self.trash / f"{slide_id}.{os.getpid()}.{os.urandom(4).hex()}"
            os.rename(final, old)
            os.rename(staging, final)
            fsync_dir(self.slides)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
            fsync_dir(self.slides)
        return final

    def retire(self, slide_id: str) -> None:
        """Move a slide's outputs out of sight (they no longer match the ledger)."""
        final = self.slide_dir(slide_id)
        if final.exists():
            old = self.trash / f"{slide_id}.{os.getpid()}.{os.urandom(4).hex()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)

    def clean_scratch(self, keep: set[Path] = frozenset()) -> int:
        """Remove staging folders not in `keep`, the trash, and temp files of killed writers."""
        removed = 0
        for folder in (self.staging, self.trash):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry in keep:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        removed += remove_stale_temps(self.root)
        return removed


__all__ = ["LEDGER_NAME", "ScreenLayout", "TMP_PREFIX"]

"""Atomic file output: write to a hidden temp file in the destination folder, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
partial one, even after kill -9 or power loss. Temp files start with `.jwth-tmp-` so that a later
run can recognise and remove leftovers of a killed writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".jwth-tmp-"


def _umask() -> int:
    mask = os.umask(0)   # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (the directory itself must be synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success it is fsynced and renamed over `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + dest.name + ".", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            # mkstemp creates 0600; results are meant to be shared like any file the user writes.
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files a killed writer left behind; returns how many were removed."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for leftover in folder.glob(TMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()

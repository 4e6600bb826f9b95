"""Atomic file output: write to a hidden temp file in the destination folder, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
partial one, even after kill -9 or power loss. Temp files start with `.jwth-tmp-` so that a later
run can recognise and remove leftovers of a killed writer.

Several processes may write into one folder at once (two `score` runs on different slides), so a
temp file is only "left over" when no live writer owns it: each writer holds an exclusive `flock`
on its temp file from creation to rename, and `remove_stale_temps` deletes only the temp files it
can lock itself. The kernel drops the lock when its holder dies, kill -9 included. Writers must
write the yielded path in place (open/truncate), not replace it, so the lock stays on the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".jwth-tmp-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that says the file system (or the user's quota) has no room left."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (the directory itself must be synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_locked_temp(dest: Path) -> tuple[int, Path]:
    """A new, empty temp file next to `dest`, locked by the returned descriptor.

    Created with mode 0666 so that the kernel applies the process umask (as for any file the user
    writes): reading the umask would mean setting it, and another thread could create a file in
    between with the wrong permissions. A cleaner may lock and unlink the name in the instant
    between creation and our lock; then the name no longer leads to our file and we try again.
    """
    while True:
        tmp = dest.parent / f"{TMP_PREFIX}{dest.name}.{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success it is fsynced and renamed over `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = _create_locked_temp(dest)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        try:
            if os.path.lexists(tmp_path):
                tmp_path.unlink()
        finally:
            os.close(fd)   # releases the lock, after the temp name is gone


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files that no live writer holds (leftovers of killed writers); returns how many
    were removed. Temp files of writers still running, in this process or another, are kept."""
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    for leftover in folder.glob(TMP_PREFIX + "*"):
        try:
            fd = os.open(leftover, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue          # renamed into place or removed meanwhile
        except OSError as exc:
            if exc.errno == errno.ELOOP:   # a symlink with our prefix: not ours to follow
                leftover.unlink(missing_ok=True)
                removed += 1
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue      # a live writer owns it
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(leftover))
            except FileNotFoundError:
                continue
            if same:
                leftover.unlink(missing_ok=True)
                removed += 1
        finally:
            os.close(fd)
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()

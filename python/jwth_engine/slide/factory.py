"""`open_slide`: check the file, pick a reader, say why.

Order of checks, cheapest and safest first: the file exists, is a regular readable non-empty file;
its TIFF structure (if it is a TIFF) is intact; only then a native library sees it. In "auto" mode
a TIFF-based file goes to cuCIM after a crash-isolated probe (see probe.py) and to OpenSlide when
the probe fails; formats cuCIM does not claim go straight to OpenSlide.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import config
from ..config import TilingConfig
from ..errors import BackendUnavailable, SlideError
from .base import Slide
from .tiff import inspect_tiff, sniff

READERS = config.READERS

# Formats cuCIM has no plugin for (several are TIFF inside, so the extension decides).
OPENSLIDE_ONLY = {
    ".ndpi": "Hamamatsu NDPI",
    ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU",
    ".mrxs": "3DHISTECH MRXS",
    ".scn": "Leica SCN",
    ".bif": "Ventana BIF",
    ".svslide": "Sakura SVSlide",
    ".dcm": "DICOM",
}


def _check_file(path: str) -> bytes:
    """The first 16 bytes, after checking the path is a readable, non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise SlideError(path, "file not found")
    if p.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    if not p.is_file():
        raise SlideError(path, "is not a regular file")
    try:
        with open(p, "rb") as fh:
            header = fh.read(16)
    except PermissionError as exc:
        raise SlideError(path, "permission denied (the file is not readable)") from exc
    except OSError as exc:
        raise SlideError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    if not header:
        raise SlideError(path, "the file is empty (0 bytes)")
    return header


def _open_cucim(path: str, note: str) -> Slide:
    from .cucim_reader import CuCIMSlide

    return CuCIMSlide(path, reader_note=note)


def _open_openslide(path: str, note: str) -> Slide:
    from .openslide_reader import OpenSlideSlide

    try:
        return OpenSlideSlide(path, reader_note=note)
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"{path}: {exc}") from exc


def open_slide(path: str | os.PathLike, reader: str = TilingConfig.reader) -> Slide:
    """Open a slide with `reader` ("auto", "cucim" or "openslide").

    Raises SlideError (one line: the path and the problem) for a missing, unreadable, empty,
    truncated or foreign file, and BackendUnavailable when the reader it needs is not installed.
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    path = os.fspath(path)
    header = _check_file(path)
    is_tiff = sniff(header) is not None
    if is_tiff:
        summary = inspect_tiff(path)
        if summary is not None and summary.problem:
            raise SlideError(path, summary.problem)
    ext = Path(path).suffix.lower()
    openslide_only = OPENSLIDE_ONLY.get(ext)

    if reader == "openslide":
        return _open_openslide(path, "requested (--reader openslide)")

    if reader == "cucim":
        if openslide_only:
            raise SlideError(path, f"cuCIM cannot read {openslide_only} files; use --reader auto or openslide")
        if not is_tiff:
            raise SlideError(path, "not a TIFF file, and cuCIM reads only TIFF-based slides")
        from .cucim_reader import import_cucim
        from .probe import probe_slide

        try:
            import_cucim()
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"{path}: {exc}") from exc
        probe = probe_slide(path)
        if not probe.ok:
            raise SlideError(path, f"{probe.reason}; --reader auto would use OpenSlide")
        return _open_cucim(path, "requested (--reader cucim)")

    # auto
    if openslide_only:
        return _open_openslide(path, f"cuCIM does not read {openslide_only} files; using OpenSlide")
    if not is_tiff:
        return _open_non_tiff(path, header)
    from .cucim_reader import cucim_available

    available, why_not = cucim_available()
    if not available:
        return _open_fallback(path, f"{why_not}; using OpenSlide", why_not)
    from .probe import probe_slide

    probe = probe_slide(path)
    if probe.ok:
        return _open_cucim(path, "TIFF-based slide; cuCIM opened and decoded it in a crash-isolated probe")
    return _open_fallback(path, f"{probe.reason}; using OpenSlide", probe.reason)


def _open_fallback(path: str, note: str, cucim_reason: str) -> Slide:
    """OpenSlide after cuCIM could not be used; if OpenSlide fails too, say what each reader said."""
    from .openslide_reader import OpenSlideSlide

    try:
        return OpenSlideSlide(path, reader_note=note)
    except SlideError as exc:
        raise SlideError(path, f"{exc.problem} ({cucim_reason})") from exc
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"{path}: {cucim_reason}, and OpenSlide is not available: {exc}") from exc


def _open_non_tiff(path: str, header: bytes) -> Slide:
    """Not TIFF and no extension we know: OpenSlide decides whether it is a slide at all."""
    from .openslide_reader import import_openslide

    start = header[:8]
    try:
        openslide = import_openslide()
    except BackendUnavailable as exc:
        raise SlideError(path, f"not a TIFF file (starts with {start!r}); OpenSlide, which reads "
                               f"other slide formats, is not available: {exc}") from exc
    vendor = openslide.OpenSlide.detect_format(path)
    if vendor is None:
        raise SlideError(path, f"not a slide file: no TIFF header (it starts with {start!r}) and "
                               f"OpenSlide does not recognise the format")
    return _open_openslide(path, f"not TIFF-based; OpenSlide recognises it as {vendor}")

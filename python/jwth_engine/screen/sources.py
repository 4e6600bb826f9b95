"""What a screening run works through: a folder of slides or a manifest CSV, as `SlideSource` rows.

Every slide gets a `slide_id` that is safe to use as one folder name under `DIR/slides/`: the raw
id (the manifest's `slide_id`, else the file name without its extension) is reduced to
`[A-Za-z0-9._-]`, can never be `.`/`..`/hidden, and ids that collide (also case-insensitively, for
macOS and Windows shares) get a suffix derived from the slide's path, so the same source always
gives the same ids.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

# Formats OpenSlide or cuCIM read (plus plain pyramidal TIFF). Compared case-insensitively.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                    ".bif", ".czi", ".dcm", ".qptiff")
MAX_ID_LENGTH = 100
MANIFEST_COLUMNS = ("path", "slide_id", "mpp")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}


@dataclass(frozen=True)
class SlideSource:
    slide_id: str
    path: str                     # absolute
    mpp: float | None = None      # per-slide override (manifest column `mpp`)
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # other manifest columns


def sanitize_slide_id(raw: str) -> str:
    """One safe path component for `raw` (no separators, no traversal, not hidden, bounded length)."""
    text = _UNSAFE.sub("_", raw.strip())
    text = re.sub(r"_{2,}", "_", text).lstrip("._-").rstrip(".")
    if not text:
        text = "slide"
    if text.split(".", 1)[0].lower() in _WINDOWS_RESERVED:
        text = "_" + text
    if len(text) > MAX_ID_LENGTH:
        text = text[:MAX_ID_LENGTH - 9].rstrip(".") + "-" + _short_hash(raw)
    return text


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def assign_ids(rows: list[tuple[str, str, float | None, dict]]) -> list[SlideSource]:
    """(raw id, absolute path, mpp, extra) → sources with unique, safe ids, in input order."""
    taken: set[str] = set()
    sources = []
    for raw, path, mpp, extra in rows:
        slide_id = sanitize_slide_id(raw)
        if slide_id.lower() in taken:
            base = slide_id[:MAX_ID_LENGTH - 9]
            slide_id = f"{base}-{_short_hash(path + chr(0) + raw)}"
            n = 2
            while slide_id.lower() in taken:
                slide_id = f"{base}-{_short_hash(path + chr(0) + raw + str(n))}"
                n += 1
        taken.add(slide_id.lower())
        sources.append(SlideSource(slide_id, path, mpp, extra))
    return sources


def _stem(path: Path) -> str:
    name = path.name
    return name[:-len(path.suffix)] if path.suffix else name


def scan_folder(folder: str | os.PathLike) -> list[SlideSource]:
    """Slides under `folder` (recursive, hidden files and folders skipped), sorted by path."""
    root = Path(folder).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(SLIDE_EXTENSIONS):
                continue
            found.append(Path(dirpath) / name)
    found.sort(key=lambda p: p.relative_to(root).parts)
    return assign_ids([(_stem(p), str(p), None, {}) for p in found])


def _parse_mpp(value: str, where: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise ConfigError(f"{where}: mpp {value!r} is not a number") from None
    if not (math.isfinite(mpp) and 0.01 <= mpp <= 100):
        raise ConfigError(f"{where}: mpp {value!r} is outside 0.01..100 µm/px")
    return mpp


def read_manifest(manifest: str | os.PathLike) -> list[SlideSource]:
    """Rows of a CSV with a `path` column (relative paths are relative to the CSV's folder) and
    optional `slide_id` and `mpp`; every other column is carried into the results unchanged."""
    manifest = Path(manifest).resolve()
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{manifest}: manifest is not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise ConfigError(f"{manifest}: not a readable CSV ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{manifest}: cannot read manifest ({exc.strerror})") from exc
    header = [h.strip() if h else h for h in header]
    if "path" not in header:
        raise ConfigError(f"{manifest}: manifest has no 'path' column (columns: {', '.join(map(str, header)) or 'none'})")
    if len(set(header)) != len(header):
        raise ConfigError(f"{manifest}: manifest has duplicate column names")
    entries = []
    for line, row in enumerate(rows, start=2):
        row = {(k.strip() if k else k): v for k, v in row.items()}
        if None in row:
            raise ConfigError(f"{manifest}: line {line} has more fields than the header")
        where = f"{manifest}: line {line}"
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise ConfigError(f"{where}: empty path")
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = manifest.parent / path
        path = Path(os.path.normpath(path))
        raw_id = (row.get("slide_id") or "").strip() or _stem(path)
        mpp = _parse_mpp(row.get("mpp") or "", where)
        extra = {k: ("" if v is None else v) for k, v in row.items() if k not in MANIFEST_COLUMNS}
        entries.append((raw_id, str(path), mpp, extra))
    return assign_ids(entries)


def load_sources(source: str | os.PathLike) -> list[SlideSource]:
    """A folder is scanned; a `.csv` file is read as a manifest; anything else is an error."""
    source = Path(source)
    if source.is_dir():
        slides = scan_folder(source)
        if not slides:
            raise ConfigError(f"{source}: no slide files found (extensions: {' '.join(SLIDE_EXTENSIONS)})")
        return slides
    if source.is_file() and source.suffix.lower() == ".csv":
        slides = read_manifest(source)
        if not slides:
            raise ConfigError(f"{source}: manifest has no rows")
        return slides
    if source.exists():
        raise ConfigError(f"{source}: SOURCE must be a folder of slides or a manifest .csv")
    raise ConfigError(f"{source}: no such folder or manifest")

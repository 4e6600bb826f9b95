"""OpenSlide reader: NDPI, MRXS, SCN, VMS, BIF, ... and whatever cuCIM cannot decode.

Thread safety: an OpenSlide handle may be used from several threads at once (OpenSlide documents
this, and openslide-python's ctypes calls release the GIL), so one handle serves every thread and
`read_regions` simply fans out over a thread pool.

OpenSlide returns straight-alpha RGBA, transparent outside the scanned area; we composite onto
white. With a non-integer level downsample (2.0005 on the TCGA slide) OpenSlide renders a region at
a sub-pixel offset, so its level>0 pixels can differ slightly from cuCIM's, which snaps to whole
level pixels; level-0 reads are identical.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Iterator

import numpy as np

from ..errors import BackendUnavailable, SlideError
from .base import Slide, SlideInfo, composite_on_white
from .mpp import mpp_from_openslide_properties
from .tiff import inspect_tiff

INSTALL_HINT = "pip install openslide-python openslide-bin (both are jwth-engine dependencies)"
CACHE_ENV = "JWTH_OPENSLIDE_CACHE_MB"
DEFAULT_CACHE_MB = 256    # per slide, filled on demand; OpenSlide's own default is 32 MB shared


def import_openslide():
    """The `openslide` module, or BackendUnavailable saying what to install."""
    try:
        import openslide
    except ImportError as exc:
        raise BackendUnavailable(f"OpenSlide is not installed ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:  # openslide-python present, the C library (openslide-bin) missing
        raise BackendUnavailable(f"OpenSlide's C library cannot load ({exc}); {INSTALL_HINT}") from exc
    return openslide


def openslide_available() -> tuple[bool, str]:
    try:
        import_openslide()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, ""


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide."""

    def __init__(self, path: str, *, reader_note: str = ""):
        openslide = import_openslide()
        self._OpenSlideError = openslide.OpenSlideError
        try:
            handle = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(path, "not a slide format OpenSlide can read") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(path, f"OpenSlide cannot open the file: {exc}") from exc
        props = handle.properties
        mpp, mpp_source = mpp_from_openslide_properties(props)
        tile_sizes = []
        for level in range(handle.level_count):
            tw = props.get(f"openslide.level[{level}].tile-width")
            th = props.get(f"openslide.level[{level}].tile-height")
            tile_sizes.append((int(tw), int(th)) if tw and th else (0, 0))
        tiff = inspect_tiff(path) if os.path.isfile(path) else None
        info = SlideInfo(
            path=path,
            reader="openslide",
            reader_note=reader_note,
            vendor=props.get("openslide.vendor") or "unknown",
            level_count=handle.level_count,
            level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            level_tile_sizes=tuple(tile_sizes),
            mpp=mpp,
            mpp_source=mpp_source,
            objective=_float(props.get("openslide.objective-power")),
            compression=tiff.compression if tiff else None,
            associated_images=tuple(sorted(handle.associated_images.keys())),
        )
        super().__init__(path, info)
        self._handle = handle
        self._openslide = openslide
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            image = self._handle.read_region(location, level, size)
        except self._OpenSlideError as exc:
            raise self._decode_error(location, level, exc) from exc
        return composite_on_white(np.asarray(image))

    def _ensure_cache(self, level: int, size: tuple[int, int]) -> None:
        """Make the tile cache hold the stored-tile rows one grid row spans, plus one.

        Reads arrive row-major, so with that much cache no stored tile is decoded twice in a pass.
        """
        tile_w, tile_h = self.info.level_tile_sizes[level]
        width = self.info.level_dimensions[level][0]
        if tile_w <= 0 or tile_h <= 0:
            return
        rows = math.ceil(size[1] / tile_h) + 1
        needed = rows * math.ceil(width / tile_w) * tile_w * tile_h * 4  # OpenSlide caches ARGB
        try:
            limit = int(os.environ.get(CACHE_ENV, DEFAULT_CACHE_MB)) << 20
        except ValueError:
            limit = DEFAULT_CACHE_MB << 20
        wanted = min(max(needed * 5 // 4, 32 << 20), limit)
        with self._cache_lock:
            if wanted > self._cache_bytes:
                try:
                    self._handle.set_cache(self._openslide.OpenSlideCache(wanted))
                except self._OpenSlideError:
                    return  # the handle failed an earlier read; the next read reports that error
                self._cache_bytes = wanted

    def _regions(self, locs: list[tuple[int, int]], level: int, size: tuple[int, int],
                 num_workers: int) -> Iterator[np.ndarray]:
        self._ensure_cache(level, size)
        return super()._regions(locs, level, size, num_workers)

    def close(self) -> None:
        already = self._closed
        super().close()
        if not already:            # openslide-python raises on a second close
            self._handle.close()

"""cuCIM reader: Aperio SVS, generic tiled TIFF, Philips TIFF.

Thread safety: cuCIM's own examples share one CuImage across Python threads for CPU reads, but its
GPU path is known to race (rapidsai/cucim#884) and nothing documents the guarantee, so each thread
gets its own CuImage (opening one is cheap: cuCIM shares the file handle between them). Batched
reads go through cuCIM's multi-threaded loader (`read_region(locations, ..., num_workers=N)`),
which owns its worker threads.

Two cuCIM behaviours this class works around (cuCIM 26.x, checked on the shared test slides):
* the batch iterator reuses its output buffer: an array taken from a batch must be copied before
  the iterator advances, or it later reads freed memory (a segfault when touched);
* a region that overhangs the image is padded white in some files and black in others, and one
  larger than the whole level raises ValueError; so any region not inside the level is clipped
  here and padded white.

Decoded-tile cache: cuCIM caches decoded tiles only if configured before its slide plugin loads,
and in this version only through its config file, not through `CuImage.cache()` (which changes a
cache the plugin does not use). Off by default: the scoring pipeline reads along the stored tile
grid (pipeline/locality.py), so it decodes each stored tile once without a cache, and a 1 GB cache
doubled peak RSS on the 100k x 80k benchmark slide (2.1 GB vs 1.06 GB,
benchmarks/results/large_slide_cpu.json). `JWTH_CUCIM_CACHE_MB=N` turns it on for callers that
read unaligned regions one by one (where the cache pays for itself); `_configure_tile_cache` then points `CUCIM_CONFIG_PATH` at a per-process cache config,
unless the user has a cuCIM config of their own.

cuFile (GPUDirect Storage, loaded by cuCIM) writes `cufile.log` into the working directory unless
told otherwise (rapidsai/cucim#514); CUFILE_LOGFILE_PATH (NVIDIA's GDS troubleshooting guide) sends
it to the temp folder instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BackendUnavailable, SlideError
from .base import WHITE, Slide, SlideInfo, composite_on_white, level0_to_level, level_to_level0
from .mpp import mpp_from_cucim_metadata
from .tiff import inspect_tiff

INSTALL_HINT = "pip install 'jwth-engine[cu13]' (or '[cu12]' for a CUDA 12 driver)"
CACHE_ENV = "JWTH_CUCIM_CACHE_MB"
DEFAULT_CACHE_MB = 0      # see the module docstring

_cache_lock = threading.Lock()
_cache_configured = False


def _configure_tile_cache() -> None:
    """Give cuCIM a per-process decoded-tile cache, unless the user configured cuCIM themselves."""
    global _cache_configured
    with _cache_lock:
        if _cache_configured:
            return
        _cache_configured = True
        if os.environ.get("CUCIM_CONFIG_PATH"):
            return
        if any((base / ".cucim.json").is_file() for base in (Path.cwd(), Path.home())):
            return
        try:
            capacity = int(os.environ.get(CACHE_ENV, DEFAULT_CACHE_MB))
        except ValueError:
            capacity = DEFAULT_CACHE_MB
        if capacity <= 0:
            return
        config = {"cache": {"type": "per_process", "memory_capacity": capacity}}
        target = Path(tempfile.gettempdir()) / f"jwth-engine-cucim-{os.getuid()}-{capacity}mb.json"
        try:
            if not target.is_file() or json.loads(target.read_text()) != config:
                tmp = target.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(config))
                os.replace(tmp, target)
        except (OSError, ValueError):
            return  # no writable temp dir: run without the cache rather than fail
        os.environ["CUCIM_CONFIG_PATH"] = str(target)


def import_cucim():
    """The CuImage class, or BackendUnavailable saying what to install."""
    _configure_tile_cache()
    os.environ.setdefault("CUFILE_LOGFILE_PATH", str(Path(tempfile.gettempdir()) / f"jwth-engine-cufile-{os.getuid()}.log"))
    try:
        from cucim.clara import CuImage
    except ImportError as exc:
        raise BackendUnavailable(f"cuCIM is not installed or cannot load ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:  # the wheel is there but a native library it needs is not
        raise BackendUnavailable(f"cuCIM cannot load its native library ({exc}); {INSTALL_HINT}") from exc
    return CuImage


def cucim_available() -> tuple[bool, str]:
    """(available, why not). Imports cuCIM on first call; never at module import."""
    try:
        import_cucim()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, ""


def _vendor(metadata: dict) -> str:
    for vendor in ("aperio", "philips"):
        if metadata.get(vendor):
            return vendor
    return "generic-tiff"


def _objective(metadata: dict) -> float | None:
    value = (metadata.get("aperio") or {}).get("AppMag")
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _as_rgb(region: np.ndarray) -> np.ndarray:
    if region.ndim == 3 and region.shape[2] == 4:  # cuCIM's slow path for odd TIFFs returns RGBA
        return composite_on_white(region)
    return region


class CuCIMSlide(Slide):
    """A slide read with cuCIM on the CPU."""

    def __init__(self, path: str, *, reader_note: str = ""):
        CuImage = import_cucim()
        try:
            image = CuImage(path)
            metadata = image.metadata
            resolutions = image.resolutions
        except (RuntimeError, ValueError, OSError) as exc:
            raise SlideError(path, f"cuCIM cannot open the file: {exc}") from exc
        mpp, mpp_source = mpp_from_cucim_metadata(metadata)
        tiff = inspect_tiff(path)
        info = SlideInfo(
            path=path,
            reader="cucim",
            reader_note=reader_note,
            vendor=_vendor(metadata),
            level_count=int(resolutions["level_count"]),
            level_dimensions=tuple((int(w), int(h)) for w, h in resolutions["level_dimensions"]),
            level_downsamples=tuple(float(d) for d in resolutions["level_downsamples"]),
            level_tile_sizes=tuple((int(w), int(h)) for w, h in resolutions["level_tile_sizes"]),
            mpp=mpp,
            mpp_source=mpp_source,
            objective=_objective(metadata),
            compression=tiff.compression if tiff else None,
            associated_images=tuple(sorted(image.associated_images)),
        )
        super().__init__(path, info)
        self._CuImage = CuImage
        self._local = threading.local()
        self._local.image = image
        self._images = [image]
        self._images_lock = threading.Lock()

    def _image(self):
        image = getattr(self._local, "image", None)
        if image is None:
            try:
                image = self._CuImage(self.path)
            except (RuntimeError, ValueError, OSError) as exc:
                raise SlideError(self.path, f"cuCIM cannot reopen the file: {exc}") from exc
            self._local.image = image
            with self._images_lock:
                self._images.append(image)
        return image

    def _read_cucim(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            region = np.asarray(self._image().read_region(location, size, level))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise self._decode_error(location, level, exc) from exc
        return _as_rgb(region)

    def _inside(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> bool:
        width, height = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        xl, yl = level0_to_level(location[0], ds), level0_to_level(location[1], ds)
        return xl >= 0 and yl >= 0 and xl + size[0] <= width and yl + size[1] <= height

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if self._inside(location, level, size):
            return self._read_cucim(location, level, size)
        # cuCIM pads what lies outside the image with white in some files and black in others
        # (Aperio vs generic TIFF), and refuses regions larger than the level: read the overlap
        # ourselves and pad with white.
        width, height = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        xl, yl = level0_to_level(location[0], ds), level0_to_level(location[1], ds)
        x_lo, x_hi = max(xl, 0), min(xl + size[0], width)
        y_lo, y_hi = max(yl, 0), min(yl + size[1], height)
        out = np.full((size[1], size[0], 3), WHITE, np.uint8)
        if x_lo < x_hi and y_lo < y_hi:
            inner = self._read_cucim((level_to_level0(x_lo, ds), level_to_level0(y_lo, ds)), level,
                                     (x_hi - x_lo, y_hi - y_lo))
            out[y_lo - yl:y_hi - yl, x_lo - xl:x_hi - xl] = inner
        return out

    def _regions(self, locs: list[tuple[int, int]], level: int, size: tuple[int, int],
                 num_workers: int) -> Iterator[np.ndarray]:
        """Regions inside the level go through cuCIM's batched, multi-threaded loader; the few that
        overhang an edge (last grid row and column) are read one by one and padded white."""
        inside = [self._inside(loc, level, size) for loc in locs]
        batched = [list(loc) for loc, ok in zip(locs, inside) if ok]
        if num_workers <= 0 or len(batched) <= 1:
            yield from super()._regions(locs, level, size, num_workers)
            return
        tiles = self._batched(batched, level, size, num_workers)
        for loc, ok in zip(locs, inside):
            yield next(tiles) if ok else self._read(loc, level, size)

    def _batched(self, locs: list[list[int]], level: int, size: tuple[int, int],
                 num_workers: int) -> Iterator[np.ndarray]:
        batch_size = min(len(locs), max(8, 4 * num_workers))
        try:
            batches = self._image().read_region(locs, size, level, num_workers=num_workers, batch_size=batch_size)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise self._decode_error(tuple(locs[0]), level, exc) from exc
        done = 0
        while done < len(locs):
            try:
                batch = next(batches)
                # Copy now: the loader reuses this buffer for a later batch.
                array = np.array(batch, copy=True)
            except StopIteration:
                raise SlideError(self.path, f"cuCIM returned {done} of {len(locs)} regions at level {level}") from None
            except (RuntimeError, ValueError, MemoryError) as exc:
                raise self._decode_error(tuple(locs[done]), level, exc) from exc
            if array.ndim == 3:
                array = array[None]
            done += len(array)
            for tile in array:
                yield _as_rgb(tile)

    def close(self) -> None:
        super().close()
        with self._images_lock:
            images, self._images = self._images, []
        for image in images:
            image.close()
        self._local = threading.local()

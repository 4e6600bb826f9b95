"""The `Slide` interface every reader implements, and the `SlideInfo` it reports.

Coordinates follow OpenSlide: a region's `location` is the (x, y) of its top-left corner in level-0
pixels, its `size` is (width, height) in pixels of the level read. A level-0 coordinate maps to
level pixel `floor(x / downsample)`, the convention cuCIM uses; `level_to_level0` is its inverse
(the smallest level-0 coordinate that lands on a given level pixel), so a grid planned in level
pixels round-trips exactly through level-0 coordinates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import SlideError

WHITE = 255  # what a region outside the image is filled with (slide background, never "tissue")


@dataclass(frozen=True)
class SlideInfo:
    """What a reader found in a slide file. Names follow OpenSlide's properties where they exist."""

    path: str
    reader: str                                    # "cucim" | "openslide"
    reader_note: str                               # why this reader
    vendor: str                                    # "aperio", "hamamatsu", "philips", "generic-tiff", ...
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]
    level_tile_sizes: tuple[tuple[int, int], ...]  # stored tile (w, h) per level; (0, 0) = not known
    mpp: tuple[float, float] | None                # (x, y) µm/px at level 0 as found, None if absent
    mpp_source: str                                # "aperio.MPP", "openslide.mpp-x", "tiff.XResolution", "none"
    objective: float | None
    compression: str | None                        # "JPEG", "JPEG 2000 (Aperio 33005)", "deflate", ...
    associated_images: tuple[str, ...]

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""

        def plain(value):
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value

        return {key: plain(value) for key, value in asdict(self).items()}


def level_to_level0(value: int, downsample: float) -> int:
    """Smallest level-0 coordinate whose `floor(x / downsample)` is `value`.

    `ceil` rather than `round`: with a non-integer downsample (2.0005 on the TCGA slide) a rounded
    coordinate can land one level pixel short, and reads would then overlap their neighbours.
    """
    x0 = math.ceil(value * downsample)
    # Float error in the product or the division can put us one off either way; settle exactly.
    while math.floor((x0 - 1) / downsample) >= value:
        x0 -= 1
    while math.floor(x0 / downsample) < value:
        x0 += 1
    return int(x0)


def level0_to_level(value: int, downsample: float) -> int:
    return int(math.floor(value / downsample))


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha) → RGB over a white background, exact in integers.

    OpenSlide marks pixels outside the scanned area as transparent; slide background is white.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.size == 0 or int(alpha.min()) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + WHITE * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class Slide(ABC):
    """A whole-slide image opened by one reader. Use as a context manager.

    Subclasses implement `_read` (one region, any bounds) and may override `read_regions` with a
    faster batched path. Every read returns a fresh HxWx3 uint8 RGB array.
    """

    info: SlideInfo
    path: str

    def __init__(self, path: str, info: SlideInfo):
        self.path = path
        self.info = info
        self._pools: dict[int, ThreadPoolExecutor] = {}  # by size; kept until close()
        self._pool_lock = threading.Lock()
        self._closed = False

    # --- reading ---------------------------------------------------------------------------------

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """HxWx3 uint8; regions partly or wholly outside the level are padded with WHITE."""

    def _check_args(self, level: int, size: tuple[int, int]) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")
        if not 0 <= level < self.info.level_count:
            raise ValueError(f"level {level} out of range: the slide has {self.info.level_count} levels")
        if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
            raise ValueError(f"region size must be two positive integers, got {size!r}")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read one region; out-of-bounds parts are white. Raises SlideError if it cannot be decoded."""
        self._check_args(level, size)
        location = (int(location[0]), int(location[1]))
        size = (int(size[0]), int(size[1]))
        return self._read(location, level, size)

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int],
                     num_workers: int = 0) -> Iterator[np.ndarray]:
        """Read same-size regions, yielded in the order of `locations`.

        Arguments are checked here, eagerly; the reads happen as the iterator is consumed.
        """
        self._check_args(level, size)
        locs = [(int(x), int(y)) for x, y in locations]
        return self._regions(locs, level, (int(size[0]), int(size[1])), int(num_workers))

    def _regions(self, locs: list[tuple[int, int]], level: int, size: tuple[int, int],
                 num_workers: int) -> Iterator[np.ndarray]:
        """Generic path: a pool of `num_workers` threads (0: the calling thread), with a bounded
        number of reads in flight so memory does not grow with the number of locations."""
        if num_workers <= 0 or len(locs) <= 1:
            for loc in locs:
                yield self._read(loc, level, size)
            return
        pool = self._executor(num_workers)
        window: deque = deque()
        pending = iter(locs)
        for loc in pending:
            window.append(pool.submit(self._read, loc, level, size))
            if len(window) >= 2 * num_workers:
                break
        try:
            while window:
                result = window.popleft().result()
                nxt = next(pending, None)
                if nxt is not None:
                    window.append(pool.submit(self._read, nxt, level, size))
                yield result
        finally:
            for future in window:  # the consumer stopped early or a read failed
                future.cancel()

    def _executor(self, num_workers: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            pool = self._pools.get(num_workers)
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="jwth-slide")
                self._pools[num_workers] = pool
            return pool

    # --- thumbnail -------------------------------------------------------------------------------

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB overview whose longest side is at most `max_size`, and its downsample w.r.t. level 0.

        Reads the coarsest pyramid level that still has at least the requested resolution and
        averages f x f blocks of it (integer f), in horizontal bands so a slide without a usable
        pyramid never has its full level 0 in memory. The returned downsample is exact:
        one thumbnail pixel covers `f * level_downsample` level-0 pixels (the last row and column
        may cover less).
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        w0, h0 = self.info.level_dimensions[0]
        wanted = max(w0, h0) / max_size  # downsample needed w.r.t. level 0
        level = 0
        for i, ds in enumerate(self.info.level_downsamples):
            if ds <= wanted * 1.001 and ds >= self.info.level_downsamples[level]:
                level = i
        lw, lh = self.info.level_dimensions[level]
        ds_level = float(self.info.level_downsamples[level])
        f = max(1, math.ceil(max(lw, lh) / max_size))
        out_w, out_h = math.ceil(lw / f), math.ceil(lh / f)
        out = np.empty((out_h, out_w, 3), np.uint8)
        # Bands of whole f-row blocks, about 64 MB of decoded pixels each.
        rows_per_band = max(1, (64 << 20) // max(1, lw * 3 * f))
        for r0 in range(0, out_h, rows_per_band):
            r1 = min(out_h, r0 + rows_per_band)
            y_level = r0 * f
            band_h = min(lh, r1 * f) - y_level
            band = self.read_region((0, level_to_level0(y_level, ds_level)), level, (lw, band_h))
            out[r0:r1] = _block_mean(band, f, r1 - r0, out_w)
        return out, f * ds_level

    # --- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Idempotent: error paths may close a slide that a cleanup further up closes again."""
        with self._pool_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._closed = True

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, levels={self.info.level_count})"

    def _decode_error(self, location: tuple[int, int], level: int, cause: BaseException | str) -> SlideError:
        return SlideError(self.path, f"cannot decode region at ({location[0]}, {location[1]}) level {level}: {cause}")


def _block_mean(band: np.ndarray, f: int, rows: int, cols: int) -> np.ndarray:
    """Mean of f x f blocks (ragged last blocks average the pixels they have): Pillow's box reduce,
    ten times faster than a numpy/scikit-image block mean on a full level."""
    if f == 1:
        return band[:rows, :cols]
    from PIL import Image

    reduced = np.asarray(Image.fromarray(np.ascontiguousarray(band)).reduce(f))
    return reduced[:rows, :cols]

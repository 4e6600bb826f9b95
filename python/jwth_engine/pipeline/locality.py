"""Read planning along the slide's stored tile grid: each stored tile is decoded at most once per pass.

Model tiles rarely line up with the stored (JPEG, JPEG 2000, ...) tiles of a slide: a 224 px model
tile on a 240 px stored grid touches up to four stored tiles, and each stored tile is shared by up
to four model tiles. Reading model tiles one region at a time decodes a stored tile once for every
model tile that touches it (about 2x the needed pixels on the test slides), unless a decoded-tile
cache happens to hold it. Here the unit of reading is a *decode unit*: one stored tile, or a small
aligned block of them when stored tiles are tiny or are strips (NDPI's 3968 x 8). The reader
decodes the units a batch of model tiles needs (one batched, multi-threaded `read_regions` call),
cuts the model tiles out of them, and keeps a unit only until the last model tile that uses it has
been cut. Row-major tile order bounds what is kept to about `ceil(read_size / unit_h) + 1` unit
rows of the tissue's width, whatever the slide's height.

Exactness: a unit is read with the same `Slide.read_region` semantics as a tile (level pixels,
white outside the level), and a stored tile decodes to the same pixels whatever region asked for
it, so the cut tiles equal per-tile reads bit for bit (tests/test_pipeline.py checks this on every
test slide). The one reader for which that is false is OpenSlide on a level whose downsample is
not an integer: it renders such a level at a sub-pixel offset that depends on the region's
level-0 origin. Those levels are read tile by tile (OpenSlide's own cache, which the reader sizes
for row-major reads, then avoids repeated decodes).

Raw-tile mode ("raw-tiles", `--decode gpu|cpu`): the units are exactly the level's stored tiles and
come from a slide.nvimgcodec_decoder.TileDecoder (compressed bytes batch-decoded by nvImageCodec)
instead of `read_regions`. On the GPU the units are device tensors and `out` is a device buffer:
the same slicing cuts model tiles on the device. Where the decoder decodes regions (JPEG on the
CPU), each stored tile is decoded only over the bounding box of what the whole grid's model tiles
need of it (the box is planned once, for the grid, so a tile shared by model tiles of two batches
is still decoded once): at the edges of the tissue a model tile often needs a strip of a stored
tile, not all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..config import RuntimeConfig
from ..slide.base import WHITE, level_to_level0

# Units are grown to at least this many level pixels per side (in whole stored tiles) when stored
# tiles are smaller: fewer, larger reads, and strips (NDPI, 8 rows) become tile-height bands.
MIN_UNIT_SIDE = 256
# A unit larger than this (an untiled level stored as full-width strips of a huge image) is not
# worth holding; such levels are read tile by tile.
MAX_UNIT_BYTES = 256 << 20


@dataclass(frozen=True)
class ReadPlan:
    """How a grid's tiles are read: by decode unit (locality) or one region per tile."""

    mode: str                       # "stored-tiles" | "per-tile"
    reason: str
    level: int
    read_size: int
    unit: tuple[int, int] | None    # (w, h) of a decode unit in level pixels; None in per-tile mode
    stored_tile: tuple[int, int]    # (w, h) the reader reports; (0, 0) unknown

    def to_dict(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "level": self.level, "read_size": self.read_size,
                "unit": list(self.unit) if self.unit else None, "stored_tile": list(self.stored_tile)}


def plan_reads(info, level: int, read_size: int, locality: str = "auto") -> ReadPlan:
    """Choose the decode unit for reading `read_size` tiles from `level` of a slide with `info`.

    `locality`: "auto" (stored tiles where exact), "off" (one region per tile), "on" (stored tiles,
    or ValueError saying why not).
    """
    if locality not in ("auto", "on", "off"):
        raise ValueError(f"locality must be auto, on or off, got {locality!r}")
    tw, th = (int(v) for v in info.level_tile_sizes[level])
    width, height = (int(v) for v in info.level_dimensions[level])
    ds = float(info.level_downsamples[level])

    def per_tile(reason: str) -> ReadPlan:
        if locality == "on":
            raise ValueError(f"{info.path}: cannot read along stored tiles: {reason}")
        return ReadPlan("per-tile", reason, level, read_size, None, (tw, th))

    if locality == "off":
        return per_tile("locality off (one region per tile)")
    if tw <= 0 or th <= 0:
        return per_tile(f"the reader does not report a stored tile size for level {level}")
    if info.reader == "openslide" and ds != math.floor(ds):
        return per_tile(f"OpenSlide renders level {level} (downsample {ds:g}) at sub-pixel offsets; "
                        "region reads would not match tile reads exactly")
    uw = tw * max(1, math.ceil(min(read_size, MIN_UNIT_SIDE) / tw))
    uh = th * max(1, math.ceil(min(read_size, MIN_UNIT_SIDE) / th))
    uw, uh = min(uw, max(tw, width)), min(uh, max(th, height))
    if uw * uh * 3 > MAX_UNIT_BYTES:
        return per_tile(f"a decode unit of {uw}x{uh} px is too large to hold")
    note = f"stored {tw}x{th} tiles" + ("" if (uw, uh) == (tw, th) else f", read {uw // tw}x{uh // th} at a time")
    return ReadPlan("stored-tiles", note, level, read_size, (uw, uh), (tw, th))


@dataclass
class ReadCounters:
    """What a pass decoded. `decoded_px` counts the pixels the codec was asked for: whole decode
    units, or their needed boxes where the raw decoder decodes regions; `needed_px` the pixels of
    the model tiles that lie inside the level."""

    tiles: int = 0
    regions: int = 0                # read_region(s) locations requested
    decoded_px: int = 0
    needed_px: int = 0
    max_units_held: int = 0
    decoded_is_estimate: bool = False   # per-tile mode: stored tiles touched, as if nothing were cached

    @property
    def decode_ratio(self) -> float | None:
        return self.decoded_px / self.needed_px if self.needed_px else None


class GridReader:
    """Reads a TileGrid's tiles, in grid order, batch by batch, into caller-provided buffers.

    Not thread-safe: one reader thread drives it (the decoding itself is multi-threaded inside
    `Slide.read_regions`).
    """

    def __init__(self, slide, grid, *, num_workers: int = RuntimeConfig.num_workers, locality: str = "auto",
                 decode=None):
        """`decode`: a slide.decoding.RawDecodeChoice; with a TileDecoder in it, decode units are
        the level's stored tiles, decoded in batches from their raw bytes (whatever `locality`)."""
        self.slide = slide
        self.grid = grid
        self.num_workers = int(num_workers)
        info = slide.info
        self.decode = decode
        self._decoder = decode.decoder if decode is not None else None
        if self._decoder is not None:
            raw = self._decoder.raw
            self.plan = ReadPlan("raw-tiles", f"stored {raw.tile_w}x{raw.tile_h} {raw.codec} tiles, "
                                 f"batch-decoded by {self._decoder.name}", grid.level, grid.read_size,
                                 (raw.tile_w, raw.tile_h), (raw.tile_w, raw.tile_h))
        else:
            self.plan = plan_reads(info, grid.level, grid.read_size, locality)
        self.counters = ReadCounters(decoded_is_estimate=self.plan.mode == "per-tile")
        self._ds = float(info.level_downsamples[grid.level])
        self._width, self._height = (int(v) for v in info.level_dimensions[grid.level])
        coords = np.asarray(grid.coords, np.int64).reshape(-1, 2)
        # level0_to_level, vectorised (same float64 division, same floor)
        self._xl = np.floor(coords[:, 0] / self._ds).astype(np.int64)
        self._yl = np.floor(coords[:, 1] / self._ds).astype(np.int64)
        r = grid.read_size
        inside_w = np.clip(np.minimum(self._xl + r, self._width) - np.maximum(self._xl, 0), 0, None)
        inside_h = np.clip(np.minimum(self._yl + r, self._height) - np.maximum(self._yl, 0), 0, None)
        self._needed = inside_w * inside_h
        self._boxes = None          # [units, 4] needed box (x0, y0, x1, y1) per unit, where regions are decoded
        if self.plan.mode in ("stored-tiles", "raw-tiles"):
            self._prepare_units()
        self._units: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._xl)

    # --- unit bookkeeping ----------------------------------------------------------------------

    def _prepare_units(self) -> None:
        uw, uh = self.plan.unit
        r = self.grid.read_size
        self._ucols = math.ceil(self._width / uw)
        self._urows = math.ceil(self._height / uh)
        self._c0, self._c1 = unit_span(self._xl, r, self._width, uw, self._ucols)
        self._r0, self._r1 = unit_span(self._yl, r, self._height, uh, self._urows)
        # Index of the last tile that needs each unit: a unit is dropped right after that tile.
        units = self._ucols * self._urows
        last_use = np.full(units, -1, np.int64)
        regions = self._decoder is not None and self._decoder.decodes_regions
        if regions:     # the needed box's corners, in the unit's pixels, grown tile by tile
            lo = np.full((units, 2), [uw, uh], np.int64)
            hi = np.zeros((units, 2), np.int64)
        index = np.arange(len(self._xl), dtype=np.int64)
        span_x = int(max(0, (self._c1 - self._c0).max(initial=-1) + 1))
        span_y = int(max(0, (self._r1 - self._r0).max(initial=-1) + 1))
        for dy in range(span_y):
            for dx in range(span_x):
                ok = (self._r0 + dy <= self._r1) & (self._c0 + dx <= self._c1)
                col, row = self._c0[ok] + dx, self._r0[ok] + dy
                ids = row * self._ucols + col
                np.maximum.at(last_use, ids, index[ok])
                if regions:
                    x0, y0, x1, y1 = window_in_unit(self._xl[ok], self._yl[ok], r, col, row, (uw, uh),
                                                    (self._width, self._height))
                    np.minimum.at(lo, ids, np.stack([x0, y0], 1))
                    np.maximum.at(hi, ids, np.stack([x1, y1], 1))
        self._last_use = last_use
        if regions:
            self._boxes = np.concatenate([lo, hi], 1)

    def _tile_units(self, i: int) -> list[int]:
        return [row * self._ucols + col
                for row in range(int(self._r0[i]), int(self._r1[i]) + 1)
                for col in range(int(self._c0[i]), int(self._c1[i]) + 1)]

    # --- reading -------------------------------------------------------------------------------

    def read_into(self, start: int, out) -> int:
        """Read tiles [start, start + len(out)) (clipped to the grid) into `out` [n, R, R, 3] uint8
        (numpy, or a torch tensor on the GPU when the decoder's tiles are there).

        Returns the number of tiles read. Raises SlideError from the reader.
        """
        stop = min(len(self), start + len(out))
        n = stop - start
        if n <= 0:
            return 0
        if self.plan.mode == "per-tile":
            self._read_per_tile(start, stop, out)
        else:
            self._read_units(start, stop, out)
        c = self.counters
        c.tiles += n
        c.needed_px += int(self._needed[start:stop].sum())
        return n

    def _read_per_tile(self, start: int, stop: int, out: np.ndarray) -> None:
        r = self.grid.read_size
        locs = [(int(x), int(y)) for x, y in self.grid.coords[start:stop]]
        for k, tile in enumerate(self.slide.read_regions(locs, self.grid.level, (r, r),
                                                         num_workers=self.num_workers)):
            out[k] = tile
        self.counters.regions += len(locs)
        tw, th = self.plan.stored_tile
        if tw > 0 and th > 0:
            xl, yl = self._xl[start:stop], self._yl[start:stop]
            cols = np.minimum(xl + r, self._width) - 1 - np.maximum(xl, 0)
            nx = np.where(cols >= 0, (np.minimum(xl + r, self._width) - 1) // tw - np.maximum(xl, 0) // tw + 1, 0)
            rows = np.minimum(yl + r, self._height) - 1 - np.maximum(yl, 0)
            ny = np.where(rows >= 0, (np.minimum(yl + r, self._height) - 1) // th - np.maximum(yl, 0) // th + 1, 0)
            self.counters.decoded_px += int((nx * ny).sum()) * tw * th
        else:
            self.counters.decoded_px += int(self._needed[start:stop].sum())

    def _read_units(self, start: int, stop: int, out: np.ndarray) -> None:
        uw, uh = self.plan.unit
        used: set[int] = set()
        for i in range(start, stop):
            used.update(self._tile_units(i))
        # Sorted = row-major: neighbouring units, neighbouring file offsets.
        wanted = sorted(uid for uid in used if uid not in self._units)
        if wanted and self._decoder is not None:
            # Unit ids are the level's tile indices (row-major over the same grid).
            boxes = self._boxes[wanted] if self._boxes is not None else None
            for uid, unit in zip(wanted, self._decoder.decode(wanted, None if boxes is None else boxes.tolist())):
                self._units[uid] = unit
            self.counters.regions += len(wanted)
            self.counters.decoded_px += (len(wanted) * uw * uh if boxes is None else
                                         int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()))
        elif wanted:
            locs = [(level_to_level0((uid % self._ucols) * uw, self._ds),
                     level_to_level0((uid // self._ucols) * uh, self._ds)) for uid in wanted]
            for uid, unit in zip(wanted, self.slide.read_regions(locs, self.grid.level, (uw, uh),
                                                                  num_workers=self.num_workers)):
                self._units[uid] = unit
            self.counters.regions += len(wanted)
            self.counters.decoded_px += len(wanted) * uw * uh
        self.counters.max_units_held = max(self.counters.max_units_held, len(self._units))
        for k, i in enumerate(range(start, stop)):
            self._cut(i, out[k])
        for uid in used:
            if self._last_use[uid] < stop:
                del self._units[uid]

    def _cut(self, i: int, dest: np.ndarray) -> None:
        paste_units(dest, int(self._xl[i]), int(self._yl[i]), self._units, self.plan.unit, self._ucols,
                    self._urows, (int(self._c0[i]), int(self._c1[i])), (int(self._r0[i]), int(self._r1[i])))

    def units_held(self) -> int:
        return len(self._units)

    def close(self) -> None:
        self._units.clear()
        if self._decoder is not None:
            self._decoder.close()


def unit_span(lo, size: int, limit: int, unit: int, count: int):
    """First and last unit index touched by [lo, lo + size) (numpy arrays of starts), clipped to
    units inside the level (a level of `limit` px, `count` units of `unit` px); last < first when
    nothing of the window lies inside the level."""
    lo = np.asarray(lo)
    first = np.maximum(lo, 0) // unit
    last = np.minimum(lo + size, limit) - 1
    last = np.where(last >= np.maximum(lo, 0), last // unit, first - 1)  # empty when nothing inside
    return first, np.minimum(last, count - 1)


def window_in_unit(x, y, size: int, col, row, unit: tuple[int, int], level: tuple[int, int]):
    """(x0, y0, x1, y1): the part of unit (col, row), in its own pixels, that the size x size window
    at level pixel (x, y) covers inside the level (the part outside the level is painted white, not
    decoded). Ints or numpy arrays alike; empty (x1 <= x0 or y1 <= y0) where they do not meet."""
    uw, uh = unit
    ox, oy = x - col * uw, y - row * uh
    return (np.maximum(ox, 0), np.maximum(oy, 0), np.minimum(np.minimum(ox + size, uw), level[0] - col * uw),
            np.minimum(np.minimum(oy + size, uh), level[1] - row * uh))


def paste_units(dest, x0: int, y0: int, units, unit: tuple[int, int], cols: int, rows: int,
                col_span: tuple[int, int], row_span: tuple[int, int]) -> None:
    """Fill `dest` [h, w, 3] with the level window whose corner is level pixel (x0, y0), from the
    decoded units (`units[row * cols + col]`, each [unit_h, unit_w, 3]) of the inclusive column and
    row spans that `unit_span` gives; the parts no unit covers lie outside the level and are white.
    numpy or torch alike (plain slicing), so the GPU path cuts on the device."""
    uw, uh = unit
    h, w = dest.shape[0], dest.shape[1]
    if x0 < 0 or y0 < 0 or x0 + w > cols * uw or y0 + h > rows * uh:
        dest[...] = WHITE
    for row in range(row_span[0], row_span[1] + 1):
        ya, yb = max(y0, row * uh), min(y0 + h, (row + 1) * uh)
        for col in range(col_span[0], col_span[1] + 1):
            xa, xb = max(x0, col * uw), min(x0 + w, (col + 1) * uw)
            dest[ya - y0:yb - y0, xa - x0:xb - x0] = units[row * cols + col][ya - row * uh:yb - row * uh,
                                                                             xa - col * uw:xb - col * uw]


def iter_batches(reader: GridReader, batch_size: int) -> Iterator[np.ndarray]:
    """Convenience for tests and the decode benchmark: fresh arrays, one per batch."""
    r = reader.grid.read_size
    for start in range(0, len(reader), batch_size):
        out = np.empty((min(batch_size, len(reader) - start), r, r, 3), np.uint8)
        reader.read_into(start, out)
        yield out

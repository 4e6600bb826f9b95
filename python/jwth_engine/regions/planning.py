"""Aligned multi-magnification regions: where they are, and how each is read.

A region is an r x r grid of tiles at the lowest chosen magnification. Its sequence holds every tile
of the region at each chosen magnification (n_k = r * m_k / m_0 tiles per side), magnifications
ascending, row-major within each: L = sum_k n_k^2 (r^2 * 21 for 5x, 10x, 20x).

Exact nesting comes from integer geometry in level-0 pixels: the finest magnification's tile spans
`s_f = round(tile_size * mpp_f / slide_mpp)` level-0 px (the same rounding `tiling.plan_tiles` makes),
a tile at magnification m_k spans `s_f * m_max / m_k` and the region `n_0` of those. Every tile
coordinate is therefore an integer and a 20x tile lies exactly inside its 10x and 5x tiles.

Reads: each magnification comes from the coarsest pyramid level at or finer than its µm/px (the
tiler's rule, same tolerance), as ONE block covering the region, resampled to n_k * tile_size px and
cut into tiles. Magnifications that resolve to the same level share one decoded block (on a
single-level slide every magnification is cut from the same level-0 read). The resampling is an
area (box) filter: a 5x pixel is then the mean of the 20x pixels it covers, which is what makes the
pixel nesting checkable to rounding rather than to a filter's ripple.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import field_default
from ..errors import ConfigError, MppError
from ..tiling import LEVEL_MPP_TOLERANCE, choose_level
from .blocks import BlockSource
from .resample import box_resample, cut_tiles, empty_like_tiles

MICRONS_AT_1X = 10.0   # magnification m <-> 10/m µm/px (20x = 0.5, 10x = 1.0, 5x = 2.0)


def magnification_mpp(magnification: float) -> float:
    return MICRONS_AT_1X / float(magnification)


def parse_magnifications(text: str) -> tuple[float, ...]:
    """"5,10,20" -> (5.0, 10.0, 20.0), ascending, each once; ConfigError on anything else."""
    try:
        values = [float(part) for part in str(text).replace("x", "").split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--magnifications {text!r}: expected comma-separated numbers such as 5,10,20") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ConfigError(f"--magnifications {text!r}: expected positive numbers such as 5,10,20")
    if len(set(values)) != len(values):
        raise ConfigError(f"--magnifications {text!r}: a magnification is listed twice")
    return tuple(sorted(values))


def _integer_ratio(a: float, b: float) -> int | None:
    ratio = a / b
    k = round(ratio)
    return k if k >= 1 and abs(ratio - k) < 1e-9 else None


@dataclass(frozen=True)
class RegionLayout:
    """The fixed sequence layout shared by every region of a run (and by the encoder trained on it)."""

    magnifications: tuple[float, ...]   # ascending
    region_tiles: int                    # r: tiles per side at the lowest magnification
    tile_size: int                       # px per tile side at every magnification

    def __post_init__(self):
        if self.region_tiles < 1:
            raise ConfigError(f"--region-tiles must be >= 1, got {self.region_tiles}")
        if self.tile_size < 1:
            raise ConfigError(f"--tile-size must be >= 1, got {self.tile_size}")
        low, high = self.magnifications[0], self.magnifications[-1]
        for m in self.magnifications:
            # Nesting needs whole numbers of finer tiles per coarser tile, both ways.
            if _integer_ratio(m, low) is None or _integer_ratio(high, m) is None:
                raise ConfigError(f"--magnifications {','.join(f'{v:g}' for v in self.magnifications)}: each must be "
                                  f"a whole multiple of the lowest ({low:g}) and divide the highest ({high:g})")

    @property
    def tiles_per_side(self) -> tuple[int, ...]:
        low = self.magnifications[0]
        return tuple(self.region_tiles * _integer_ratio(m, low) for m in self.magnifications)

    @property
    def length(self) -> int:
        return sum(n * n for n in self.tiles_per_side)

    @property
    def is_plain_tiles(self) -> bool:
        """One magnification, one tile per region: the plain tile grid (issue 13's feature layout)."""
        return len(self.magnifications) == 1 and self.region_tiles == 1

    def slots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(magnification index, position index, row, col), each [L] int64, in sequence order."""
        mags, pos, rows, cols = [], [], [], []
        for k, n in enumerate(self.tiles_per_side):
            r, c = np.divmod(np.arange(n * n), n)
            mags.append(np.full(n * n, k))
            pos.append(np.arange(n * n))
            rows.append(r)
            cols.append(c)
        return tuple(np.concatenate(a).astype(np.int64) for a in (mags, pos, rows, cols))

    def to_dict(self) -> dict:
        return {"magnifications": list(self.magnifications), "region_tiles": self.region_tiles,
                "tile_size": self.tile_size, "tiles_per_side": list(self.tiles_per_side),
                "sequence_length": self.length}

    @classmethod
    def from_dict(cls, data: dict) -> "RegionLayout":
        return cls(tuple(float(m) for m in data["magnifications"]), int(data["region_tiles"]), int(data["tile_size"]))

    def describe(self) -> str:
        return f"{'/'.join(f'{m:g}x' for m in self.magnifications)} r={self.region_tiles} tile={self.tile_size} L={self.length}"


@dataclass(frozen=True)
class MagnificationRead:
    magnification: float
    mpp: float
    level: int                 # pyramid level the block comes from
    level_mpp: float
    tiles_per_side: int
    tile_span0: int            # level-0 px one tile of this magnification covers


@dataclass
class RegionPlan:
    layout: RegionLayout
    slide_mpp: float
    reads: tuple[MagnificationRead, ...]
    span0: int                         # level-0 px per region side
    boxes: np.ndarray                  # [R, 2] int64 level-0 (x, y) of each kept region, row-major
    tissue_fraction: np.ndarray        # [R] float32
    num_candidates: int
    grid_shape: tuple[int, int]
    level_downsamples: tuple[float, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.boxes)

    def slot_offsets(self) -> np.ndarray:
        """[L, 2] int64 level-0 offset of each slot's tile from its region's corner."""
        out = []
        for read in self.reads:
            n, span = read.tiles_per_side, read.tile_span0
            r, c = np.divmod(np.arange(n * n), n)
            out.append(np.stack([c * span, r * span], axis=1))
        return np.concatenate(out).astype(np.int64)

    def tile_coords(self) -> np.ndarray:
        """[R, L, 2] int64 level-0 (x, y) of every tile of every region."""
        return self.boxes[:, None, :] + self.slot_offsets()[None, :, :]

    def slot_spans0(self) -> np.ndarray:
        """[L] level-0 px per side of each slot's tile."""
        return np.concatenate([np.full(r.tiles_per_side ** 2, r.tile_span0) for r in self.reads]).astype(np.int64)

    def level_blocks(self) -> list[tuple[int, list[int]]]:
        """(level, indices into `reads`) per distinct level read: one decoded block each."""
        groups: dict[int, list[int]] = {}
        for i, read in enumerate(self.reads):
            groups.setdefault(read.level, []).append(i)
        return sorted(groups.items())

    def block_window(self, index: int, level: int) -> tuple[int, int, int]:
        """(lx, ly, size): the size x size window of `level` that region `index`'s block reads,
        starting at the level pixel that holds the region's corner."""
        x0, y0 = (int(v) for v in self.boxes[index])
        ds = float(self.level_downsamples[level])
        return math.floor(x0 / ds), math.floor(y0 / ds), _block_size(self.span0, ds)

    def block_read_px(self) -> int:
        """Level pixels decoded per region (all its blocks)."""
        return sum(_block_size(self.span0, float(self.level_downsamples[level])) ** 2
                   for level, _ in self.level_blocks())


def _block_size(span0: int, downsample: float) -> int:
    """Level pixels per side a region's block reads (the region's extent, widened to whole pixels)."""
    return max(1, math.ceil(span0 / downsample) + 1)


def plan_regions(slide, *, slide_mpp: float, layout: RegionLayout, tissue=None, min_tissue: float = field_default("min_tissue")) -> RegionPlan:
    """Regions on the lowest magnification's grid, kept when their tissue fraction >= `min_tissue`.

    Raises MppError when the slide cannot provide the finest magnification without upsampling
    (e.g. 40x from a 20x scan).
    """
    info = slide.info
    finest_mpp = magnification_mpp(layout.magnifications[-1])
    if finest_mpp < slide_mpp * (1.0 - LEVEL_MPP_TOLERANCE):
        raise MppError(info.path, f"magnification {layout.magnifications[-1]:g}x needs {finest_mpp:g} µm/px but the "
                                  f"slide's finest level is {slide_mpp:.4g} µm/px (about "
                                  f"{MICRONS_AT_1X / slide_mpp:.3g}x); choose lower --magnifications")
    finest_span = max(1, round(layout.tile_size * finest_mpp / slide_mpp))
    high = layout.magnifications[-1]
    reads = []
    for m, n in zip(layout.magnifications, layout.tiles_per_side):
        mpp = magnification_mpp(m)
        level = choose_level(info.level_downsamples, slide_mpp, mpp)
        reads.append(MagnificationRead(m, mpp, level, slide_mpp * float(info.level_downsamples[level]), n,
                                       finest_span * _integer_ratio(high, m)))
    span0 = reads[0].tile_span0 * reads[0].tiles_per_side

    w0, h0 = info.level_dimensions[0]
    cols, rows = math.ceil(w0 / span0), math.ceil(h0 / span0)
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.int64) * span0, np.arange(cols, dtype=np.int64) * span0,
                         indexing="ij")
    boxes = np.stack([xs.ravel(), ys.ravel()], axis=1)
    if tissue is not None:
        fraction = tissue.fraction(boxes[:, 0], boxes[:, 1], span0, span0)
    else:
        fraction = (np.clip(w0 - boxes[:, 0], 0, span0) / span0) * (np.clip(h0 - boxes[:, 1], 0, span0) / span0)
    fraction = np.asarray(fraction, np.float32)
    keep = fraction >= np.float32(min_tissue)
    return RegionPlan(layout, float(slide_mpp), tuple(reads), int(span0), np.ascontiguousarray(boxes[keep]),
                      fraction[keep], int(len(boxes)), (rows, cols), tuple(float(d) for d in info.level_downsamples))


def read_region_tiles(slide, plan: RegionPlan, index: int, out=None, blocks=None):
    """Every tile of region `index` in sequence order: uint8 [L, T, T, 3].

    Each level's block starts at the level pixel holding the region's corner and the region's exact
    (sub-pixel) extent within it is what gets resampled, so levels with non-integer downsamples, or
    region corners that fall between a coarse level's pixels, stay aligned with level 0. `blocks`
    (regions/blocks.BlockSource) reads the blocks; by default the slide reader does. Blocks read on
    the host give a numpy array; blocks decoded on the GPU stay there and give a tensor on its
    device (resampled with the same arithmetic, regions/resample.py).
    """
    layout, T = plan.layout, plan.layout.tile_size
    if blocks is None:
        blocks = BlockSource(slide)
    x0, y0 = (int(v) for v in plan.boxes[index])
    starts = np.cumsum([0] + [r.tiles_per_side ** 2 for r in plan.reads])
    for level, members in plan.level_blocks():
        ds = plan.level_downsamples[level]
        lx, ly, size = plan.block_window(index, level)
        block = blocks.read(level, lx, ly, size)
        if out is None:
            out = empty_like_tiles(block, (layout.length, T, T, 3))
        extent = plan.span0 / ds
        box = (x0 / ds - lx, y0 / ds - ly, x0 / ds - lx + extent, y0 / ds - ly + extent)
        for i in members:
            n = plan.reads[i].tiles_per_side
            cut_tiles(box_resample(block, box, n * T), n, T, out[starts[i]:starts[i + 1]])
    return out

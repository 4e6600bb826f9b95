"""The tile grid: which pyramid level to read, how many of its pixels make one model tile, and where.

A tile is `tile_size` px at `target_mpp` µm/px. We read it from the coarsest level that is still
at least as fine as the target (within LEVEL_MPP_TOLERANCE), `read_size` level pixels square, and
the model's preprocessing resizes it to `tile_size`. The grid is non-overlapping in that level's
pixels and covers the whole slide; coordinates are reported in level-0 pixels, row-major.

Reads follow the grid row by row, so a stored tile is decoded once per pass as long as the
reader's tile cache holds the stored-tile rows one grid row spans (both readers size theirs for it).

Tissue fraction of a tile is measured over its full box: the part of an edge tile outside the slide
counts as background (it is read as white padding), so partial edge tiles pass the `min_tissue`
filter only when the part inside has enough tissue. Without a tissue mask the whole slide counts
as tissue, and the same rule keeps edge tiles by how much of them lies inside the slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import TilingConfig
from .slide.base import level_to_level0

# A level up to 2% coarser than the target still counts as "at the target": scanners' level
# downsamples are rarely exact powers of two (4.0003, 2.0005), and reading a level 2x or 4x finer
# for a 1-2% difference would multiply decode work for nothing.
LEVEL_MPP_TOLERANCE = 0.02


@dataclass
class TileGrid:
    level: int                      # pyramid level read from
    read_size: int                  # square read size in that level's pixels (before resize)
    tile_size: int                  # model input size in px
    size_level0: tuple[int, int]    # level-0 (w, h) covered by one tile
    coords: np.ndarray              # [N, 2] int64 level-0 (x, y) of each kept tile, row-major
    tissue_fraction: np.ndarray     # [N] float32
    num_candidates: int             # grid positions before tissue filtering
    slide_mpp: float
    target_mpp: float
    level_mpp: float = float("nan")           # µm/px of the level read
    grid_shape: tuple[int, int] = (0, 0)      # (rows, cols) of candidate positions

    def __len__(self) -> int:
        return len(self.coords)


def choose_level(level_downsamples, slide_mpp: float, target_mpp: float) -> int:
    """Coarsest level whose µm/px is <= target (with tolerance); level 0 if none is fine enough."""
    best = 0
    limit = target_mpp * (1.0 + LEVEL_MPP_TOLERANCE)
    for level, ds in enumerate(level_downsamples):
        if slide_mpp * ds <= limit and ds > level_downsamples[best]:
            best = level
    return best


def plan_tiles(
    slide,
    *,
    slide_mpp: float,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    tissue=None,
    min_tissue: float = TilingConfig.min_tissue,
) -> TileGrid:
    """Plan the tile grid of `slide` (see the module docstring). `tissue` is a TissueMask or None."""
    if not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise ValueError(f"slide_mpp must be a positive number, got {slide_mpp}")
    if not (math.isfinite(target_mpp) and target_mpp > 0):
        raise ValueError(f"target_mpp must be a positive number, got {target_mpp}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be within [0, 1], got {min_tissue}")

    info = slide.info
    level = choose_level(info.level_downsamples, slide_mpp, target_mpp)
    ds = float(info.level_downsamples[level])
    level_mpp = slide_mpp * ds
    read_size = max(1, round(tile_size * target_mpp / level_mpp))
    width, height = info.level_dimensions[level]
    cols, rows = math.ceil(width / read_size), math.ceil(height / read_size)

    xs = np.array([level_to_level0(c * read_size, ds) for c in range(cols)], np.int64)
    ys = np.array([level_to_level0(r * read_size, ds) for r in range(rows)], np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    span0 = read_size * ds  # level-0 extent of one tile (float: boxes for the tissue fraction)

    if tissue is not None:
        fraction = tissue.fraction(coords[:, 0], coords[:, 1], span0, span0)
    else:
        w0, h0 = info.level_dimensions[0]
        inside_x = np.clip(w0 - coords[:, 0], 0, span0) / span0
        inside_y = np.clip(h0 - coords[:, 1], 0, span0) / span0
        fraction = inside_x * inside_y
    fraction = np.asarray(fraction, np.float32)
    keep = fraction >= np.float32(min_tissue)

    size0 = int(round(span0))
    return TileGrid(
        level=level,
        read_size=read_size,
        tile_size=tile_size,
        size_level0=(size0, size0),
        coords=np.ascontiguousarray(coords[keep]),
        tissue_fraction=fraction[keep],
        num_candidates=int(len(coords)),
        slide_mpp=float(slide_mpp),
        target_mpp=float(target_mpp),
        level_mpp=float(level_mpp),
        grid_shape=(rows, cols),
    )

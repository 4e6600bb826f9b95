"""Tile grid: level choice, read size, level-0 coordinates, tissue filtering, tiny slides."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jwth_engine.slide import level0_to_level, open_slide, resolve_mpp
from jwth_engine.tiling import choose_level, plan_tiles
from jwth_engine.tissue import detect_tissue


@pytest.fixture(scope="module")
def cmu(cmu_small):
    with open_slide(cmu_small) as slide:
        yield slide, detect_tissue(slide)


def test_cmu_grid_in_level0_pixels(cmu):
    slide, tissue = cmu
    mpp = resolve_mpp(slide.info, None)
    grid = plan_tiles(slide, slide_mpp=mpp, tissue=tissue)
    assert grid.level == 0 and grid.read_size == round(224 * 0.5 / 0.499) == 224 and grid.tile_size == 224
    assert grid.size_level0 == (224, 224) and grid.grid_shape == (14, 10)
    assert grid.num_candidates == math.ceil(2220 / 224) * math.ceil(2967 / 224) == 140
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert grid.tissue_fraction.dtype == np.float32 and (grid.tissue_fraction >= 0.25).all()
    assert 20 < len(grid) < grid.num_candidates  # tissue filtering removed the background
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    assert (x % 224 == 0).all() and (y % 224 == 0).all()
    assert (x >= 0).all() and (x < 2220).all() and (y >= 0).all() and (y < 2967).all()
    order = np.lexsort((x, y))  # row-major: y, then x
    assert (order == np.arange(len(x))).all()
    # the fractions reported are the mask's, and every dropped candidate had less tissue
    np.testing.assert_allclose(grid.tissue_fraction, tissue.fraction(x, y, 224, 224), rtol=1e-6)
    everything = plan_tiles(slide, slide_mpp=mpp, tissue=tissue, min_tissue=0.0)
    assert len(everything) == everything.num_candidates == 140
    kept = {tuple(c) for c in grid.coords}
    dropped = np.array([f for c, f in zip(everything.coords, everything.tissue_fraction) if tuple(c) not in kept])
    assert (dropped < 0.25).all()
    stricter = plan_tiles(slide, slide_mpp=mpp, tissue=tissue, min_tissue=0.9)
    assert len(stricter) < len(grid)


def test_without_a_mask_edge_tiles_count_by_area_inside(cmu):
    slide, _ = cmu
    grid = plan_tiles(slide, slide_mpp=0.499, tissue=None, min_tissue=0.25)
    # last column: 2220 - 9 * 224 = 204 px inside (91 %); last row: 2967 - 13 * 224 = 55 px (25 %)
    assert grid.num_candidates == 140
    assert len(grid) == 140 - 10  # the last row is 55/224 = 24.6 % inside: dropped
    assert grid.coords[:, 0].max() == 9 * 224 and grid.coords[:, 1].max() == 12 * 224


def test_tcga_level_choice_with_mpp_override(tcga_jp2k):
    with open_slide(tcga_jp2k) as slide:
        mpp = resolve_mpp(slide.info, 0.25)
        ds1 = slide.info.level_downsamples[1]
        grid = plan_tiles(slide, slide_mpp=mpp, target_mpp=1.0, tile_size=224, tissue=None)
        assert grid.level == 1  # 0.25 * 2.0005 = 0.50 µm/px: the coarsest level finer than 1.0
        assert grid.level_mpp == pytest.approx(0.25 * ds1)
        assert grid.read_size == round(224 * 1.0 / (0.25 * ds1)) == 448
        assert grid.size_level0 == (round(448 * ds1),) * 2 == (896, 896)
        # level-0 coordinates land exactly on the level-1 grid
        xl = np.array([level0_to_level(x, ds1) for x in grid.coords[:, 0]])
        yl = np.array([level0_to_level(y, ds1) for y in grid.coords[:, 1]])
        assert (xl % 448 == 0).all() and (yl % 448 == 0).all()
        assert grid.num_candidates == math.ceil(2221 / 448) * math.ceil(1783 / 448) == 20
        # default target 0.5: still level 1, tiles read 1:1
        default = plan_tiles(slide, slide_mpp=mpp, tissue=None)
        assert default.level == 1 and default.read_size == 224
        # a finer target than level 1 offers: level 0
        fine = plan_tiles(slide, slide_mpp=mpp, target_mpp=0.25, tissue=None)
        assert fine.level == 0 and fine.read_size == 224 and fine.size_level0 == (224, 224)
        # a read at a planned coordinate is exactly that block of level 1
        level1 = slide.read_region((0, 0), 1, slide.info.level_dimensions[1])
        x0, y0 = grid.coords[6]
        tile = slide.read_region((int(x0), int(y0)), 1, (448, 448))
        xl0, yl0 = level0_to_level(x0, ds1), level0_to_level(y0, ds1)
        np.testing.assert_array_equal(tile[:1783 - yl0, :2221 - xl0], level1[yl0:yl0 + 448, xl0:xl0 + 448])


def test_tissue_filtering_on_tcga(tcga_jp2k):
    with open_slide(tcga_jp2k) as slide:
        tissue = detect_tissue(slide, mpp=0.25)
        grid = plan_tiles(slide, slide_mpp=0.25, tissue=tissue)
        assert 0 < len(grid) < grid.num_candidates


def test_choose_level():
    ds = (1.0, 4.0003, 16.001, 64.01)
    assert choose_level(ds, 0.25, 0.5) == 0      # level 1 is 1.0 µm/px: too coarse
    assert choose_level(ds, 0.25, 1.0) == 1      # 1.00008 µm/px: within the tolerance
    assert choose_level(ds, 0.25, 4.0) == 2
    assert choose_level(ds, 0.25, 0.1) == 0      # finer than the scan: level 0, upsampled
    assert choose_level((1.0, 2.0, 4.0), 0.2525, 0.5) == 1  # 0.505: 1 % over, still level 1
    assert choose_level((1.0, 2.0, 4.0), 0.27, 0.5) == 0    # 0.54: 8 % over, level 0


def test_upsampling_from_a_coarse_scan(cmu):
    slide, _ = cmu
    grid = plan_tiles(slide, slide_mpp=1.0, target_mpp=0.5, tile_size=224, tissue=None)
    assert grid.level == 0 and grid.read_size == 112 and grid.size_level0 == (112, 112)


def test_slide_smaller_than_one_tile(tiny_svs):
    with open_slide(tiny_svs) as slide:
        tissue = detect_tissue(slide)
        grid = plan_tiles(slide, slide_mpp=resolve_mpp(slide.info, None), tissue=tissue)
        assert grid.num_candidates == 1 and len(grid) == 0  # 16 x 16 px of a 224 x 224 tile
        everything = plan_tiles(slide, slide_mpp=0.499, tissue=tissue, min_tissue=0.0)
        assert everything.coords.tolist() == [[0, 0]]
        tile = next(slide.read_regions(everything.coords.tolist(), everything.level,
                                       (everything.read_size,) * 2, num_workers=2))
        assert tile.shape == (224, 224, 3) and (tile[16:] == 255).all()


def test_bad_options(cmu):
    slide, tissue = cmu
    for kwargs in ({"slide_mpp": 0.0}, {"slide_mpp": float("nan")}, {"slide_mpp": 0.5, "target_mpp": -1},
                   {"slide_mpp": 0.5, "tile_size": 0}, {"slide_mpp": 0.5, "min_tissue": 1.5}):
        with pytest.raises(ValueError):
            plan_tiles(slide, tissue=tissue, **kwargs)

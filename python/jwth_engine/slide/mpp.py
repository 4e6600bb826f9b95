"""Microns per pixel: where each reader finds it, and the one rule for accepting it.

No guessing: a slide without an MPP, or with one outside [MPP_MIN, MPP_MAX], is an error that tells
the user to pass `--mpp`. A generic TIFF's resolution tags are often a DPI placeholder (boxes.tiff
claims 72 dpi = 352.8 µm/px), which the range check rejects.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..errors import MppError

MPP_MIN = 0.05   # µm/px; finer than any optical scanner (100x oil is ~0.1)
MPP_MAX = 20.0   # µm/px; coarser is a thumbnail or a placeholder, not a scan

_MICRONS_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "in": 25400.0}


def _positive(value) -> float | None:
    try:
        number = float(str(value).strip().strip('"'))
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def mpp_from_tiff_resolution(unit: str | None, x_resolution, y_resolution) -> tuple[float, float] | None:
    """µm/px from TIFF XResolution/YResolution (pixels per unit); None without a physical unit.

    A ResolutionUnit of "none" (or absent, as cuCIM reports it) carries no physical size.
    """
    scale = _MICRONS_PER_UNIT.get((unit or "").strip().lower())
    xres, yres = _positive(x_resolution), _positive(y_resolution)
    if scale is None or xres is None:
        return None
    return scale / xres, scale / (yres or xres)


def mpp_from_cucim_metadata(metadata: Mapping) -> tuple[tuple[float, float] | None, str]:
    """(mpp, source) from a CuImage's `metadata` dict."""
    aperio = metadata.get("aperio") or {}
    mpp = _positive(aperio.get("MPP"))
    if mpp is not None:
        return (mpp, mpp), "aperio.MPP"
    philips = metadata.get("philips") or {}
    spacing = philips.get("DICOM_PIXEL_SPACING")
    if spacing:
        # DICOM PixelSpacing: row (y) then column (x) spacing, in millimetres.
        parts = spacing if isinstance(spacing, (list, tuple)) else str(spacing).split()
        values = [_positive(p) for p in parts]
        if values and values[0] is not None:
            y_mm = values[0]
            x_mm = values[1] if len(values) > 1 and values[1] is not None else y_mm
            return (x_mm * 1000.0, y_mm * 1000.0), "philips.DICOM_PIXEL_SPACING"
    tiff = metadata.get("tiff") or {}
    mpp_xy = mpp_from_tiff_resolution(tiff.get("resolution_unit"), tiff.get("x_resolution"),
                                      tiff.get("y_resolution"))
    if mpp_xy is not None:
        return mpp_xy, "tiff.XResolution"
    return None, "none"


def mpp_from_openslide_properties(props: Mapping[str, str]) -> tuple[tuple[float, float] | None, str]:
    """(mpp, source) from OpenSlide properties (OpenSlide already folds vendor and TIFF tags in)."""
    mpp_x = _positive(props.get("openslide.mpp-x"))
    mpp_y = _positive(props.get("openslide.mpp-y"))
    if mpp_x is not None or mpp_y is not None:
        return (mpp_x or mpp_y, mpp_y or mpp_x), "openslide.mpp-x"
    return None, "none"


def _check_range(value: float) -> bool:
    return math.isfinite(value) and MPP_MIN <= value <= MPP_MAX


def resolve_mpp(info, override: float | None) -> float:
    """The level-0 µm/px to use: `override` if given, else the slide's own, each range-checked.

    `info` is a SlideInfo. Raises MppError (one line naming the `mpp` setting, `--mpp` on the command line) when there is no usable value.
    """
    if override is not None:
        override = float(override)
        if not _check_range(override):
            raise MppError(info.path, f"mpp {override:g} is outside the plausible range "
                                      f"{MPP_MIN:g}-{MPP_MAX:g} µm/px")
        return override
    if info.mpp is None:
        raise MppError(info.path, "the slide has no microns-per-pixel (MPP) in its metadata; "
                                  "pass mpp (e.g. mpp 0.25 for a 40x scan, mpp 0.5 for 20x)")
    mpp_x, mpp_y = info.mpp
    for value in (mpp_x, mpp_y):
        if not _check_range(value):
            raise MppError(info.path, f"implausible MPP {value:.4g} µm/px from {info.mpp_source} "
                                      f"(expected {MPP_MIN:g}-{MPP_MAX:g}); pass mpp with the real value")
    # Tiles are square in level pixels; non-square pixels (rare) are scored at their mean size.
    return (mpp_x + mpp_y) / 2.0

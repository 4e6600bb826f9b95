"""Headless figure plumbing shared by the picture writers: matplotlib's Agg canvas (never pyplot, so
no display and no global figure state), RGBA arrays out, PNG bytes in and out.

Pictures are composed as numpy arrays where pixels must be exact (a heat map's tiles, an attention
square) and matplotlib draws only text, colour bars and plots around them: `paste` puts an exact
array into the rendered canvas at a known pixel box, which the tests read back.
"""

from __future__ import annotations

import io
import os

import numpy as np

from .atomic import atomic_write_bytes

DPI = 100


def new_figure(width_px: int, height_px: int):
    """A matplotlib Figure of exactly width_px x height_px pixels on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def axes_at(fig, left: int, top: int, width: int, height: int):
    """Axes occupying the pixel box (left, top, width, height) of the figure (origin top-left)."""
    fw, fh = fig.canvas.get_width_height()
    return fig.add_axes([left / fw, 1.0 - (top + height) / fh, width / fw, height / fh])


def figure_rgb(fig, width_px: int, height_px: int) -> np.ndarray:
    """Render the figure; uint8 [height_px, width_px, 3] (padded or cut by the rounding of
    figsize x dpi, at most a pixel, so callers can rely on the size they asked for)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    out = np.full((height_px, width_px, 3), 255, np.uint8)
    h, w = min(height_px, rgba.shape[0]), min(width_px, rgba.shape[1])
    out[:h, :w] = rgba[:h, :w, :3]
    return out


def paste(canvas: np.ndarray, image: np.ndarray, left: int, top: int) -> None:
    h, w = image.shape[:2]
    canvas[top:top + h, left:left + w] = image[..., :3]


def colormap(name: str):
    """A matplotlib colormap by name; ValueError with the valid names when unknown."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; e.g. viridis, magma, inferno, plasma, turbo, RdYlBu_r") from None


def apply_colormap(values: np.ndarray, cmap, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """uint8 RGB of `values` through `cmap` over [vmin, vmax] (clipped)."""
    scaled = np.clip((np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (np.asarray(cmap(scaled))[..., :3] * 255.0 + 0.5).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    # zlib level 1: a 1400 px heat map encodes several times faster than at the default level (and
    # an order of magnitude faster than optimize=True) for ~15 % more bytes; a picture written
    # during scoring is on the slide's critical path.
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 88) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def read_png(path_or_bytes) -> np.ndarray:
    from PIL import Image

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def write_png(rgb: np.ndarray, dest: str | os.PathLike) -> bytes:
    data = png_bytes(rgb)
    atomic_write_bytes(dest, data)
    return data


def resize_rgb(rgb: np.ndarray, width: int, height: int, *, area: bool = False) -> np.ndarray:
    """Lanczos by default; `area` (box filter: each output pixel the mean of what it covers) for a
    shrink where speed matters more than the last bit of sharpness (3x faster)."""
    from PIL import Image

    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    resample = Image.Resampling.BOX if area else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample))

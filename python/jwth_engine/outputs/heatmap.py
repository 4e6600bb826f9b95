"""Slide heat map: a class's tile probabilities over the slide thumbnail, as one PNG.

Tiles are filled at their exact level-0 footprint scaled to the picture (x0 = round(x * s),
x1 = round((x + w) * s), so neighbours share an edge and never overlap); pixels outside the tissue
mask are washed out towards white so colour reads as "scored tissue"; the tissue outline is drawn
on top. The colour scale is fixed to [0, 1] (a probability) by default, so two slides' maps compare
directly, and the colour bar marks where this slide's tiles fall; `scale_range` stretches it to
this slide's own range instead (hot spots within a slide stand out; maps no longer compare).

`compose_heatmap` builds the exact pixel layer (what the tests check) from `heatmap_base` (the
slide alone) and `tint_tiles` (the scores); `render_heatmap` frames it
with a title and a colour bar into a PNG whose long side is `size` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .figures import apply_colormap, axes_at, colormap, figure_rgb, new_figure, paste

DEFAULT_SIZE = 1200
DEFAULT_COLORMAP = "viridis"
DEFAULT_OPACITY = 0.7
BACKGROUND_WASH = 0.6          # fraction of white mixed into non-tissue pixels
OUTLINE_RGB = (20, 20, 20)
MIN_SIZE = 200


@dataclass
class HeatmapLayout:
    """Pixel geometry of the PNG: the slide picture sits at (left, top) with size (width, height)."""

    png_width: int
    png_height: int
    left: int
    top: int
    width: int
    height: int
    scale: float                 # picture px per level-0 px
    font: float                  # points

    @property
    def image_box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.width, self.height


def heatmap_layout(slide_width: int, slide_height: int, size: int) -> HeatmapLayout:
    """Where the slide picture goes in a PNG whose long side is `size` px (title above, colour bar
    to the right)."""
    if size < MIN_SIZE:
        raise ValueError(f"heat map size must be >= {MIN_SIZE} px, got {size}")
    font = max(7.0, size / 110.0)
    title_h = int(round(font * 4.6))
    margin = int(round(font * 0.8))
    bar_w = int(round(font * 11.0))
    avail_w, avail_h = size - margin - bar_w, size - title_h - margin
    # The tighter axis fills its space exactly, so that side of the PNG is `size` and the other
    # no longer.
    scale = min(avail_w / slide_width, avail_h / slide_height)
    width = max(1, int(round(slide_width * scale)))
    height = max(1, int(round(slide_height * scale)))
    png_w, png_h = width + margin + bar_w, height + title_h + margin
    return HeatmapLayout(png_w, png_h, margin, title_h, width, height, scale, font)


def tissue_on_picture(mask: np.ndarray, downsample: float, scale: float, width: int, height: int) -> np.ndarray:
    """The tissue mask (mask px = `downsample` level-0 px) sampled at each picture pixel's centre."""
    if mask.size == 0:
        return np.zeros((height, width), bool)
    cols = np.clip(((np.arange(width) + 0.5) / scale / downsample).astype(np.int64), 0, mask.shape[1] - 1)
    rows = np.clip(((np.arange(height) + 0.5) / scale / downsample).astype(np.int64), 0, mask.shape[0] - 1)
    return mask[np.ix_(rows, cols)]


def tile_boxes(x, y, w, h, scale: float, width: int, height: int) -> np.ndarray:
    """[N, 4] int (x0, y0, x1, y1) picture-pixel boxes of level-0 tiles, clipped to the picture."""
    x, y, w, h = (np.asarray(a, np.float64) for a in (x, y, w, h))
    boxes = np.stack([np.round(x * scale), np.round(y * scale),
                      np.round((x + w) * scale), np.round((y + h) * scale)], axis=1).astype(np.int64)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    return boxes


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels on the tissue boundary, `thickness` px wide, inside the tissue."""
    from scipy import ndimage

    if not mask.any():
        return np.zeros_like(mask)
    inner = ndimage.binary_erosion(mask, iterations=max(1, thickness), border_value=0)
    return mask & ~inner


@dataclass
class HeatmapLayers:
    rgb: np.ndarray              # uint8 [H, W, 3]: the composed picture
    covered: np.ndarray          # bool [H, W]: pixels coloured by a tile
    values: np.ndarray           # float32 [H, W]: the tile value drawn there (NaN elsewhere)
    tissue: np.ndarray           # bool [H, W]: tissue mask on the picture


@dataclass
class HeatmapBase:
    """What the picture needs before any tile is scored: the thumbnail with the background washed
    out, the tissue mask on the picture and its outline (scoring/visuals.py makes it while the slide
    streams)."""

    rgb: np.ndarray              # uint8 [H, W, 3]
    tissue: np.ndarray           # bool [H, W]
    outline: np.ndarray          # bool [H, W]


def heatmap_base(thumbnail: np.ndarray, tissue_mask: np.ndarray, mask_downsample: float, scale: float,
                 *, outline_px: int = 2) -> HeatmapBase:
    height, width = thumbnail.shape[:2]
    tissue = tissue_on_picture(tissue_mask, mask_downsample, scale, width, height)
    # Whole-picture arithmetic and masked copies instead of boolean fancy indexing (which gathers
    # the selected pixels out and scatters them back): the picture is over a megapixel.
    washed = (thumbnail * np.float32(1.0 - BACKGROUND_WASH) + np.float32(255.0 * BACKGROUND_WASH)
              + np.float32(0.5)).astype(np.uint8)
    rgb = thumbnail.copy()
    np.copyto(rgb, washed, where=~tissue[..., None])
    return HeatmapBase(rgb, tissue, outline(tissue, outline_px))


def tint_tiles(base: HeatmapBase, scale: float, tiles_xywh, values: np.ndarray, *, cmap: str = DEFAULT_COLORMAP,
               opacity: float = DEFAULT_OPACITY, scale_range: tuple[float, float] = (0.0, 1.0)) -> HeatmapLayers:
    """Tiles coloured by `values` through `cmap` at `opacity` over the base, tissue outline on top."""
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"opacity must be within (0, 1], got {opacity}")
    height, width = base.tissue.shape
    values = np.asarray(values, np.float32)
    value_layer = np.full((height, width), np.nan, np.float32)
    colour_layer = np.zeros((height, width, 3), np.uint8)
    if len(values):
        colours = apply_colormap(values, colormap(cmap), *scale_range)          # [N, 3] one per tile
        x, y, w, h = tiles_xywh
        for (x0, y0, x1, y1), v, colour in zip(tile_boxes(x, y, w, h, scale, width, height), values, colours):
            value_layer[y0:y1, x0:x1] = v
            colour_layer[y0:y1, x0:x1] = colour
    covered = ~np.isnan(value_layer)
    tinted = (base.rgb * np.float32(1.0 - opacity) + colour_layer * np.float32(opacity)
              + np.float32(0.5)).astype(np.uint8)
    rgb = base.rgb.copy()
    np.copyto(rgb, tinted, where=covered[..., None])
    rgb[base.outline] = OUTLINE_RGB
    return HeatmapLayers(rgb, covered, value_layer, base.tissue)


def compose_heatmap(thumbnail: np.ndarray, tissue_mask: np.ndarray, mask_downsample: float, scale: float,
                    tiles_xywh, values: np.ndarray, *, cmap: str = DEFAULT_COLORMAP,
                    opacity: float = DEFAULT_OPACITY, outline_px: int = 2,
                    scale_range: tuple[float, float] = (0.0, 1.0)) -> HeatmapLayers:
    """The picture: thumbnail (already at the picture size), background washed out, tiles coloured
    by `values` through `cmap` at `opacity`, tissue outline on top."""
    base = heatmap_base(thumbnail, tissue_mask, mask_downsample, scale, outline_px=outline_px)
    return tint_tiles(base, scale, tiles_xywh, values, cmap=cmap, opacity=opacity, scale_range=scale_range)


def render_heatmap(layers: HeatmapLayers, layout: HeatmapLayout, *, title: str, subtitle: str,
                   class_name: str, values: np.ndarray, cmap: str = DEFAULT_COLORMAP,
                   warning: str | None = None, scale_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """The framed PNG pixels: title (slide, class), subtitle (model), optional warning line,
    the composed picture at layout.image_box, a colour bar with this slide's tile range.

    matplotlib draws only the title strip and the colour-bar column, as two small figures: a
    figure the size of the whole PNG would spend most of its time filling white pixels."""
    import matplotlib.colorbar
    from matplotlib.colors import Normalize

    fs = layout.font
    canvas = np.full((layout.png_height, layout.png_width, 3), 255, np.uint8)
    strip = new_figure(layout.png_width, layout.top)
    x0 = layout.left / layout.png_width

    def at(px: float) -> float:
        return 1 - px / layout.top

    strip.text(x0, at(0.3 * fs), title, ha="left", va="top", fontsize=fs * 1.25, weight="bold")
    strip.text(x0, at(2.0 * fs), subtitle, ha="left", va="top", fontsize=fs * 0.9, color="#333333")
    if warning:
        strip.text(x0, at(3.2 * fs), warning, ha="left", va="top", fontsize=fs * 0.9, color="#b00020",
                   weight="bold")
    paste(canvas, figure_rgb(strip, layout.png_width, layout.top), 0, 0)

    column_left = layout.left + layout.width
    column_w = layout.png_width - column_left
    bar_height = int(min(layout.height, max(layout.height * 0.6, fs * 20)))
    column_h = min(layout.height, bar_height + int(4 * fs))
    column = new_figure(column_w, column_h)
    cax = axes_at(column, int(round(fs * 1.2)), 0, int(round(fs * 1.6)), bar_height)
    stretched = tuple(scale_range) != (0.0, 1.0)
    bar = matplotlib.colorbar.ColorbarBase(cax, cmap=colormap(cmap), norm=Normalize(*scale_range),
                                           orientation="vertical")
    bar.set_label(f"P({class_name}) per tile" + (", this slide's range" if stretched else ""), fontsize=fs)
    cax.tick_params(labelsize=fs * 0.85)
    values = np.asarray(values, np.float64)
    if values.size and not stretched:
        lo, hi = float(values.min()), float(values.max())
        # Where this slide's tiles fall on the fixed scale: a bracket left of the bar.
        edge = cax.get_yaxis_transform()
        cax.plot([-0.35, -0.35], [lo, hi], color="black", linewidth=2.0, transform=edge, clip_on=False)
        for v in (lo, hi):
            cax.plot([-0.6, -0.05], [v, v], color="black", linewidth=1.5, transform=edge, clip_on=False)
        cax.text(0.0, -0.015, f"tiles\n{lo:.3f}–{hi:.3f}", transform=cax.transAxes, ha="left",
                 va="top", fontsize=fs * 0.8)
    paste(canvas, figure_rgb(column, column_w, column_h), column_left, layout.top)
    paste(canvas, layers.rgb, layout.left, layout.top)
    return canvas


def no_tissue_message(slide_name: str) -> str:
    return f"{slide_name}: no tissue tiles were scored, so there is no heat map to draw"


"""Attention inside tiles: keep the JWTH head's attention maps of the K highest- and K lowest-scoring
tiles while a slide is scored, store them compactly, and draw them over the tiles.

`AttentionCollector` is a pipeline batch observer (see pipeline/stages.py). For every class it keeps
a running top-K and bottom-K of tile probabilities with their maps, as float16 on the device the
head runs on: memory is classes x 2K x heads x patches, whatever the slide's size, and nothing is
copied to the host per batch (no synchronisation added to the scoring loop). Which class matters
is known only at the end (the slide's prediction), hence one selection per class.

Maps are the head's softmax over patch tokens only (class and register tokens are excluded by the
kernel), reshaped to the backbone's patch grid: input_size / patch_size per side (16 x 16 for
patch-14 presets at 224 px, 14 x 14 for patch-16 presets). Drawn on the tile as the model saw it
(resized to input_size), patch (r, c) covers pixels [r*p, (r+1)*p) x [c*p, (c+1)*p).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .atomic import atomic_path
from .figures import apply_colormap, colormap

ATTENTION_SCHEMA = "jwth-engine/attention/v1"
OVERLAY_COLORMAP = "inferno"
OVERLAY_ALPHA = 0.75            # opacity where a map peaks; it falls to 0 where the map is lowest


class AttentionCollector:
    """Batch observer keeping, per class, the top-k and bottom-k tiles by probability with their
    attention maps [H, P] (float16). Call `selection(class_index)` after scoring."""

    def __init__(self, k: int, num_classes: int):
        if k < 1:
            raise ValueError(f"--attention must be >= 1, got {k}")
        self.k, self.num_classes = int(k), int(num_classes)
        self._top = self._bottom = None          # (scores [C, k'], rows [C, k'], maps [C, k', H, P])

    def __call__(self, first_row: int, tokens, head_output, probs) -> None:
        import torch

        attn = head_output.attn
        if attn is None:
            raise ValueError("the head returned no attention weights; the attention collector needs "
                             "a JWTH head run with need_attn=True")
        scores = probs.detach().float().t()                                  # [C, B]
        rows = torch.arange(first_row, first_row + scores.shape[1], device=scores.device)
        rows = rows.unsqueeze(0).expand(self.num_classes, -1)
        maps = attn.detach().to(torch.float16).unsqueeze(0).expand(self.num_classes, -1, -1, -1)
        self._top = self._merge(self._top, scores, rows, maps, largest=True)
        self._bottom = self._merge(self._bottom, scores, rows, maps, largest=False)

    def _merge(self, kept, scores, rows, maps, *, largest: bool):
        import torch

        if kept is not None:
            scores = torch.cat([kept[0], scores], dim=1)
            rows = torch.cat([kept[1], rows], dim=1)
            maps = torch.cat([kept[2], maps], dim=1)
        k = min(self.k, scores.shape[1])
        # Ties go to the earlier row (stable order), so a rerun picks the same tiles.
        order = torch.sort(scores, dim=1, descending=largest, stable=True).indices[:, :k]
        classes = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1)
        return scores[classes, order], rows[classes, order], maps[classes, order].contiguous()

    @property
    def empty(self) -> bool:
        return self._top is None

    def selection(self, class_index: int) -> "AttentionSelection":
        """Top-k (highest first) then bottom-k (lowest first) tiles of one class; a tile in both
        lists (a slide with fewer than 2k tiles) appears once, as a top tile."""
        if self._top is None:
            raise ValueError("no batch was observed")
        top_s, top_r, top_m = (t[class_index].cpu() for t in self._top)
        bot_s, bot_r, bot_m = (t[class_index].cpu() for t in self._bottom)
        taken = set(top_r.tolist())
        keep = [i for i, r in enumerate(bot_r.tolist()) if r not in taken]
        rows = np.concatenate([top_r.numpy(), bot_r.numpy()[keep]]).astype(np.int64)
        scores = np.concatenate([top_s.numpy(), bot_s.numpy()[keep]]).astype(np.float32)
        maps = np.concatenate([top_m.numpy(), bot_m.numpy()[keep]]).astype(np.float16)
        kinds = np.array(["top"] * len(top_r) + ["bottom"] * len(keep))
        ranks = np.concatenate([np.arange(1, len(top_r) + 1), np.arange(1, len(bot_r) + 1)[keep]]).astype(np.int64)
        return AttentionSelection(rows, kinds, ranks, scores, maps)


@dataclass
class AttentionSelection:
    rows: np.ndarray             # [K] int64: rows of the tile grid / Parquet table
    kinds: np.ndarray            # [K] "top" | "bottom"
    ranks: np.ndarray            # [K] 1-based rank within its kind
    scores: np.ndarray           # [K] float32: the chosen class's probability
    maps: np.ndarray             # [K, H, P] float16

    def grid_maps(self, grid: int) -> np.ndarray:
        """[K, H, grid, grid]: patch p at row p // grid, column p % grid (the ViT's row-major order)."""
        k, h, p = self.maps.shape
        if p != grid * grid:
            raise ValueError(f"attention maps have {p} patch tokens, not a {grid} x {grid} patch grid")
        return self.maps.reshape(k, h, grid, grid)


def write_attention_npz(dest: str | os.PathLike, selection: AttentionSelection, *, grid: int, patch_size: int,
                        tile_size: int, class_name: str, x: np.ndarray, y: np.ndarray,
                        size_level0: tuple[int, int], level: int, read_size: int) -> None:
    """NAME.attention.npz (atomic; plain arrays, loadable with allow_pickle=False)."""
    arrays = {
        "schema": np.array(ATTENTION_SCHEMA), "class_name": np.array(class_name),
        "rows": selection.rows, "kind": selection.kinds.astype("U6"), "rank": selection.ranks,
        "prob": selection.scores, "x": np.asarray(x, np.int64), "y": np.asarray(y, np.int64),
        "attn": selection.grid_maps(grid), "patch_size": np.int64(patch_size), "tile_size": np.int64(tile_size),
        "grid": np.int64(grid), "size_level0": np.asarray(size_level0, np.int64), "level": np.int64(level),
        "read_size": np.int64(read_size),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buffer.getvalue())


def read_attention_npz(path: str | os.PathLike) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def upsample_map(attn_map: np.ndarray, patch_size: int) -> np.ndarray:
    """[g, g, ...] -> [g*p, g*p, ...]: each patch's value fills its p x p square."""
    return np.repeat(np.repeat(np.asarray(attn_map, np.float32), patch_size, axis=0), patch_size, axis=1)


def attention_overlay(tile_rgb: np.ndarray, attn_map: np.ndarray, patch_size: int, *,
                      cmap: str = OVERLAY_COLORMAP, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The tile (model input size, g*p square) with the map stretched from its minimum to its
    maximum and blended on top with an opacity that grows with the weight: where the head looks
    away the tissue shows through unchanged, where it looks most the colour covers it."""
    grid = np.asarray(attn_map, np.float32)
    side = grid.shape[0] * patch_size
    if (side, grid.shape[1] * patch_size) != tuple(tile_rgb.shape[:2]):
        raise ValueError(f"attention grid {grid.shape} x patch size {patch_size} does not match the tile "
                         f"{tile_rgb.shape[:2]}")
    low, high = float(grid.min()), float(grid.max())
    level = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
    # Colour and opacity per patch, then each patch's p x p square (no smoothing across patches).
    colours = apply_colormap(level, colormap(cmap)).astype(np.float32)
    weight = (alpha * level)[..., None]
    tint = upsample_map(colours * weight, patch_size)
    keep = upsample_map(1.0 - weight, patch_size)
    return (tile_rgb.astype(np.float32) * keep + tint + 0.5).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)   # Pillow's bundled scalable font: nothing to install


def render_attention_panel(tile_rgb: np.ndarray, maps: np.ndarray, patch_size: int, *, title: str) -> np.ndarray:
    """One selected tile: [tile | mean over heads | heads in two rows at half size], titled.

    Every map is stretched over its own range (softmax weights of different heads are not on one
    scale). Drawn with PIL alone: one panel per selected tile is written while the slide is
    scored, so it must cost milliseconds, not a matplotlib figure.
    """
    from PIL import ImageDraw

    heads = maps.shape[0]
    size = tile_rgb.shape[0]
    small = size // 2
    per_row = max(1, (heads + 1) // 2)
    header, label_h, gap = 40, 18, 6
    heads_left = 3 * gap + 2 * size
    width = heads_left + per_row * (small + 2) + gap
    height = header + label_h + max(size, 2 * (small + 2)) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill=(0, 0, 0), font=_font(15))
    draw.text((gap, 23), f"each map stretched from its lowest to its highest weight; patch grid "
              f"{maps.shape[-1]} x {maps.shape[-1]} of {patch_size} px", fill=(70, 70, 70), font=_font(11))
    for left, text in ((gap, "tile"), (2 * gap + size, f"mean of {heads} heads"), (heads_left, "per head")):
        draw.text((left, header + 2), text, fill=(0, 0, 0), font=_font(12))
    top = header + label_h
    canvas.paste(Image.fromarray(tile_rgb), (gap, top))
    mean = attention_overlay(tile_rgb, maps.astype(np.float32).mean(axis=0), patch_size)
    canvas.paste(Image.fromarray(mean), (2 * gap + size, top))
    for i in range(heads):
        col, row = i % per_row, i // per_row
        overlay = Image.fromarray(attention_overlay(tile_rgb, maps[i], patch_size))
        canvas.paste(overlay.resize((small, small), Image.Resampling.BOX),
                     (heads_left + col * (small + 2), top + row * (small + 2)))
    return np.asarray(canvas)

"""Area filtering of a level block to a magnification's tiles: Pillow on the host, its arithmetic in
torch where the block is a tensor (on the GPU, after the raw-tile decode).

A region's tiles at one magnification are the area (box) filter of the region's exact sub-pixel
extent within a level block. On the host Pillow does it: `Image.reduce` for a whole-pixel extent at
an integer factor (the common case: 5/10/20x from a 20x or 40x level), `Image.resize(BOX, box=...)`
otherwise (non-integer downsamples, region corners between a coarse level's pixels).

A block decoded on the GPU stays there: `box_resample` on a tensor repeats Pillow's integer
arithmetic step for step, so the tiles equal the host path's bit for bit (tested against Pillow on
random blocks and on the test slides' region plans):
* reduce (libImaging/Reduce.c): per output pixel the sum s of its N x N source pixels, then
  ((s + N*N // 2) * M) >> 24 in 32-bit unsigned arithmetic, M = (uint32)(2^32 / (256 * N*N))
  computed in single precision;
* resize with BOX (libImaging/Resample.c): per axis, the source pixels whose centres fall in the
  output pixel's support get equal weight, normalised, then fixed point with 22 fraction bits; a
  horizontal pass over the rows the vertical pass needs, rounded and clipped to uint8, then the
  vertical pass, rounded and clipped again. The box arrives in single precision, as Pillow's C
  side takes it.
"""

from __future__ import annotations

import math

import numpy as np

_PRECISION_BITS = 22           # Pillow's fixed-point fraction bits for 8-bit images (32 - 8 - 2)


def box_resample(block, box: tuple[float, float, float, float], size: int):
    """Area-filter the sub-pixel `box` (left, top, right, bottom, in block pixels) of `block`
    (uint8 [H, W, 3], numpy or torch) to size x size, the same type and device as `block`."""
    left, top, right, bottom = box
    factor = (right - left) / size
    whole = left == int(left) and top == int(top) and factor == int(factor) and (bottom - top) == (right - left)
    if isinstance(block, np.ndarray):
        from PIL import Image

        if whole:
            crop = block[int(top):int(bottom), int(left):int(right)]
            if factor == 1:
                return crop
            return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).reduce(int(factor)))  # box mean, fixed point
        return np.asarray(Image.fromarray(block).resize((size, size), Image.Resampling.BOX, box=box, reducing_gap=None))
    if whole:
        crop = block[int(top):int(bottom), int(left):int(right)]
        return crop if factor == 1 else _reduce_torch(crop, int(factor))
    return _resize_box_torch(block, box, size)


def cut_tiles(image, n: int, tile: int, out) -> None:
    """Row-major n x n tiles of `image` [n*tile, n*tile, 3] into out[n*n, tile, tile, 3] (numpy or torch)."""
    tiles = image.reshape(n, tile, n, tile, 3)
    tiles = tiles.transpose(0, 2, 1, 3, 4) if isinstance(tiles, np.ndarray) else tiles.permute(0, 2, 1, 3, 4)
    out[:] = tiles.reshape(n * n, tile, tile, 3)


def empty_like_tiles(like, shape):
    """uint8 array of `shape` where `like` lives: numpy on the host, else a tensor on its device."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, np.uint8)
    import torch

    return torch.empty(shape, dtype=torch.uint8, device=like.device)


def _reduce_torch(crop, factor: int):
    """Pillow's `Image.reduce(factor)` of a uint8 [h, w, 3] tensor whose sides are multiples of factor."""
    import torch

    h, w, _ = crop.shape
    if h % factor or w % factor:
        raise ValueError(f"a {w}x{h} crop does not divide by {factor}")
    count = factor * factor
    multiplier = int(np.float32(2.0 ** 32) / np.float32(256 * count))      # float division, then truncation
    sums = crop.reshape(h // factor, factor, w // factor, factor, 3).sum(dim=(1, 3), dtype=torch.int64)
    return ((((sums + count // 2) * multiplier) & 0xFFFFFFFF) >> 24).to(crop.dtype)


def box_coefficients(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's BOX filter taps along one axis: (first source index [out], tap count [out],
    fixed-point weights [out, k], zero past each count).

    Mirrors precompute_coeffs and normalize_coeffs_8bpc: in0 and in1 in single precision, the rest
    in double, C's truncating casts."""
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale                                    # BOX's support (0.5), scaled
    ksize = int(math.ceil(support)) * 2 + 1
    center = float(in0) + (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    x = np.arange(ksize)[None, :]
    at = (x + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)
    taps = ((at > -0.5) & (at <= 0.5) & (x < count[:, None])).astype(np.float64)
    total = taps.sum(axis=1, keepdims=True)
    taps = np.divide(taps, total, out=taps, where=total != 0)
    weights = np.trunc(0.5 + taps * (1 << _PRECISION_BITS)).astype(np.int64)
    return first, count, weights


def _resize_box_torch(block, box, size: int):
    """Pillow's `Image.resize((size, size), BOX, box=box)` of a uint8 [H, W, 3] tensor."""
    height, width, _ = block.shape
    left, top, right, bottom = box
    ys, y_count, wy = box_coefficients(height, top, bottom, size)
    xs, _, wx = box_coefficients(width, left, right, size)
    row0, row1 = int(ys[0]), int((ys + y_count).max())          # only the rows the vertical pass reads
    across = _pass(block[row0:row1], xs, wx, dim=1)                # [rows, size, 3]
    return _pass(across, ys - row0, wy, dim=0)                     # [size, size, 3]


def _pass(src, first: np.ndarray, weights: np.ndarray, *, dim: int):
    """One Pillow pass along `dim` (0: rows, 1: columns) of uint8 `src`:
    clip8((2^21 + sum_j src[first + j] * w_j) >> 22), in int64."""
    import torch

    length, taps = src.shape[dim], weights.shape[1]
    index = torch.as_tensor(np.minimum(first[:, None] + np.arange(taps)[None, :], length - 1),
                            device=src.device)                     # zero-weight taps may point past the end
    weight = torch.as_tensor(weights, device=src.device)
    shape = (-1, 1, 1) if dim == 0 else (1, -1, 1)
    values = src.to(torch.int64)
    acc = torch.full((), 1 << (_PRECISION_BITS - 1), dtype=torch.int64, device=src.device)
    for j in range(taps):
        acc = acc + values.index_select(dim, index[:, j]) * weight[:, j].view(shape)
    return torch.clamp(acc >> _PRECISION_BITS, 0, 255).to(torch.uint8)

"""Tile preprocessing: uint8 RGB tiles [N, h, w, 3] -> model input [N, 3, S, S].

`preprocess_reference` is the definition: torch's antialiased bilinear resize
(`interpolate(mode="bilinear", antialias=True, align_corners=False)`) in float64, then
`(x / 255 - mean) / std` per channel, cast to the requested dtype. `mean`/`std` are in [0, 1] units,
as in timm's data configs.

`preprocess` is the fast path, one fused native kernel: on the GPU (CUDA) when the target device is
a GPU, so only uint8 crosses the bus; on the CPU a C++/OpenMP kernel. Same filter, fp32 arithmetic
(weights normalised per output pixel like torch's), and no resize at all when the tiles already have
the model size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _native

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size: must be positive, got {size!r}")
    return h, w


def _check_tiles(tiles) -> torch.Tensor:
    if isinstance(tiles, np.ndarray):
        tiles = torch.from_numpy(tiles)
    if not isinstance(tiles, torch.Tensor):
        raise TypeError(f"tiles: expected a torch.Tensor or numpy array, got {type(tiles).__name__}")
    if tiles.dtype != torch.uint8:
        raise TypeError(f"tiles: expected uint8 pixels, got {tiles.dtype}")
    if tiles.dim() != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles: expected [N, height, width, 3] (RGB, channels last), got {list(tiles.shape)}")
    return tiles


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std: expected 3 values each, got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std: values must be > 0, got {std}")
    return mean, std


def preprocess_reference(tiles, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition (float64 throughout, cast at the end); slow, for tests."""
    tiles = _check_tiles(tiles)
    out_h, out_w = _size_hw(size)
    mean, std = _check_norm(mean, std)
    x = tiles.permute(0, 3, 1, 2).to(torch.float64)
    if x.shape[-2:] != (out_h, out_w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return ((x / 255.0 - m) / s).to(dtype)


def preprocess(tiles, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 tiles [N, h, w, 3] (torch or numpy) -> [N, 3, size, size] of `dtype` on `device`.

    `device` defaults to the tiles' device; CPU tiles bound for a GPU are copied as uint8 first.
    """
    tiles = _check_tiles(tiles)
    out_h, out_w = _size_hw(size)
    mean, std = _check_norm(mean, std)
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d) for d in _OUT_DTYPES]}, got {dtype}")
    device = torch.device(device) if device is not None else tiles.device
    C = _native.load()
    if tiles.device != device:
        tiles = tiles.to(device, non_blocking=tiles.device.type == "cpu" and tiles.is_pinned())
    tiles = tiles.contiguous()
    out = torch.empty(tiles.shape[0], 3, out_h, out_w, dtype=dtype, device=device)
    if device.type == "cuda":
        if not C.cuda_compiled():
            from .errors import BackendUnavailable

            raise BackendUnavailable("jwth_engine._C was built without CUDA kernels; " + _native.REBUILD_HINT)
        stream, threads = _native.cuda_stream_handle(device), 0
    else:
        stream, threads = 0, torch.get_num_threads()
    C.preprocess(_native.array_arg(tiles), _native.array_arg(out), mean, std, stream=stream, num_threads=threads)
    return out

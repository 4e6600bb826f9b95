"""Fused tile preprocessing (native CPU and CUDA) against the float64 reference.

The reference is torch's antialiased bilinear resize (`interpolate(antialias=True,
align_corners=False)`) in float64, then (x / 255 - mean) / std. Sizes cover identity (224 -> 224,
resize skipped), integer downscale (448 -> 224, 512 -> 256), fractional downscale (300 -> 224),
upsampling (200 -> 224, 5x3 -> 224), and non-square odd inputs (97x131 -> 64, 300x260 -> 224).

Tolerance, ||out - ref|| / ||ref||: 1e-5 for float32 (measured ~2e-7); for float16 / bfloat16 the
output rounding dominates (half an ulp: ~2e-4 / ~1.7e-3 measured), so 1e-3 / 8e-3. Outputs are
poisoned with NaN before each run. CUDA tests skip at run time when no GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jwth_engine import _native
from jwth_engine.preprocess import preprocess, preprocess_reference

from _gpu import gpu_skip

C_ = _native.load()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [((224, 224), 224), ((448, 448), 224), ((300, 300), 224), ((200, 200), 224), ((512, 512), 256),
         ((97, 131), 64), ((300, 260), 224), ((5, 3), 224)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tiles(n, h, w, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def rel(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def run_poisoned(t: torch.Tensor, size: int, dtype, device) -> torch.Tensor:
    out = torch.full((t.shape[0], 3, size, size), float("nan"), dtype=dtype, device=device)
    stream = _native.cuda_stream_handle(out.device) if out.device.type == "cuda" else 0
    src = t.to(device).contiguous()
    C_.preprocess(_native.array_arg(src), _native.array_arg(out), MEAN, STD, stream=stream)
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    return out


def check(hw, size, dtype, batch, device):
    t = tiles(batch, *hw)
    ref = preprocess_reference(t, size, MEAN, STD, torch.float64)
    out = run_poisoned(t, size, dtype, device)
    assert torch.isfinite(out.float()).all()
    assert rel(out, ref) <= TOL[dtype], (hw, size, dtype, rel(out, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hw,size", SIZES, ids=lambda v: str(v))
def test_cpu_matches_reference(hw, size, dtype):
    check(hw, size, dtype, batch=3, device="cpu")


@pytest.mark.parametrize("batch", [1, 8])
def test_cpu_batch_sizes_and_isas(batch):
    previous = C_.cpu_isa()
    try:
        for isa in C_.cpu_isas():
            C_.set_cpu_isa(isa)
            check((300, 260), 224, torch.float32, batch, "cpu")
    finally:
        C_.set_cpu_isa(previous)


def test_public_api():
    t = tiles(2, 448, 448)
    out = preprocess(t.numpy(), 224, MEAN, STD, dtype=torch.bfloat16)  # numpy input is accepted
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.bfloat16 and out.device.type == "cpu"
    assert rel(out, preprocess_reference(t, 224, MEAN, STD, torch.float64)) <= TOL[torch.bfloat16]
    strided = torch.from_numpy(np.ascontiguousarray(t.numpy()[:, ::2, ::2]))
    view = t[:, ::2, ::2]  # non-contiguous views are copied by the Python wrapper
    assert torch.equal(preprocess(view, 224, MEAN, STD), preprocess(strided, 224, MEAN, STD))
    assert preprocess(t[:0], 224, MEAN, STD).shape == (0, 3, 224, 224)


def test_rejects_bad_input():
    t = tiles(1, 32, 32)
    with pytest.raises(TypeError, match="uint8"):
        preprocess(t.float(), 16, MEAN, STD)
    with pytest.raises(ValueError, match="channels last"):
        preprocess(t[..., :2], 16, MEAN, STD)
    with pytest.raises(ValueError, match="std"):
        preprocess(t, 16, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="dtype"):
        preprocess(t, 16, MEAN, STD, dtype=torch.float64)
    out = torch.empty(1, 3, 16, 16)
    with pytest.raises(ValueError, match="src: must be contiguous"):
        C_.preprocess(_native.array_arg(t[:, ::2]), _native.array_arg(out), MEAN, STD)
    with pytest.raises(ValueError, match="dst: expected shape"):
        C_.preprocess(_native.array_arg(t), _native.array_arg(torch.empty(2, 3, 16, 16)), MEAN, STD)
    with pytest.raises(TypeError, match="dst: dtype float64"):
        C_.preprocess(_native.array_arg(t), _native.array_arg(out.double()), MEAN, STD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hw,size", SIZES, ids=lambda v: str(v))
def test_cuda_matches_reference(hw, size, dtype):
    if not C_.cuda_compiled():
        gpu_skip("jwth_engine._C was built without CUDA")
    if not torch.cuda.is_available() or C_.cuda_device_count() == 0:
        gpu_skip("no CUDA GPU on this machine (kernels are compiled, not run)")
    check(hw, size, dtype, batch=5, device="cuda")
    out = preprocess(tiles(2, *hw), size, MEAN, STD, dtype=dtype, device="cuda")  # CPU tiles, GPU output
    assert out.device.type == "cuda"

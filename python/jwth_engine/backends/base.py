"""What every backbone backend is, and the numerics contract they are all held to.

A backend runs `LoadedBackbone.module` (timm `forward_features`: tokens [B, T, D] after the final
norm) on some runtime. The PyTorch fp32 eager module on the CPU is the reference; each backend and
precision has a stated tolerance on

  token relative error   ||tokens - ref||_F / ||ref||_F over the whole batch (float64 maths), and
  tile probability error max |p - p_ref| of a head's softmax probabilities,

checked by the tests (tiny presets) and measured on real-size models by
`benchmarks/bench_backbones.py`. The bounds are loose enough for trained ViT-L weights (whose
residual stream grows with depth) and tight enough to catch a wrong kernel or layout.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
BACKENDS = ("torch", "onnxruntime", "tensorrt")

# precision -> (max token relative error, max tile-probability abs difference) vs the fp32 reference.
NUMERICS = {
    "fp32": (1e-4, 1e-4),   # ONNX Runtime / TensorRT fp32 (TF32 off): op order only, ~1e-6 measured
    "fp16": (1e-2, 1e-2),   # fp16 matmuls, fp32 LayerNorm and residual stream (autocast recipe)
    "bf16": (3e-2, 2e-2),   # bf16 has 8 mantissa bits vs fp16's 11: ~3x fp16's error
    "fp8": (1.5e-1, 1e-1),  # FP8 E4M3 GEMMs with calibrated scales (TensorRT + ModelOpt only)
}

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@runtime_checkable
class Backend(Protocol):
    name: str                  # "torch" | "onnxruntime" | "tensorrt"
    device: torch.device
    input_dtype: torch.dtype   # dtype the preprocessed images should have (the pipeline produces it)
    precision: str             # "fp32" | "bf16" | "fp16" | "fp8"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] on self.device -> tokens [B, T, D] (float dtype), any B up to max_batch."""

    def describe(self) -> dict:
        """name, precision, device, compiled, reason chosen, library versions (slide summary)."""


def token_rel_error(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """||tokens - reference||_F / ||reference||_F, computed in float64 on the CPU."""
    a = tokens.detach().to("cpu", torch.float64)
    b = reference.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"tokens: shape {list(a.shape)} != reference shape {list(b.shape)}")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def library_versions(*modules: str, dists: Sequence[str] = ("timm",)) -> dict[str, str]:
    """Installed versions of torch, of the distributions `dists` (from their metadata, nothing
    imported) and of the given modules (imported; absent ones are skipped). The one version
    collector: backends describe themselves with it, jwth_engine.runtime adds the rest."""
    versions = {"torch": torch.__version__}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    for module in modules:
        try:
            versions[module] = str(getattr(importlib.import_module(module), "__version__", "installed"))
        except ImportError:
            continue
        except OSError as exc:  # a wheel whose native library cannot be loaded
            versions[module] = f"cannot load ({exc})"
    if torch.version.cuda:
        versions["torch_cuda"] = torch.version.cuda
    return versions


def check_images(images: torch.Tensor, *, size: int, device: torch.device, dtypes: tuple[torch.dtype, ...],
                 max_batch: int | None = None) -> None:
    """Input check shared by the backends: a clear ValueError/TypeError instead of a deep failure."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, {size}, {size}], got {list(images.shape)}")
    if tuple(images.shape[-2:]) != (size, size):
        # A user option (--tile-size, or a head trained at another size), not a programming error.
        raise ConfigError(f"the backbone takes {size}x{size} tiles, got {images.shape[-2]}x{images.shape[-1]}: "
                          f"--tile-size must equal the preset's input_size ({size})")
    if images.shape[0] < 1:
        raise ValueError("images: empty batch")
    if max_batch is not None and images.shape[0] > max_batch:
        raise ValueError(f"images: batch of {images.shape[0]} exceeds this backend's max batch {max_batch}")
    if images.dtype not in dtypes:
        raise TypeError(f"images: expected dtype {' or '.join(map(str, dtypes))}, got {images.dtype}")
    if images.device.type != device.type or (device.index is not None and images.device.index != device.index):
        raise ValueError(f"images: expected a tensor on {device}, got one on {images.device}")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, sm_{major}{minor})"
    return "cpu"


class Fp32Conv(nn.Module):
    """Runs the wrapped patch-embedding conv in fp32 even inside an autocast region.

    Part of the mixed-precision recipe shared by the torch backend and the fp16/bf16 ONNX graphs:
    the input pixels are not rounded to 8 (bf16) or 11 (fp16) mantissa bits before the first
    layer (cuts the bf16 token error of ViT-S up to 3x), the conv is ~1 % of a ViT's FLOPs, and
    ONNX Conv has no bfloat16 type before opset 22.
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.conv(x.float())

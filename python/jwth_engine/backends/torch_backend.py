"""PyTorch backend: the backbone module itself, with the fast settings for the device.

Precision recipe for bf16/fp16 (CPU and GPU alike): the weights of every Linear are cast once to
the low dtype and the forward runs under `torch.autocast`. Matmuls (and so almost all FLOPs) run
in bf16/fp16; the patch-embedding conv (base.Fp32Conv), LayerNorm, the LayerScale-weighted
residual stream and the final norm stay fp32 (autocast's fp32 list and type promotion); images
go in and tokens come out in fp32. The weight casts plain autocast would redo on every call are
done once. Measured on ViT-S/14-reg4 with real H&E tiles, bf16 token relative error
vs fp32: this recipe 0.10 % (LayerScale 0.1) / 0.34 % (LayerScale 1), plain autocast 0.30 % / 0.43 %,
the whole module cast to bf16 0.89 % / 0.93 %. The ONNX/TensorRT fp16/bf16 graphs trace this same
recipe (onnx_export.py).

CPU: fp32 is the reference. bf16 is faster on CPUs with native bf16 dot products (AVX512-BF16 /
AMX); the measured speed and accuracy cost are in benchmarks/results/backbones_cpu.json. `select_backend`
picks bf16 on such CPUs and fp32 elsewhere (emulated bf16 is slower than fp32); `--precision fp32`
forces the reference.

GPU: the same recipe in bf16 (default) or fp16, attention through `F.scaled_dot_product_attention`
(timm's fused attention; flash / memory-efficient kernels for bf16/fp16 on sm80+), channels-last
images for the patch-embedding conv, and `torch.compile(mode="reduce-overhead")`: inductor
kernels replayed as CUDA graphs. Batches are padded to `max_batch` when compiled so one graph
serves a whole slide (the last, partial batch included) instead of recompiling per batch size.
`compile=False` (`--no-compile`) turns both off.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import ConfigError
from .base import NUMERICS, TORCH_DTYPES, Fp32Conv, check_images, describe_device, library_versions

log = logging.getLogger("jwth_engine.backends")


def apply_mixed_precision(encoder: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The recipe above, in place on a TokenEncoder (give it a copy)."""
    for layer in encoder.modules():
        if isinstance(layer, nn.Linear):
            layer.to(dtype)
    patch_embed = encoder.model.patch_embed
    if not isinstance(patch_embed.proj, Fp32Conv):
        patch_embed.proj = Fp32Conv(patch_embed.proj)
    return encoder


def _fused_attention(module: nn.Module) -> bool:
    flags = [m.fused_attn for m in module.modules() if hasattr(m, "fused_attn")]
    return bool(flags) and all(flags)


class TorchBackend:
    name = "torch"

    def __init__(self, backbone, device: torch.device, precision: str = "fp32", *, compile: bool | None = None,
                 channels_last: bool | None = None, max_batch: int = 64, reason: str = ""):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {precision}: the torch backend runs fp32, bf16 or fp16 "
                              f"(fp8 needs --backend tensorrt)", field="precision")
        if device.type == "cpu" and precision == "fp16":
            raise ConfigError("precision fp16 on the CPU: use bf16 (fast on CPUs with AVX512-BF16/AMX) or fp32",
                              field="precision")
        self.backbone = backbone
        self.device = device
        self.precision = precision
        self.max_batch = int(max_batch)
        self.reason = reason
        self.autocast_dtype = None if precision == "fp32" else TORCH_DTYPES[precision]
        self.input_dtype = torch.float32  # the patch-embedding conv runs in fp32 (see the recipe)
        self.channels_last = (device.type == "cuda") if channels_last is None else bool(channels_last)
        self.size = backbone.preset.input_size

        module = backbone.module
        if device.type != "cpu" or self.autocast_dtype is not None:
            # Never modify the LoadedBackbone's module: it is the fp32 reference and the source
            # of ONNX exports. The copy is made on the CPU before moving (peak = 2x CPU weights).
            module = copy.deepcopy(module)
        if self.autocast_dtype is not None:
            apply_mixed_precision(module, self.autocast_dtype)
        module = module.to(device).eval().requires_grad_(False)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.attention = "sdpa" if _fused_attention(module) else "eager"

        self.compiled = bool(device.type == "cuda") if compile is None else bool(compile)
        self._forward = self._eager
        if self.compiled:
            # reduce-overhead = inductor + CUDA graphs on the GPU; on the CPU it is plain inductor
            # (bench_backbones.py measures its gain; the compile takes tens of seconds, hence off by
            # default there).
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._forward = torch.compile(self._eager, mode=mode, dynamic=False, fullgraph=False)

    def _eager(self, images: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.module(images)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            return self.module(images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, size=self.size, device=self.device, dtypes=(torch.float32,))
        batch = images.shape[0]
        if self.compiled and batch > self.max_batch:
            return torch.cat([self(chunk) for chunk in images.split(self.max_batch)])
        if self.compiled and batch < self.max_batch:
            pad = images.new_zeros((self.max_batch - batch, *images.shape[1:]))
            images = torch.cat([images, pad])
        # After the padding: cat of a channels-last and a contiguous tensor is contiguous, which
        # would fail the compiled graph's stride guard (a recompile and a second graph capture).
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = self._forward(images)
        if self.compiled:
            # CUDA-graph outputs live in a pool the next replay overwrites: hand out a copy.
            tokens = tokens[:batch].clone()
        return tokens

    def describe(self) -> dict:
        return {
            "name": self.name, "precision": self.precision, "device": describe_device(self.device),
            "compiled": self.compiled, "cuda_graphs": self.compiled and self.device.type == "cuda",
            "recipe": ("fp32" if self.autocast_dtype is None else
                       f"{self.precision} linear weights + torch.autocast (fp32 conv, norms, residual)"),
            "attention": self.attention, "channels_last": self.channels_last,
            "input_dtype": str(self.input_dtype).replace("torch.", ""), "max_batch": self.max_batch,
            "reason": self.reason, "versions": library_versions(),
            "numerics": {"reference": "torch fp32 eager",
                         "token_rel_error_max": NUMERICS[self.precision][0],
                         "tile_prob_abs_diff_max": NUMERICS[self.precision][1]},
        }

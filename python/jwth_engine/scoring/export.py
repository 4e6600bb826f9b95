"""`export-onnx` and `build-engine`'s orchestration: a backbone (preset + weights, random weights
warn) turned into the artifacts the ONNX Runtime and TensorRT backends run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..backends.base import NUMERICS
from ..backends.onnx_export import export_onnx as _export
from ..backends.onnx_export import verify_onnx
from ..backends.tensorrt_backend import build_engine as _build
from ..backends.tensorrt_backend import require_tensorrt
from ..errors import BackendUnavailable, ModelError
from ..models import load_backbone


def export_onnx(model: str, output: str | os.PathLike, *, weights: str | None, precision: str, opset: int,
                verify: bool, seed: int, log: Callable[[str], None] = lambda _: None) -> dict:
    """Write the backbone's token graph (dynamic batch) and, with `verify`, check it on ONNX
    Runtime against PyTorch fp32; returns the report (ModelError when outside the tolerance)."""
    backbone = load_backbone(model, weights, seed=seed)
    path = _export(backbone, output, precision=precision, opset=opset)
    size = backbone.preset.input_size
    report = {"onnx": str(path), "preset": backbone.preset.name, "precision": precision, "opset": opset,
              "weights_hash": backbone.weights_hash, "input": ["batch", 3, size, size],
              "output": ["batch", backbone.num_tokens, backbone.embed_dim],
              "num_prefix_tokens": backbone.num_prefix_tokens}
    if verify:
        try:
            check = verify_onnx(backbone, path)
        except BackendUnavailable as exc:
            check = {"skipped": str(exc)}
            log(f"not verified: {exc}")
        else:
            tolerance = NUMERICS[precision][0]
            check["tolerance"] = tolerance
            if not check["token_rel_error"] < tolerance:
                raise ModelError(f"{path}: ONNX Runtime tokens differ from PyTorch by relative error "
                                 f"{check['token_rel_error']:.2e} (tolerance {tolerance:.0e} for {precision})")
        report["verification"] = check
    return report


def build_engine(model: str, *, weights: str | None, precision: str, max_batch: int,
                 calibration: str | None, cache_dir: str | None, profile: str, force: bool, seed: int,
                 log: Callable[[str], None] = lambda _: None) -> Path:
    """Build (or find in the cache) the TensorRT engine of a backbone for this GPU; its path."""
    # Fail before loading weights: both checks are instant, a ViT-g checkpoint is not.
    require_tensorrt("build-engine")
    if not torch.cuda.is_available():
        raise BackendUnavailable("build-engine: TensorRT needs a CUDA GPU and torch sees none")
    backbone = load_backbone(model, weights, seed=seed)
    return _build(backbone, precision=precision, max_batch=max_batch, cache_dir=cache_dir,
                  calibration=calibration, profile=profile, force=force, log=log)

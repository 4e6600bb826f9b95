"""Backbone runtimes: torch, ONNX Runtime and TensorRT behind one `Backend` interface.

    >>> from jwth_engine.backends import select_backend
    >>> backend = select_backend(backbone, backend="auto", precision="auto", max_batch=32)
    >>> tokens = backend(images)      # [B, T, D], within NUMERICS[backend.precision] of fp32 torch
    >>> backend.describe()            # name, precision, device, reason, versions -> slide summary

Runtime modules (onnxruntime, tensorrt, modelopt) are imported when a backend needs them, never
at import of this package.
"""

from .base import BACKENDS, NUMERICS, PRECISIONS, Backend, token_rel_error
from .engine_cache import ArtifactKey, default_cache_dir
from .select import choose_backend, choose_precision, cpu_has_native_bf16, resolve_device, select_backend

__all__ = [
    "ArtifactKey", "BACKENDS", "Backend", "NUMERICS", "PRECISIONS", "choose_backend", "choose_precision",
    "cpu_has_native_bf16", "default_cache_dir", "resolve_device", "select_backend", "token_rel_error",
]

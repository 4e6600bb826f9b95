"""Lazy access to the native module `jwth_engine._C` (C++/CUDA kernels built from `csrc/`).

Nothing is imported at module import time: `load()` imports `_C` on first use and raises
`BackendUnavailable` with the rebuild command when it is missing or cannot be loaded.
`array_arg()` turns a torch tensor into the plain descriptor the binding takes (no libtorch on the
C++ side, so the module does not depend on PyTorch's C++ ABI).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailable

REBUILD_HINT = (
    "build it with `pip install .` from the repository root, or for a source checkout "
    "`python setup.py build_ext --inplace` (needs CMake and a C++17 compiler; nvcc for the CUDA kernels)"
)


@functools.lru_cache(maxsize=1)
def _import() -> tuple[ModuleType | None, str]:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, str(exc)
    return _C, ""


def load() -> ModuleType:
    """The native module, or `BackendUnavailable` saying how to build it."""
    module, error = _import()
    if module is None:
        raise BackendUnavailable(f"jwth_engine._C (native kernels) is not available ({error}); {REBUILD_HINT}")
    return module


def native_available() -> bool:
    return _import()[0] is not None


def cuda_compiled() -> bool:
    """True when `_C` was built with its CUDA kernels (it may still find no GPU at run time)."""
    module = _import()[0]
    return bool(module is not None and module.cuda_compiled())


def describe() -> dict[str, Any]:
    """What the native kernels can do here (for `jwth-engine doctor` and benchmark records)."""
    module, error = _import()
    if module is None:
        return {"available": False, "error": error, "fix": REBUILD_HINT}
    return {
        "available": True,
        "cpu_isa": module.cpu_isa(),
        "cpu_isas": list(module.cpu_isas()),
        "openmp": bool(module.openmp()),
        "max_threads": int(module.max_threads()),
        "cuda_compiled": bool(module.cuda_compiled()),
        "cuda": module.cuda_runtime_info(),
        "cuda_devices": int(module.cuda_device_count()) if module.cuda_compiled() else 0,
    }


_DTYPE_NAMES: dict[Any, str] = {}          # torch dtypes
_NUMPY_DTYPE_NAMES: dict[Any, str] = {}    # numpy dtypes (kept apart: the two types compare oddly)


def _dtype_name(dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> float32
        _DTYPE_NAMES[dtype] = name
    return name


def array_arg(t) -> tuple:
    """Descriptor of a torch tensor (or a numpy array, on the CPU) for `_C`:
    (data_ptr, shape, strides, dtype, device_type, index).

    Strides are in elements. The binding checks dtype, shape, contiguity and device against what
    each kernel needs; the array must stay alive for the duration of the call.
    """
    if isinstance(t, np.ndarray):
        # The numpy array interface and a cached dtype name: array_arg runs once per decoded tile,
        # and `ctypes.data` / `dtype.name` cost several µs each.
        itemsize, dtype = t.itemsize, t.dtype
        name = _NUMPY_DTYPE_NAMES.get(dtype) or _NUMPY_DTYPE_NAMES.setdefault(dtype, dtype.name)
        return (t.__array_interface__["data"][0], t.shape, tuple(s // itemsize for s in t.strides), name, "cpu", 0)
    device = t.device
    return (t.data_ptr(), tuple(t.shape), t.stride(), _dtype_name(t.dtype), device.type,
            device.index if device.index is not None else 0)


def cuda_stream_handle(device) -> int:
    """The current PyTorch CUDA stream of `device`, as the raw cudaStream_t value the kernels take."""
    import torch

    return int(torch.cuda.current_stream(device).cuda_stream)

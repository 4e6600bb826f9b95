"""The native module as built: imports without a GPU, has the CUDA kernels when nvcc was available,
links neither libtorch nor a shared CUDA runtime, and reports its CPU variants."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from jwth_engine import _native

from _gpu import gpu_skip


def _nvcc_present() -> bool:
    return bool(shutil.which("nvcc") or os.environ.get("CUDACXX") or Path("/usr/local/cuda/bin/nvcc").is_file())


def test_imports_and_describes():
    C = _native.load()
    info = _native.describe()
    assert info["available"] and "base" in info["cpu_isas"] and info["cpu_isa"] in info["cpu_isas"]
    import torch

    # The native count agrees with torch's (0 without a driver, and no crash); 0 in a CPU-only build.
    assert C.cuda_device_count() == (torch.cuda.device_count() if C.cuda_compiled() else 0)


@pytest.mark.skipif(os.environ.get("JWTH_SKIP_CUDA", "").lower() in ("1", "on", "true", "yes"),
                    reason="JWTH_SKIP_CUDA set: a CPU-only build is what was asked for")
def test_cuda_kernels_compiled_when_nvcc_exists():
    if not _nvcc_present():
        gpu_skip("no nvcc on this machine")
    C = _native.load()
    assert C.cuda_compiled(), "nvcc is here but _C has no CUDA kernels: rebuild (pip install . or build_ext --inplace)"
    assert "sm" in C.cuda_runtime_info()


def test_no_libtorch_or_shared_cudart():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd not available")
    so = _native.load().__file__
    needed = subprocess.run([ldd, so], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libcudart.so", "libcuda.so"):
        assert lib not in needed, f"{so} links {lib}:\n{needed}"


def test_isa_selection_is_checked():
    C = _native.load()
    with pytest.raises(ValueError, match="isa"):
        C.set_cpu_isa("avx9000")

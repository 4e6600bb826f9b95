"""The one runtime probe: machine, CPU features, GPUs, library versions and which backends can
run, and why not. `doctor` prints it, `bench` and the benchmarks record it, slide summaries record
its library versions. Probed on call, never at import, never over the network.
"""

from __future__ import annotations

import importlib
import os
import platform

from .backends.base import library_versions as _collect_versions
from .backends.onnxruntime_backend import onnxruntime_status
from .backends.select import cpu_flags, cpu_has_native_bf16
from .backends.tensorrt_backend import tensorrt_status
from .slide.nvimgcodec_check import describe_decoders

# Distributions whose versions decide results or speed (read from metadata: nothing is imported).
RUN_DISTS = ("jwth-engine", "timm", "numpy", "pyarrow", "cucim-cu12", "cucim-cu13", "nvidia-nvimgcodec-cu12",
             "nvidia-nvimgcodec-cu13", "openslide-python",
             "openslide-bin", "onnxruntime", "tensorrt")
# The instruction-set extensions that decide CPU backbone speed (bf16 dot products, AMX).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    flags = cpu_flags()
    return [f for f in CPU_FEATURES if f in flags]


def gpus() -> list[str]:
    """'NAME (sm_XY)' of each GPU torch sees."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())]


def library_versions(*modules: str) -> dict:
    """Python and library versions; `modules` are also imported for their own version (cucim)."""
    versions = {"python": platform.python_version(), **_collect_versions(*modules, dists=RUN_DISTS)}
    try:
        import openslide

        versions["openslide-library"] = openslide.__library_version__
    except ImportError:
        pass
    return versions


def machine() -> dict:
    """What a speed figure depends on: CPU, its features, cores usable here, memory, GPUs."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["gpus"] = gpus()
    return info


def module_status(module: str) -> str:
    """Version of an optional module, or why it cannot be used."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"not installed ({exc.name or exc})"
    except OSError as exc:  # a wheel whose native library cannot be loaded
        return f"installed but cannot load: {exc}"
    return str(getattr(mod, "__version__", "installed"))


def backends_status() -> dict:
    """Each backend's own probe, so this says exactly what `--backend` would say."""
    import torch

    from . import _native

    report = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
              "torch_cuda": torch.version.cuda,
              "onnxruntime": onnxruntime_status()[1], "tensorrt": tensorrt_status()[1]}
    if onnxruntime_status()[0]:
        from .backends.onnxruntime_backend import onnxruntime_providers

        report["onnxruntime_providers"] = onnxruntime_providers()
    report["native_kernels"] = _native.describe()
    return report


def probe() -> dict:
    """Everything above in one report (doctor's)."""
    report = {"python": platform.python_version(), **machine(), **backends_status()}
    for name in ("cucim", "openslide", "timm", "ray"):
        report[name] = module_status(name)
    report.update(describe_decoders())   # --decode gpu / cpu: available, or why not
    report["versions"] = library_versions()
    return report

"""`select_backend`: which runtime runs the backbone, at which precision, and why.

Rules (the reason is logged and returned by `describe()["reason"]`, i.e. written into the summary):

  backend  auto        TensorRT when it is importable and the device is a CUDA GPU, else torch.
           torch       always available.
           onnxruntime needs onnxruntime (onnxruntime-gpu for --device cuda).
           tensorrt    needs tensorrt >= 10 and a CUDA GPU; the engine is taken from the cache or
                       built once (minutes, with progress messages).
  precision auto       GPU: bf16. CPU + torch: bf16 on CPUs with native bf16 dot products
                       (AVX512-BF16 or AMX; ~2.9x fp32 there, token error ~0.1-0.3 %), else fp32
                       (emulated bf16 is slower than fp32). ONNX Runtime: fp32.
           fp32        forces full precision everywhere (the reference numerics).

Asking for something this machine cannot do is a BackendUnavailable naming what to install;
contradictory options are a ConfigError.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Callable

import torch

from ..errors import BackendUnavailable, ConfigError
from .base import BACKENDS, PRECISIONS

log = logging.getLogger("jwth_engine.backends")

DEVICES = ("auto", "cpu", "cuda")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; other systems: none known)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 present."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_device(device: str | torch.device) -> tuple[torch.device, str]:
    """(device, why) for "auto" | "cpu" | "cuda" | "cuda:N"."""
    text = str(device)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device()), "a CUDA GPU is visible"
        return torch.device("cpu"), "no CUDA GPU visible to torch"
    if text == "cpu":
        return torch.device("cpu"), "--device cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"--device {text}: torch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        dev = torch.device(text)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index), f"--device {text}"
    raise ConfigError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N")


def choose_backend(requested: str, device: torch.device, *, tensorrt: tuple[bool, str],
                   onnxruntime: tuple[bool, str]) -> tuple[str, str]:
    """(backend, reason). `tensorrt`/`onnxruntime` are (usable, version-or-why-not) probes."""
    if requested not in ("auto", *BACKENDS):
        raise ConfigError(f"--backend {requested!r}: expected auto, {', '.join(BACKENDS)}")
    trt_ok, trt_detail = tensorrt
    if requested == "auto":
        if device.type == "cuda" and trt_ok:
            return "tensorrt", f"auto: TensorRT {trt_detail} is importable and a CUDA GPU is present"
        if device.type != "cuda":
            return "torch", "auto: no CUDA device in use, TensorRT needs one"
        return "torch", f"auto: tensorrt is {trt_detail}"
    if requested == "tensorrt":
        if not trt_ok:
            raise BackendUnavailable(f"--backend tensorrt: tensorrt is {trt_detail}")
        if device.type != "cuda":
            raise BackendUnavailable("--backend tensorrt needs a CUDA GPU (the device in use is the CPU)")
        return "tensorrt", f"--backend tensorrt (TensorRT {trt_detail})"
    if requested == "onnxruntime":
        ort_ok, ort_detail = onnxruntime
        if not ort_ok:
            raise BackendUnavailable(f"--backend onnxruntime: onnxruntime is {ort_detail}")
        return "onnxruntime", f"--backend onnxruntime (onnxruntime {ort_detail})"
    return "torch", "--backend torch"


def choose_precision(backend: str, device: torch.device, requested: str, *,
                     cpu_bf16: bool | None = None) -> tuple[str, str]:
    """(precision, reason) for a chosen backend and device."""
    if requested not in ("auto", *PRECISIONS):
        raise ConfigError(f"--precision {requested!r}: expected auto, {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "fp8" and backend != "tensorrt":
            raise ConfigError("--precision fp8 runs on TensorRT only (--backend tensorrt on an sm_89+ GPU)")
        if backend == "onnxruntime" and requested != "fp32":
            raise ConfigError(f"--precision {requested}: the onnxruntime backend runs fp32 only")
        if backend == "torch" and device.type == "cpu" and requested == "fp16":
            raise ConfigError("--precision fp16 on the CPU: use bf16 or fp32")
        return requested, f"--precision {requested}"
    if backend == "onnxruntime":
        return "fp32", "auto: onnxruntime runs fp32"
    if device.type == "cuda":
        return "bf16", "auto: bf16 on the GPU (fp32 accumulation and norms)"
    native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    if native:
        return "bf16", ("auto: bf16 autocast, the CPU has native bf16 dot products (~2.9x fp32, "
                        "token error ~0.1-0.3 %; --precision fp32 for the reference)")
    return "fp32", "auto: fp32, the CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is slower"


def select_backend(backbone, *, backend: str = "auto", device: str = "auto", precision: str = "auto",
                   max_batch: int = 64, compile: bool | None = None, cache_dir: str | None = None,
                   log: Callable[[str], None] | None = None):
    """Build the backend that runs `backbone`; reports the choice and the reason via `log`
    (default: INFO on the `jwth_engine.backends` logger, which the CLI shows)."""
    from .onnxruntime_backend import onnxruntime_status
    from .tensorrt_backend import tensorrt_status

    if max_batch < 1:
        raise ConfigError(f"max batch must be >= 1, got {max_batch}")
    dev, device_reason = resolve_device(device)
    # TensorRT is probed only where it could be used: importing it is slow and, with a broken
    # install, noisy.
    trt_probe = tensorrt_status() if backend == "tensorrt" or (backend == "auto" and dev.type == "cuda") \
        else (False, "not needed")
    ort_probe = onnxruntime_status() if backend == "onnxruntime" else (False, "not needed")
    name, reason = choose_backend(backend, dev, tensorrt=trt_probe, onnxruntime=ort_probe)
    prec, prec_reason = choose_precision(name, dev, precision)
    why = f"{reason}; {prec_reason}; device: {device_reason}"
    (log or logging.getLogger("jwth_engine.backends").info)(f"backbone backend: {name} {prec} on {dev} ({why})")

    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(backbone, dev, prec, compile=compile, max_batch=max_batch, reason=why)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(backbone, dev, prec, cache_dir=cache_dir, max_batch=max_batch, reason=why, log=log)
    from .tensorrt_backend import TensorRTBackend, build_engine

    engine = build_engine(backbone, precision=prec, max_batch=max_batch, device=dev, cache_dir=cache_dir, log=log)
    return TensorRTBackend(backbone, dev, prec, engine_path=engine, max_batch=max_batch,
                           cuda_graphs=None if compile is None else compile, reason=why, log=log)

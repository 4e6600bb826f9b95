"""TensorRT, part two: building an engine (ONNX export, fp8 calibration and quantization, a strongly
typed network, timing cache, cache key); see tensorrt_backend.py for the recipe."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import BackendUnavailable, ConfigError, ModelError
from ..preprocess import preprocess
from .engine_cache import artifact_lock, artifact_path, atomic_write_bytes, write_manifest
from .onnx_export import INPUT_NAME, cached_onnx
from .trt_profile import (BuildProfile, MODELOPT_HINT, ONNX_RECIPE, TRT_PRECISIONS, engine_key, gpu_identity,
                          load_build_profile, log, require_tensorrt, timing_cache_path)

# --- fp8 calibration ----------------------------------------------------------------------------

def load_calibration(path: str | os.PathLike, backbone, min_tiles: int) -> np.ndarray:
    """Calibration images for FP8: a .npy of uint8 tiles [N, S, S, 3] (preprocessed here exactly as
    scoring preprocesses tiles) or of preprocessed float32 images [N, 3, S, S]."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read calibration tiles ({exc}); expected a .npy array") from exc
    size = backbone.preset.input_size
    if data.dtype == np.uint8 and data.ndim == 4 and data.shape[1:] == (size, size, 3):
        data = preprocess(np.ascontiguousarray(data), size, backbone.preset.mean, backbone.preset.std).numpy()
    elif data.dtype == np.float32 and data.ndim == 4 and data.shape[1:] == (3, size, size):
        pass
    else:
        raise ConfigError(f"{path}: calibration tiles must be uint8 [N, {size}, {size}, 3] or float32 "
                          f"[N, 3, {size}, {size}], got {data.dtype} {list(data.shape)}")
    if data.shape[0] < min_tiles:
        raise ConfigError(f"{path}: {data.shape[0]} calibration tiles; FP8 scales need at least {min_tiles} "
                          f"representative tissue tiles")
    return np.ascontiguousarray(data, dtype=np.float32)


def quantize_fp8(onnx_path: Path, out_path: Path, calibration: np.ndarray, profile: BuildProfile) -> Path:
    """Explicit FP8 quantization (Q/DQ around GEMMs) with ModelOpt; TensorRT builds FP8 only so."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise BackendUnavailable(f"precision fp8 needs NVIDIA ModelOpt to insert FP8 Q/DQ nodes: "
                                 f"{MODELOPT_HINT}", field="precision") from exc
    quantize(
        onnx_path=str(onnx_path), quantize_mode="fp8", calibration_data=calibration,
        calibration_method=profile.fp8["calibration_method"], output_path=str(out_path),
        high_precision_dtype=profile.fp8["high_precision_dtype"],
        use_external_data_format=onnx_path.with_name(onnx_path.name + ".data").is_file(),
    )
    return out_path


# --- build --------------------------------------------------------------------------------------

def _progress_monitor(trt, log: Callable[[str], None]):
    """Logs TensorRT's top-level build phases (TensorRT >= 10 has IProgressMonitor)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"TensorRT build: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


def build_engine(backbone, *, precision: str = "bf16", max_batch: int = 64, device: torch.device | None = None,
                 cache_dir: str | os.PathLike | None = None, calibration: str | os.PathLike | None = None,
                 profile: str = "default", force: bool = False, log: Callable[[str], None] = log.info) -> Path:
    """Build (or find) the engine for `backbone` on this GPU; returns its path in the cache."""
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"precision {precision}: TensorRT engines are {', '.join(TRT_PRECISIONS)}", field="precision")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}", field="max_batch")
    trt = require_tensorrt("build-engine" if device is None else "--backend tensorrt")
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False)")
    device = device or torch.device("cuda", torch.cuda.current_device())
    build = load_build_profile(profile)
    gpu_name, capability = gpu_identity(device)
    if precision == "fp8" and float(capability) < float(build.fp8["min_compute_capability"]):
        raise BackendUnavailable(f"precision fp8 needs compute capability >= {build.fp8['min_compute_capability']} "
                                 f"(Ada/Hopper/Blackwell); {gpu_name} is sm_{capability.replace('.', '')}",
                                 field="precision")
    key = engine_key(backbone, precision=precision, max_batch=max_batch, gpu_name=gpu_name,
                     compute_capability=capability, tensorrt_version=trt.__version__, profile=build)
    dest = artifact_path(key, cache_dir, ".engine")
    if dest.is_file() and not force:
        return dest
    with artifact_lock(dest):
        if dest.is_file() and not force:
            return dest
        if precision == "fp8" and calibration is None:
            raise ConfigError("precision fp8: TensorRT FP8 engines need calibration tiles; run `jwth-engine "
                              "build-engine --precision fp8 --calibration tiles.npy` (uint8 [N, S, S, 3])",
                              field="precision")
        log(f"building TensorRT engine {dest.name} for {backbone.preset.name} ({precision}, max batch {max_batch}) "
            f"on {gpu_name}: once per GPU model, this takes minutes")
        onnx_path = cached_onnx(backbone, precision=ONNX_RECIPE[precision], opset=build.opset,
                                cache_dir=cache_dir, log=log)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
            if precision == "fp8":
                calib = load_calibration(calibration, backbone, int(build.fp8["min_calibration_tiles"]))
                onnx_path = quantize_fp8(onnx_path, Path(tmp) / "model.fp8.onnx", calib, build)
            serialized = _build_serialized(trt, onnx_path, backbone, build, max_batch, cache_dir,
                                           gpu_name, capability, log)
        atomic_write_bytes(dest, serialized)
        write_manifest(dest, key, onnx=onnx_path.name, calibration=str(calibration) if calibration else None)
        log(f"TensorRT engine written: {dest}")
    return dest


def _build_serialized(trt, onnx_path: Path, backbone, build: BuildProfile, max_batch: int, cache_dir,
                      gpu_name: str, capability: str, log) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_gib * 2**30))
    config.builder_optimization_level = int(build.builder_optimization_level)
    if not build.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    shape_min, shape_opt, shape_max = build.shapes(backbone.preset.input_size, max_batch)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, shape_min, shape_opt, shape_max)
    config.add_optimization_profile(opt_profile)
    timing_path = timing_cache_path(cache_dir, gpu_name, capability, trt.__version__)
    timing_cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        log(f"TensorRT rejected the timing cache {timing_path} (another TensorRT or GPU?); building without it")
    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT errors logged above)")
    atomic_write_bytes(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))

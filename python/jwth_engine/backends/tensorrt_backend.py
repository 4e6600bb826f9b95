"""TensorRT backend: engine build (ONNX -> strongly typed engine, cached) and runtime.

Build (`build_engine`, `jwth-engine build-engine`):
  1. the backbone's ONNX export for the precision recipe (onnx_export.py, cached): fp32 graph for
     fp32/fp8, mixed-precision fp16/bf16 graphs for fp16/bf16;
  2. fp8 only: NVIDIA ModelOpt inserts FP8 Q/DQ nodes, calibrated on real tiles (`--calibration`);
  3. a strongly typed network (precision comes from the graph: TensorRT 11 removed the
     FP16/BF16/FP8 builder flags, 10.x deprecated them), one optimisation profile over the batch
     dimension (min 1, opt and max = --max-batch; engine/tensorrt/default.json), a timing cache
     shared by all builds on the same GPU model and TensorRT version, and a progress monitor;
  4. the serialized engine is stored in the cache under a key of (weights hash, preset, precision,
     max batch, GPU name and compute capability, TensorRT version, build profile, exporter).
     `score --backend tensorrt` finds it there or builds it once.

Runtime (`TensorRTBackend`): `execute_async_v3` on PyTorch CUDA tensors, addresses bound with
`set_tensor_address`, no host copies. CUDA interop goes through PyTorch's own CUDA runtime (its
streams, events, caching allocator and `torch.cuda.CUDAGraph`), deliberately instead of cuda-python
or pycuda: the images are produced and the tokens consumed as torch tensors on torch streams, so
using torch's runtime means one CUDA context, one allocator (TensorRT's I/O buffers are ordinary
torch allocations whose lifetime the allocator tracks per stream) and no extra dependency or
pointer juggling between libraries. cuda-python would only add a second view of the same context.

Streams: work is enqueued on the caller's current torch stream. The legacy default stream is the
exception: TensorRT synchronises around it, so on it we enqueue on a private stream ordered with
events (wait_stream both ways) and `record_stream` the I/O tensors for the allocator.

CUDA graphs: per batch size (the full batch and the last, partial one in practice) the enqueue is
captured once and replayed after copying the batch into the graph's static input. Each graph has
its own execution context, because a graph freezes shapes and addresses and a context has one set
of them; the captured enqueue follows one uncaptured enqueue after the shape is set, as TensorRT
requires. Engines whose enqueue cannot be captured (data-dependent shapes, host syncs) fall back
to plain enqueue with a logged note.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import BackendUnavailable, ConfigError, ModelError
from ..preprocess import preprocess
from ..specs import spec_path
from .base import NUMERICS, check_images, describe_device, library_versions
from .engine_cache import (ArtifactKey, artifact_lock, artifact_path, atomic_write_bytes, resolve_cache_dir,
                           write_manifest)
from .onnx_export import INPUT_NAME, OUTPUT_NAME, cached_onnx, exporter_version

log = logging.getLogger("jwth_engine.backends")

INSTALL_HINT = ("pip install 'jwth-engine[tensorrt]' (NVIDIA's tensorrt-cu12 wheel, TensorRT >= 10; "
                "see NVIDIA's TensorRT installation guide), or use --backend torch")
MODELOPT_HINT = "pip install 'jwth-engine[fp8]' (NVIDIA's nvidia-modelopt[onnx])"
TRT_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# Which ONNX recipe feeds each engine precision (fp8 quantizes the fp32 graph).
ONNX_RECIPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp32"}


def tensorrt_status() -> tuple[bool, str]:
    """(usable, version or why not); probed on call, never at import."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"not installed ({exc.name or exc}): {INSTALL_HINT}"
    except OSError as exc:  # a wheel whose libnvinfer cannot be loaded
        return False, f"installed but cannot load ({exc}): reinstall it for this CUDA"
    version = getattr(trt, "__version__", "")
    if not version or not hasattr(trt, "Builder"):
        # PyPI's `tensorrt` name without NVIDIA's index installs a stub with no bindings.
        return False, f"the installed tensorrt package has no bindings (a stub?): {INSTALL_HINT}"
    if int(version.split(".")[0]) < 10:
        return False, f"TensorRT {version} is too old (need >= 10: execute_async_v3, strong typing)"
    return True, version


def require_tensorrt(what: str = "--backend tensorrt"):
    ok, detail = tensorrt_status()
    if not ok:
        raise BackendUnavailable(f"{what}: tensorrt is {detail}")
    import tensorrt as trt

    return trt


# --- build profile and keys ---------------------------------------------------------------------

@dataclass(frozen=True)
class BuildProfile:
    name: str
    opset: int
    min_batch: int
    opt_batch: int | str          # an int, or "max"
    workspace_gib: float
    builder_optimization_level: int
    tf32: bool
    cuda_graphs: bool
    max_graphs: int
    fp8: dict
    digest: str

    def shapes(self, input_size: int, max_batch: int) -> tuple[tuple, tuple, tuple]:
        """(min, opt, max) input shapes of the optimisation profile."""
        if max_batch < self.min_batch:
            raise ConfigError(f"--max-batch {max_batch} is below the build profile's min batch {self.min_batch}")
        opt = max_batch if self.opt_batch == "max" else min(int(self.opt_batch), max_batch)
        dims = (3, input_size, input_size)
        return (self.min_batch, *dims), (max(opt, self.min_batch), *dims), (max_batch, *dims)


def load_build_profile(name: str = "default") -> BuildProfile:
    import hashlib

    path = Path(name) if name.endswith(".json") else spec_path("tensorrt", f"{name}.json")
    try:
        text = path.read_text()
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read TensorRT build profile ({exc})") from exc
    fields = ("opset", "min_batch", "opt_batch", "workspace_gib", "builder_optimization_level", "tf32",
              "cuda_graphs", "max_graphs", "fp8")
    missing = [f for f in fields if f not in data]
    if missing:
        raise ConfigError(f"{path}: TensorRT build profile lacks {', '.join(missing)}")
    if not (data["opt_batch"] == "max" or (isinstance(data["opt_batch"], int) and data["opt_batch"] >= 1)):
        raise ConfigError(f"{path}: opt_batch must be 'max' or a positive integer, got {data['opt_batch']!r}")
    # Only what shapes the engine goes into the cache key (not notes/sources).
    shaping = {k: data[k] for k in fields if k not in ("cuda_graphs", "max_graphs")}
    return BuildProfile(name=data.get("name", path.stem), digest=hashlib.sha256(
        json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16], **{k: data[k] for k in fields})


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def engine_key(backbone, *, precision: str, max_batch: int, gpu_name: str, compute_capability: str,
               tensorrt_version: str, profile: BuildProfile) -> ArtifactKey:
    """Everything that makes a serialized engine reusable; any change gives a new file."""
    return ArtifactKey(
        kind="tensorrt", preset=backbone.preset.name, preset_digest=backbone.preset.digest(),
        weights_hash=backbone.weights_hash, precision=precision, exporter=exporter_version(profile.opset),
        max_batch=int(max_batch), gpu_name=gpu_name, compute_capability=compute_capability,
        runtime_version=tensorrt_version, build_profile=f"{profile.name}:{profile.digest}",
    )


def timing_cache_path(cache_dir, gpu_name: str, compute_capability: str, tensorrt_version: str) -> Path:
    import re

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    folder = resolve_cache_dir(cache_dir, "tensorrt")
    return folder / f"timing-{gpu}-sm{compute_capability.replace('.', '')}-trt{tensorrt_version}.cache"


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
        raise BackendUnavailable(f"--precision fp8 needs NVIDIA ModelOpt to insert FP8 Q/DQ nodes: "
                                 f"{MODELOPT_HINT}") from exc
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
        raise ConfigError(f"--precision {precision}: TensorRT engines are {', '.join(TRT_PRECISIONS)}")
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    trt = require_tensorrt("build-engine" if device is None else "--backend tensorrt")
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False)")
    device = device or torch.device("cuda", torch.cuda.current_device())
    build = load_build_profile(profile)
    gpu_name, capability = gpu_identity(device)
    if precision == "fp8" and float(capability) < float(build.fp8["min_compute_capability"]):
        raise BackendUnavailable(f"--precision fp8 needs compute capability >= {build.fp8['min_compute_capability']} "
                                 f"(Ada/Hopper/Blackwell); {gpu_name} is sm_{capability.replace('.', '')}")
    key = engine_key(backbone, precision=precision, max_batch=max_batch, gpu_name=gpu_name,
                     compute_capability=capability, tensorrt_version=trt.__version__, profile=build)
    dest = artifact_path(key, cache_dir, ".engine")
    if dest.is_file() and not force:
        return dest
    with artifact_lock(dest):
        if dest.is_file() and not force:
            return dest
        if precision == "fp8" and calibration is None:
            raise ConfigError("--precision fp8: TensorRT FP8 engines need calibration tiles; run `jwth-engine "
                              "build-engine --precision fp8 --calibration tiles.npy` (uint8 [N, S, S, 3])")
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


# --- runtime ------------------------------------------------------------------------------------

def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise ModelError(f"TensorRT I/O dtype {dtype} has no torch equivalent")
    return table[dtype]


@dataclass
class _Graph:
    context: object
    images: torch.Tensor
    tokens: torch.Tensor
    graph: torch.cuda.CUDAGraph


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, backbone, device: torch.device, precision: str, *, engine_path: Path, max_batch: int,
                 cuda_graphs: bool | None = None, reason: str = "", log: Callable[[str], None] = log.info):
        trt = require_tensorrt()
        self.trt = trt
        self.backbone = backbone
        self.device = device
        self.precision = precision
        self.max_batch = int(max_batch)
        self.reason = reason
        self.engine_path = Path(engine_path)
        self.size = backbone.preset.input_size
        self._log = log
        build = load_build_profile()
        self.cuda_graphs = build.cuda_graphs if cuda_graphs is None else bool(cuda_graphs)
        self.max_graphs = int(build.max_graphs)
        self.graphs_note = ""
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise ModelError(f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine (built by "
                             f"another TensorRT or for another GPU?); delete it to rebuild")
        names = {self.engine.get_tensor_name(i): self.engine.get_tensor_mode(self.engine.get_tensor_name(i))
                 for i in range(self.engine.num_io_tensors)}
        if names.get(INPUT_NAME) != trt.TensorIOMode.INPUT or names.get(OUTPUT_NAME) != trt.TensorIOMode.OUTPUT:
            raise ModelError(f"{self.engine_path}: engine I/O {sorted(names)} is not {INPUT_NAME} -> {OUTPUT_NAME}")
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(INPUT_NAME))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME))
        with torch.cuda.device(device):
            self.context = self.engine.create_execution_context()
        self._graphs: dict[int, _Graph] = {}
        self._side_stream: torch.cuda.Stream | None = None

    # -- plain enqueue --
    def _enqueue(self, context, images: torch.Tensor, tokens: torch.Tensor, stream: torch.cuda.Stream) -> None:
        if not context.set_input_shape(INPUT_NAME, tuple(images.shape)):
            raise ValueError(f"images: batch shape {tuple(images.shape)} is outside the engine's optimisation profile")
        context.set_tensor_address(INPUT_NAME, images.data_ptr())
        context.set_tensor_address(OUTPUT_NAME, tokens.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.engine_path}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _tokens_like(self, batch: int) -> torch.Tensor:
        return torch.empty((batch, self.backbone.num_tokens, self.backbone.embed_dim),
                           dtype=self.output_dtype, device=self.device)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        tokens = self._tokens_like(images.shape[0])
        if current.cuda_stream != 0:
            self._enqueue(self.context, images, tokens, current)
            return tokens
        # Legacy default stream: TensorRT would synchronise around it; use an ordered side stream.
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(current)
        self._enqueue(self.context, images, tokens, side)
        images.record_stream(side)
        tokens.record_stream(side)
        current.wait_stream(side)
        return tokens

    # -- CUDA graphs --
    def _graph_for(self, batch: int) -> _Graph | None:
        entry = self._graphs.get(batch)
        if entry is not None or not self.cuda_graphs or len(self._graphs) >= self.max_graphs:
            return entry
        with torch.cuda.device(self.device):
            context = self.engine.create_execution_context()
        images = torch.zeros((batch, 3, self.size, self.size), dtype=self.input_dtype, device=self.device)
        tokens = self._tokens_like(batch)
        stream = torch.cuda.Stream(self.device)  # capture needs a non-default stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            # One uncaptured enqueue after the shape change: TensorRT finishes lazy setup here.
            self._enqueue(context, images, tokens, stream)
            stream.synchronize()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    if not context.execute_async_v3(stream.cuda_stream):
                        raise RuntimeError("execute_async_v3 failed during capture")
            except RuntimeError as exc:
                self.cuda_graphs = False
                self.graphs_note = f"CUDA graph capture failed, plain enqueue used: {str(exc).splitlines()[0]}"
                self._log(f"{self.engine_path.name}: {self.graphs_note}")
                return None
        torch.cuda.current_stream(self.device).wait_stream(stream)
        entry = self._graphs[batch] = _Graph(context, images, tokens, graph)
        return entry

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, size=self.size, device=self.device, dtypes=(self.input_dtype,))
        if images.shape[0] > self.max_batch:
            return torch.cat([self(chunk) for chunk in images.split(self.max_batch)])
        images = images.contiguous()
        entry = self._graph_for(images.shape[0])
        if entry is None:
            return self._run(images)
        entry.images.copy_(images)
        entry.graph.replay()
        # The graph's output buffer is rewritten by the next replay: hand out a copy.
        return entry.tokens.clone()

    def describe(self) -> dict:
        return {
            "name": self.name, "precision": self.precision, "device": describe_device(self.device),
            "compiled": True, "engine": str(self.engine_path), "cuda_graphs": self.cuda_graphs,
            "cuda_graphs_note": self.graphs_note or None, "input_dtype": str(self.input_dtype).replace("torch.", ""),
            "max_batch": self.max_batch, "reason": self.reason, "interop": "torch CUDA runtime (streams, allocator)",
            "versions": library_versions("tensorrt"),
            "numerics": {"reference": "torch fp32 eager",
                         "token_rel_error_max": NUMERICS[self.precision][0],
                         "tile_prob_abs_diff_max": NUMERICS[self.precision][1]},
        }

"""TensorRT, part one: is it usable here (`tensorrt_status`), the build profile (engine/tensorrt/*.json)
and the keys an engine and its timing cache are stored under. Shared by trt_build and trt_runtime."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BackendUnavailable, ConfigError
from ..specs import spec_path
from .engine_cache import ArtifactKey, resolve_cache_dir
from .onnx_export import exporter_version

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
            raise ConfigError(f"max_batch {max_batch} is below the build profile's min batch {self.min_batch}",
                              field="max_batch")
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

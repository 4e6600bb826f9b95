"""ONNX Runtime backend: the cached fp32 ONNX export on the CPU provider (CUDA provider when present).

The graph comes from `onnx_export.cached_onnx`, keyed like the TensorRT engines (preset, weights
hash, exporter versions), so a slide run reuses the export of the previous one instead of
re-exporting (a few seconds for ViT-S, a minute for ViT-L).

CPU: images are handed over as a NumPy view of the tensor (no copy) and the tokens come back as a
tensor viewing ONNX Runtime's output array. Threads follow `torch.get_num_threads()` so the two
CPU backends use the same cores and compare fairly.

GPU (CUDAExecutionProvider, from the `onnxruntime-gpu` wheel): I/O binding on the torch tensors'
device pointers, so images and tokens stay on the device. ONNX Runtime launches on its own stream,
so the torch stream is synchronised before the run (inputs written) and `run_with_iobinding`
returns after ONNX Runtime's stream is done (outputs ready for any torch stream).

Precision: fp32 only (ONNX Runtime has no bf16 kernels on the CPU provider); bf16 on the CPU is
the torch backend's, fp16/bf16/fp8 on the GPU TensorRT's.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from ..errors import BackendUnavailable, ConfigError
from .base import NUMERICS, check_images, describe_device, library_versions
from .onnx_export import INPUT_NAME, OUTPUT_NAME, cached_onnx

log = logging.getLogger("jwth_engine.backends")

INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"


def onnxruntime_status() -> tuple[bool, str]:
    """(importable, version or reason), probed on call, never at import."""
    try:
        import onnxruntime
    except ImportError as exc:
        return False, f"not installed ({exc.name or exc}): {INSTALL_HINT}"
    return True, onnxruntime.__version__


def onnxruntime_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, backbone, device: torch.device, precision: str = "fp32", *,
                 cache_dir: str | os.PathLike | None = None, max_batch: int = 64, reason: str = "",
                 log: Callable[[str], None] = log.info):
        ok, detail = onnxruntime_status()
        if not ok:
            raise BackendUnavailable(f"backend onnxruntime: onnxruntime is {detail}", field="backend")
        import onnxruntime as ort

        if precision != "fp32":
            raise ConfigError(f"precision {precision}: the onnxruntime backend runs fp32 only "
                              f"(use --backend torch for bf16 on the CPU, tensorrt for fp16/bf16/fp8 on a GPU)",
                              field="precision")
        if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime_providers():
            raise BackendUnavailable("backend onnxruntime --device cuda: this onnxruntime has no "
                                     "CUDAExecutionProvider; pip uninstall onnxruntime && pip install onnxruntime-gpu",
                                     field="backend")
        self.backbone = backbone
        self.device = device
        self.precision = precision
        self.input_dtype = torch.float32
        self.max_batch = int(max_batch)
        self.reason = reason
        self.size = backbone.preset.input_size
        self.onnx_path = cached_onnx(backbone, precision="fp32", cache_dir=cache_dir, log=log)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        # ONNX Runtime's workers busy-wait after each run by default; in a pipeline whose decode
        # threads and head run between batches on the same cores, that spinning steals their CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._device_id = index
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, size=self.size, device=self.device, dtypes=(torch.float32,))
        images = images.detach().contiguous()
        if self.device.type == "cuda":
            return self._run_cuda(images)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        return torch.from_numpy(out)

    def _run_cuda(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np

        batch = images.shape[0]
        tokens = torch.empty((batch, self.backbone.num_tokens, self.backbone.embed_dim),
                             dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(name=INPUT_NAME, device_type="cuda", device_id=self._device_id,
                           element_type=np.float32, shape=tuple(images.shape), buffer_ptr=images.data_ptr())
        binding.bind_output(name=OUTPUT_NAME, device_type="cuda", device_id=self._device_id,
                            element_type=np.float32, shape=tuple(tokens.shape), buffer_ptr=tokens.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return tokens

    def describe(self) -> dict:
        return {
            "name": self.name, "precision": self.precision, "device": describe_device(self.device),
            "compiled": False, "providers": self.providers, "onnx": str(self.onnx_path),
            "input_dtype": "float32", "max_batch": self.max_batch, "reason": self.reason,
            "versions": library_versions("onnxruntime", "onnx"),
            "numerics": {"reference": "torch fp32 eager",
                         "token_rel_error_max": NUMERICS[self.precision][0],
                         "tile_prob_abs_diff_max": NUMERICS[self.precision][1]},
        }

"""TensorRT backend: engine build (ONNX -> strongly typed engine, cached) and runtime, in three
modules with one job each: trt_profile (availability, build profile, cache keys), trt_build (the
build), trt_runtime (the backend that runs an engine). This module is their public face.

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

from .trt_build import build_engine, load_calibration, quantize_fp8
from .trt_profile import (INSTALL_HINT, MODELOPT_HINT, ONNX_RECIPE, TRT_PRECISIONS, BuildProfile, engine_key,
                          gpu_identity, load_build_profile, require_tensorrt, tensorrt_status, timing_cache_path)
from .trt_runtime import TensorRTBackend

__all__ = ["INSTALL_HINT", "MODELOPT_HINT", "ONNX_RECIPE", "TRT_PRECISIONS", "BuildProfile", "TensorRTBackend",
           "build_engine", "engine_key", "gpu_identity", "load_build_profile", "load_calibration", "quantize_fp8",
           "require_tensorrt", "tensorrt_status", "timing_cache_path"]

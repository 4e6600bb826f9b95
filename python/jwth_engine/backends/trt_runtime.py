"""TensorRT, part three: running a built engine on torch CUDA tensors (streams, CUDA graphs); see
tensorrt_backend.py for why torch's CUDA runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from .base import NUMERICS, check_images, describe_device, library_versions
from .onnx_export import INPUT_NAME, OUTPUT_NAME
from .trt_profile import load_build_profile, log, require_tensorrt

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

"""Export a backbone to ONNX: input `images` [batch, 3, S, S] float32 -> output `tokens` [batch, T, D].

The output is the full token sequence (class, registers, patches) after the final norm, the same
tensor as `LoadedBackbone.module` returns, so the heads run unchanged on ONNX Runtime or TensorRT.
Only the batch dimension is dynamic (1 ... 4096 in the graph; a TensorRT profile narrows it).

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), which handles both
DINOv2-style (absolute position embedding, registers) and DINOv3-style (rotary embedding computed
from the patch grid) timm models; the grid is static at the preset's input size, so the RoPE
tables fold to constants. Opset 18 by default: LayerNormalization is one op (TensorRT keeps it in
fp32), and attention stays MatMul/Softmax, which every TensorRT 10+ parser fuses into its MHA
kernels.

Precision recipes (`precision=`):
  fp32  the reference graph; parity with PyTorch < 1e-4 relative error (tested for every family).
  fp16, bf16  mixed precision baked into the graph, for TensorRT's strongly typed builds (TensorRT
        11 removed the FP16/BF16 builder flags; precision must come from the graph). It is the
        torch backend's recipe, traced: matmuls in fp16/bf16 (torch.autocast), LayerNorm, the
        patch-embedding conv (base.Fp32Conv) and the residual stream in fp32, I/O in fp32.
Graphs above ~1.8 GB of weights (ViT-g) are written with external data (`<file>.data` beside it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import BackendUnavailable, ConfigError
from .base import Fp32Conv
from .engine_cache import ArtifactKey, artifact_lock, artifact_path, write_manifest

log = logging.getLogger("jwth_engine.backends")

INPUT_NAME = "images"
OUTPUT_NAME = "tokens"
DEFAULT_OPSET = 18
EXPORT_FORMAT_VERSION = 1      # bump when the exported graph changes for the same inputs
MAX_GRAPH_BATCH = 4096
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16")
_EXTERNAL_DATA_BYTES = int(1.8 * 2**30)   # protobuf's hard limit is 2 GiB per file


class ExportWrapper(nn.Module):
    """The module that is traced: the backbone's token encoder under a precision recipe."""

    def __init__(self, encoder: nn.Module, precision: str = "fp32"):
        super().__init__()
        if precision not in EXPORT_PRECISIONS:
            raise ConfigError(f"ONNX export precision {precision!r}: "
                              f"expected one of {', '.join(EXPORT_PRECISIONS)}")
        self.encoder = encoder
        self.precision = precision
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.encoder(images)
        with torch.autocast(device_type=images.device.type, dtype=self.dtype):
            tokens = self.encoder(images)
        return tokens.float()


@contextlib.contextmanager
def _fp32_patch_embed(encoder: nn.Module) -> Iterator[None]:
    """Temporarily wrap the patch-embed conv (restored afterwards: the backbone is shared)."""
    patch_embed = encoder.model.patch_embed
    original = patch_embed.proj
    patch_embed.proj = Fp32Conv(original)
    try:
        yield
    finally:
        patch_embed.proj = original


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(backbone, path: str | os.PathLike, *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                external_data: bool | None = None) -> Path:
    """Export `backbone` (a LoadedBackbone) to `path`; returns the path. Overwrites."""
    try:  # the dynamo exporter needs both; say so before tracing a large model
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"ONNX export needs onnx and onnxscript ({exc.name} is missing): "
                                 f"pip install onnx onnxscript") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = backbone.module
    size = backbone.preset.input_size
    if external_data is None:
        external_data = _param_bytes(encoder) > _EXTERNAL_DATA_BYTES
    wrapper = ExportWrapper(encoder, precision).eval()
    # Batch 2 for tracing: torch.export specialises a dimension whose example size is 1.
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_GRAPH_BATCH)
    recipe = _fp32_patch_embed(encoder) if precision != "fp32" else contextlib.nullcontext()
    with recipe, torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}}, dynamo=True, opset_version=opset,
            external_data=external_data, optimize=True, verbose=False,
        )
    check_onnx_io(path, backbone)
    return path


def check_onnx_io(path: str | os.PathLike, backbone) -> None:
    """The graph's I/O is what the runtimes and heads expect: names, dynamic batch, T and D."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = list(graph.input), list(graph.output)
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        raise RuntimeError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                           f"got {[i.name for i in inputs]} -> {[o.name for o in outputs]}")

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    size = backbone.preset.input_size
    in_dims, out_dims = dims(inputs[0]), dims(outputs[0])
    if not isinstance(in_dims[0], str) or in_dims[1:] != [3, size, size]:
        raise RuntimeError(f"{path}: input shape {in_dims}, expected [batch, 3, {size}, {size}]")
    if not isinstance(out_dims[0], str) or out_dims[1:] != [backbone.num_tokens, backbone.embed_dim]:
        raise RuntimeError(f"{path}: output shape {out_dims}, "
                           f"expected [batch, {backbone.num_tokens}, {backbone.embed_dim}]")


def exporter_version(opset: int = DEFAULT_OPSET) -> str:
    from importlib import metadata

    return (f"jwth-onnx-v{EXPORT_FORMAT_VERSION};opset{opset};torch{torch.__version__};"
            f"timm{metadata.version('timm')}")


def onnx_key(backbone, precision: str = "fp32", opset: int = DEFAULT_OPSET) -> ArtifactKey:
    return ArtifactKey(kind="onnx", preset=backbone.preset.name, preset_digest=backbone.preset.digest(),
                       weights_hash=backbone.weights_hash, precision=precision, exporter=exporter_version(opset))


def cached_onnx(backbone, *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] = log.info) -> Path:
    """The cached export for (backbone, precision, exporter), exporting it on first use."""
    key = onnx_key(backbone, precision, opset)
    dest = artifact_path(key, cache_dir, ".onnx")
    if dest.is_file():
        return dest
    with artifact_lock(dest):
        if dest.is_file():  # another process exported it while we waited for the lock
            return dest
        log(f"exporting {backbone.preset.name} ({precision}) to ONNX, once: {dest}")
        # Export into a private folder under the final name (external data files reference the
        # graph's name), then move: the .data sidecar first, the graph last, so an existing .onnx
        # is always complete.
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export-") as tmp:
            tmp_graph = Path(tmp) / dest.name
            export_onnx(backbone, tmp_graph, precision=precision, opset=opset)
            sidecars = sorted(p for p in Path(tmp).iterdir() if p != tmp_graph)
            for sidecar in sidecars:
                os.replace(sidecar, dest.parent / sidecar.name)
            os.replace(tmp_graph, dest)
        write_manifest(dest, key, sidecars=[p.name for p in sidecars])
    return dest


def verify_onnx(backbone, path: str | os.PathLike, *, batch_sizes=(1, 3), seed: int = ModelConfig.seed) -> dict:
    """Run the graph on ONNX Runtime (CPU) and the PyTorch module on the same random images.

    Returns {"batch_sizes", "token_rel_error", "max_abs_error"} (worst over the batches). bf16
    graphs cannot run on ONNX Runtime's CPU provider: BackendUnavailable.
    """
    import numpy as np
    import onnxruntime as ort

    from .base import token_rel_error

    size = backbone.preset.input_size
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph) as exc:
        raise BackendUnavailable(f"{path}: ONNX Runtime's CPU provider cannot run this graph "
                                 f"({str(exc).splitlines()[0][:160]})") from exc
    generator = torch.Generator().manual_seed(seed)
    worst_rel, worst_abs = 0.0, 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, 3, size, size, generator=generator)
        with torch.inference_mode():
            reference = backbone.module(images)
        out = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        got = torch.from_numpy(np.asarray(out))
        worst_rel = max(worst_rel, token_rel_error(got, reference))
        worst_abs = max(worst_abs, float((got.double() - reference.double()).abs().max()))
    return {"batch_sizes": list(batch_sizes), "token_rel_error": worst_rel, "max_abs_error": worst_abs}


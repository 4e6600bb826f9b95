"""Native execution of the slide-tile heads: the default head path.

`NativeHead(module)` takes a `JwthPoolingHead` or `LinearProbeHead` from `reference.py`, copies its
parameters once into contiguous float32 buffers on the device of use, and runs them through the
fused kernels of `jwth_engine._C` (CPU: C++/OpenMP; GPU: CUDA on the current PyTorch stream). The
maths is that of the reference, rearranged so each tile's patch tokens are read once: with a single
query the key projection folds into the query (u_h = W_k,h^T q_h / sqrt(d)) and the value
projection moves after the weighted sum (W_v,h sum_i a_hi p_i). The key bias drops out (a constant
per tile and head inside the softmax) and the value bias passes through (weights sum to one), both
exactly.

Outputs are float32 whatever the token dtype (float32, bfloat16, float16; accumulation is fp32).
`pooled` is None unless asked for; `attn` is the exact softmax [B, H, P] when asked for.

`make_head_runner(module)` returns the native head, or raises `BackendUnavailable` with the build
command: there is no silent fallback to the slow path. `prefer_native=False` gives the reference.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from .. import _native
from ..errors import BackendUnavailable
from .reference import HeadOutput, JwthPoolingHead, LinearProbeHead

_JWTH_PARAMS = {
    "wq": ("q_proj", "weight"), "bq": ("q_proj", "bias"),
    "wk": ("k_proj", "weight"),  # the key bias cancels in the softmax; it is not needed
    "wv": ("v_proj", "weight"), "bv": ("v_proj", "bias"),
    "wo": ("out_proj", "weight"), "bo": ("out_proj", "bias"),
    "wc": ("classifier", "weight"), "bc": ("classifier", "bias"),
}
_PROBE_PARAMS = {"wc": ("classifier", "weight"), "bc": ("classifier", "bias")}


def _param(module: nn.Module, layer: str, name: str) -> torch.Tensor:
    tensor = getattr(getattr(module, layer), name)
    if tensor is None:  # nn.Linear(bias=False): the maths is the same with a zero bias
        out_features = getattr(module, layer).weight.shape[0]
        tensor = torch.zeros(out_features, device=getattr(module, layer).weight.device)
    return tensor


class NativeHead:
    """A reference head's parameters bound to the native kernels; call it like the reference."""

    def __init__(self, module: nn.Module, device: torch.device | str | None = None):
        if isinstance(module, JwthPoolingHead):
            self.pooling, names = "jwth", _JWTH_PARAMS
        elif isinstance(module, LinearProbeHead):
            self.pooling, names = "linear-probe", _PROBE_PARAMS
        else:
            raise TypeError(f"module: expected a JwthPoolingHead or LinearProbeHead, got {type(module).__name__}")
        self._C = _native.load()
        self.dim = int(module.dim)
        self.num_classes = int(module.num_classes)
        self.num_heads = int(module.num_heads)
        self.num_prefix_tokens = int(module.num_prefix_tokens)
        with torch.no_grad():
            params = {key: _param(module, layer, attr) for key, (layer, attr) in names.items()}
        if device is None:
            device = params["wc"].device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:   # tokens arrive as cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._params = self._copy(params, self.device)
        self._local = threading.local()

    @staticmethod
    def _copy(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: v.detach().to(device=device, dtype=torch.float32).contiguous().clone() for k, v in params.items()}

    def to(self, device: torch.device | str) -> "NativeHead":
        """Moves the parameters to `device` (in place, like nn.Module.to); returns self."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device != self.device:
            self._params = self._copy(self._params, device)
            self.device = device
            self._local = threading.local()
        return self

    @property
    def kernel_name(self) -> str:
        if self.device.type == "cpu":
            return f"native-cpu-{self._C.cpu_isa()}"
        return f"native-{self.device.type}"

    def _workspace(self, floats: int, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            # The caching allocator makes this cheap and keeps concurrent streams apart.
            return torch.empty(floats, dtype=torch.float32, device=device)
        cached = getattr(self._local, "workspace", None)
        if cached is None or cached.numel() < floats:
            # Grown, never shrunk, one per thread: a fresh multi-MB buffer per call costs page faults.
            cached = torch.empty(floats, dtype=torch.float32)
            self._local.workspace = cached
        return cached

    def __call__(self, tokens: torch.Tensor, need_attn: bool = False, need_pooled: bool = False) -> HeadOutput:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens: expected a torch.Tensor, got {type(tokens).__name__}")
        device = tokens.device
        if device != self.device:
            raise ValueError(f"tokens: on {device} but the head's parameters are on {self.device}; "
                             f"call .to({str(device)!r}) on the head first")
        if device.type == "cuda" and not self._C.cuda_compiled():
            raise BackendUnavailable(
                "jwth_engine._C was built without CUDA kernels (no nvcc at build time, or JWTH_SKIP_CUDA=1); "
                "rebuild with nvcc on PATH: " + _native.REBUILD_HINT
            )
        if tokens.dim() != 3:
            raise ValueError(f"tokens: expected [batch, tokens, dim], got shape {list(tokens.shape)}")
        batch, num_tokens, dim = tokens.shape
        if dim != self.dim:
            raise ValueError(f"tokens: dim {dim} does not match the head's dim {self.dim}")
        arg = _native.array_arg
        p = self._params
        logits = torch.empty(batch, self.num_classes, dtype=torch.float32, device=device)
        pooled = torch.empty(batch, dim, dtype=torch.float32, device=device) if need_pooled else None
        stream = _native.cuda_stream_handle(device) if device.type == "cuda" else 0
        num_threads = torch.get_num_threads() if device.type == "cpu" else 0
        index = device.index if device.index is not None else 0
        if self.pooling == "linear-probe":
            floats = self._C.linear_probe_workspace_size(batch, dim, self.num_classes, device.type, index)
            ws = self._workspace(floats, device)
            self._C.linear_probe(arg(tokens), arg(p["wc"]), arg(p["bc"]), arg(logits),
                                 arg(pooled) if pooled is not None else None, arg(ws),
                                 stream=stream, num_threads=num_threads)
            return HeadOutput(logits, pooled, None)
        patches = num_tokens - self.num_prefix_tokens
        if patches < 1:
            raise ValueError(f"tokens: {num_tokens} tokens leave no patch tokens after "
                             f"{self.num_prefix_tokens} prefix tokens (class + registers)")
        attn = (torch.empty(batch, self.num_heads, patches, dtype=torch.float32, device=device)
                if need_attn else None)
        floats = self._C.jwth_workspace_size(batch, num_tokens, dim, self.num_heads, self.num_prefix_tokens,
                                             self.num_classes, device.type, index)
        ws = self._workspace(floats, device)
        self._C.jwth_pool(
            arg(tokens), arg(p["wq"]), arg(p["bq"]), arg(p["wk"]), arg(p["wv"]), arg(p["bv"]),
            arg(p["wo"]), arg(p["bo"]), arg(p["wc"]), arg(p["bc"]), arg(logits),
            arg(pooled) if pooled is not None else None, arg(attn) if attn is not None else None, arg(ws),
            num_heads=self.num_heads, num_prefix_tokens=self.num_prefix_tokens, stream=stream,
            num_threads=num_threads,
        )
        return HeadOutput(logits, pooled, attn)


class ReferenceHead:
    """The PyTorch reference behind the same call signature (tests, debugging, `prefer_native=False`)."""

    kernel_name = "torch-reference"

    def __init__(self, module: nn.Module):
        self.module = module
        self.pooling = module.pooling

    def to(self, device: torch.device | str) -> "ReferenceHead":
        self.module.to(device)
        return self

    def __call__(self, tokens: torch.Tensor, need_attn: bool = False, need_pooled: bool = False) -> HeadOutput:
        dtype = next(self.module.parameters()).dtype
        out = self.module(tokens.to(dtype), need_attn=need_attn)
        return HeadOutput(out.logits, out.pooled if need_pooled else None, out.attn)


def make_head_runner(module: nn.Module, prefer_native: bool = True) -> Callable[..., HeadOutput]:
    """The head as a callable `(tokens, need_attn=False, need_pooled=False) -> HeadOutput` with `.to()`.

    Native by default; raises `BackendUnavailable` (with the build command) when `_C` is missing
    rather than falling back silently to the reference, which is far slower (benchmarks/results/heads_cpu.json).
    """
    if prefer_native:
        return NativeHead(module)
    return ReferenceHead(module)

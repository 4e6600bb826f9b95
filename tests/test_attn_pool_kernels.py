"""Native JWTH pooling / linear-probe kernels against the float64 PyTorch reference.

Coverage design. The parameter lists of the issue are D in {384, 768, 1024, 1280, 1536},
P in {196, 256}, H in {1, 4, 8, 16}, R in {0, 4, 8}, B in {1, 7, 64}, C in {2, 9}; their full
product (720 cases, each with a float64 reference that projects K and V for every token) would take
far longer than this file's two-minute budget on a 2-core machine. `COVER` below is a covering design
instead: every value of every list appears, each D is seen with both P values and with at least two
head counts and two batch sizes, B = 64 is run at D = 384, 768, 1024 (the benchmark shape) and 1280,
and every H value meets at least two D values. `ODD` adds what the lists miss: a prime D (769, so
H = 1), an odd head dim (776 / 8 = 97), P = 97 and P = 1, batch 1, C = 1. Every CPU kernel variant
the machine supports (base / avx2 / avx512) runs the odd shapes and one regular shape.

Tolerances, ||out - ref|| / ||ref|| per output (logits, pooled, attn):
  * The reference runs in float64 on exactly the values the kernel reads (bf16/fp16 tokens are
    upcast), so every input dtype is held to the fp32-accumulation bound: 1e-5 on CPU, 5e-5 on CUDA
    (fast-path exp and a different summation order).
  * Working precision: on bf16/fp16 tokens the kernel's error against the reference on the original
    fp32 tokens may not exceed 1.5x the error the rounding itself causes in the float64 reference.
Outputs and workspace are poisoned with NaN before each run; attention rows must sum to 1.
CUDA tests skip at run time (not collection) when no GPU is present; CI still compiles the kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

from jwth_engine import _native
from jwth_engine.heads.native import NativeHead, ReferenceHead, make_head_runner
from jwth_engine.heads.reference import JwthPoolingHead, LinearProbeHead

from _gpu import gpu_skip

C_ = _native.load()

#        D,    P,   H,  R,  B, C
COVER = [
    (384, 196, 1, 0, 1, 2),
    (384, 256, 16, 8, 64, 9),
    (768, 196, 4, 4, 7, 9),
    (768, 256, 8, 0, 64, 2),
    (1024, 196, 16, 4, 1, 2),
    (1024, 256, 8, 4, 64, 9),
    (1280, 256, 1, 8, 7, 2),
    (1280, 196, 4, 0, 64, 9),
    (1536, 196, 8, 8, 7, 2),
    (1536, 256, 16, 0, 1, 9),
    (1536, 256, 4, 4, 7, 9),
]
ODD = [
    (769, 97, 1, 4, 1, 3),
    (776, 97, 8, 2, 5, 2),
    (64, 1, 16, 1, 3, 2),
    (100, 33, 4, 0, 2, 1),
]
TOL = {"cpu": 1e-5, "cuda": 5e-5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def case_id(c):
    return "D{}-P{}-H{}-R{}-B{}-C{}".format(*c)


def make_head(D, C, H, R, seed=0) -> JwthPoolingHead:
    """A float64 head whose scores have std ~2.5 (peaked softmax) and large key/value biases."""
    g = torch.Generator().manual_seed(seed)
    head = JwthPoolingHead(D, C, H, 1 + R).double()
    gains = {"q_proj": 1.5, "k_proj": 1.5, "v_proj": 1.0, "out_proj": 1.0, "classifier": 1.0}
    with torch.no_grad():
        for name, gain in gains.items():
            layer = getattr(head, name)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * gain / math.sqrt(D))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64) * 0.5)
        head.k_proj.bias.mul_(8.0)  # cancels in the softmax: the kernel never sees it
        head.v_proj.bias.mul_(4.0)  # passes through: weights sum to one
    return head


def make_tokens(B, T, D, seed=1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


def run_native(head: NativeHead, tokens: torch.Tensor):
    """Calls the binding with NaN-poisoned outputs and workspace (what NativeHead does, minus torch.empty)."""
    B, T, D = tokens.shape
    dev = tokens.device
    idx = dev.index or 0
    nan = float("nan")
    logits = torch.full((B, head.num_classes), nan, device=dev)
    pooled = torch.full((B, D), nan, device=dev)
    arg, p = _native.array_arg, head._params
    stream = _native.cuda_stream_handle(dev) if dev.type == "cuda" else 0
    if head.pooling == "linear-probe":
        ws = torch.full((C_.linear_probe_workspace_size(B, D, head.num_classes, dev.type, idx),), nan, device=dev)
        C_.linear_probe(arg(tokens), arg(p["wc"]), arg(p["bc"]), arg(logits), arg(pooled), arg(ws), stream=stream)
        attn = None
    else:
        P = T - head.num_prefix_tokens
        attn = torch.full((B, head.num_heads, P), nan, device=dev)
        ws = torch.full((C_.jwth_workspace_size(B, T, D, head.num_heads, head.num_prefix_tokens, head.num_classes,
                                                dev.type, idx),), nan, device=dev)
        C_.jwth_pool(arg(tokens), arg(p["wq"]), arg(p["bq"]), arg(p["wk"]), arg(p["wv"]), arg(p["bv"]),
                     arg(p["wo"]), arg(p["bo"]), arg(p["wc"]), arg(p["bc"]), arg(logits), arg(pooled), arg(attn),
                     arg(ws), num_heads=head.num_heads, num_prefix_tokens=head.num_prefix_tokens, stream=stream)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return logits, pooled, attn


def check_against_reference(case, dtype, device, seed=0):
    D, P, H, R, B, C = case
    head = make_head(D, C, H, R, seed)
    tokens = make_tokens(B, 1 + R + P, D, seed + 1).to(dtype)
    with torch.no_grad():
        ref = head(tokens.double(), need_attn=True)
    native = NativeHead(head, device=device)
    logits, pooled, attn = run_native(native, tokens.to(device))
    tol = TOL[torch.device(device).type]
    errors = {"logits": rel(logits, ref.logits), "pooled": rel(pooled, ref.pooled), "attn": rel(attn, ref.attn)}
    assert all(e <= tol for e in errors.values()), f"{case_id(case)} {dtype}: {errors} > {tol}"
    assert torch.isfinite(logits).all() and torch.isfinite(pooled).all()
    sums = attn.double().sum(-1)
    assert (sums - 1).abs().max().item() < 1e-5, "attention rows must sum to 1"
    assert (attn >= 0).all()


def require_cuda():
    if not C_.cuda_compiled():
        gpu_skip("jwth_engine._C was built without CUDA")
    if not torch.cuda.is_available() or C_.cuda_device_count() == 0:
        gpu_skip("no CUDA GPU on this machine (kernels are compiled, not run)")


# ---- CPU -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", COVER + ODD, ids=case_id)
def test_cpu_float32(case):
    check_against_reference(case, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", [COVER[2], COVER[5], ODD[0], ODD[1]], ids=case_id)
def test_cpu_half_inputs(case, dtype):
    check_against_reference(case, DTYPES[dtype], "cpu")


@pytest.mark.parametrize("case", [COVER[2], ODD[0], ODD[1], ODD[2]], ids=case_id)
def test_cpu_every_isa(case):
    previous = C_.cpu_isa()
    try:
        for isa in C_.cpu_isas():
            C_.set_cpu_isa(isa)
            check_against_reference(case, torch.bfloat16 if isa == "base" else torch.float32, "cpu")
    finally:
        C_.set_cpu_isa(previous)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("case", [(1024, 256, 8, 4, 1, 2), (776, 97, 8, 2, 2, 3), (384, 33, 16, 0, 3, 2),
                                  (64, 1, 2, 1, 1, 2)], ids=case_id)
def test_cpu_split_token_pass(case, threads):
    """Fewer tiles than threads: each tile's tokens are split into runs whose softmax states are
    merged after (uneven runs, more threads than chunks, a single token): still the reference."""
    D, P, H, R, B, C = case
    head = make_head(D, C, H, R)
    tokens = make_tokens(B, 1 + R + P, D)
    with torch.no_grad():
        ref = head(tokens, need_attn=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = NativeHead(head)(tokens.float(), need_attn=True, need_pooled=True)
    finally:
        torch.set_num_threads(previous)
    errors = {name: rel(getattr(out, name), getattr(ref, name)) for name in ("logits", "pooled", "attn")}
    assert all(e <= TOL["cpu"] for e in errors.values()), (case_id(case), threads, errors)
    assert (out.attn.double().sum(-1) - 1).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_working_precision(dtype):
    """Half-precision tokens: the kernel adds no error beyond what rounding the tokens causes."""
    D, P, H, R, B, C = COVER[2]
    head = make_head(D, C, H, R)
    tokens = make_tokens(B, 1 + R + P, D)
    rounded = tokens.to(DTYPES[dtype])
    with torch.no_grad():
        ref = head(tokens, need_attn=True)
        ref_rounded = head(rounded.double(), need_attn=True)
    out = NativeHead(head)(rounded, need_attn=True, need_pooled=True)
    for name in ("logits", "pooled", "attn"):
        rounding = rel(getattr(ref_rounded, name), getattr(ref, name))
        assert rel(getattr(out, name), getattr(ref, name)) <= 1.5 * rounding + 1e-6, name


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(384, 0, 1, 2), (769, 4, 7, 9), (1536, 8, 64, 9)], ids=str)
def test_linear_probe_cpu(shape, dtype):
    D, R, B, C = shape
    probe = LinearProbeHead(D, C, 1 + R).double()
    with torch.no_grad():
        probe.classifier.bias.normal_(0, 1)
    tokens = make_tokens(B, 1 + R + 5, D).to(DTYPES[dtype])
    ref = probe(tokens.double())
    logits, pooled, _ = run_native(NativeHead(probe), tokens)
    assert rel(logits, ref.logits) <= TOL["cpu"]
    assert rel(pooled, ref.pooled) <= TOL["cpu"]


# ---- the Python API ---------------------------------------------------------------------------------
def test_head_runner_api():
    head = make_head(128, 3, 4, 2)
    tokens = make_tokens(5, 1 + 2 + 20, 128).float()
    runner = make_head_runner(head)
    assert isinstance(runner, NativeHead) and runner.kernel_name.startswith("native-cpu")
    assert runner.to("cpu") is runner
    out = runner(tokens)
    assert out.logits.shape == (5, 3) and out.logits.dtype == torch.float32
    assert out.pooled is None and out.attn is None
    full = runner(tokens, need_attn=True, need_pooled=True)
    reference = make_head_runner(head, prefer_native=False)
    assert isinstance(reference, ReferenceHead)
    ref = reference(tokens, need_attn=True, need_pooled=True)
    for name in ("logits", "pooled", "attn"):
        assert rel(getattr(full, name), getattr(ref, name).double()) < 1e-5
    empty = runner(tokens[:0])
    assert empty.logits.shape == (0, 3)
    probe = make_head_runner(LinearProbeHead(128, 3, 3))
    assert probe(tokens, need_pooled=True).pooled.shape == (5, 128)


# ---- validation at the boundary -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    head = NativeHead(make_head(64, 2, 4, 1))
    return head, make_tokens(3, 1 + 1 + 10, 64).float()


def test_rejects_wrong_dtype(small):
    head, tokens = small
    with pytest.raises(TypeError, match="tokens: dtype float64"):
        head(tokens.double())
    with pytest.raises(TypeError, match="tokens: dtype int32"):
        head(tokens.int())


def test_rejects_non_contiguous(small):
    head, tokens = small
    strided = torch.empty(3, 12, 128)[:, :, ::2]
    strided.copy_(tokens)
    with pytest.raises(ValueError, match="tokens: must be contiguous"):
        head(strided)
    with pytest.raises(ValueError, match="tokens: must be contiguous"):
        head(tokens.transpose(0, 1).contiguous().transpose(0, 1))


def test_rejects_bad_shapes(small):
    head, tokens = small
    with pytest.raises(ValueError, match="tokens: expected"):
        head(tokens[0])
    with pytest.raises(ValueError, match="dim 32 does not match the head's dim 64"):
        head(tokens[..., :32].contiguous())
    with pytest.raises(ValueError, match="no patch tokens"):
        head(tokens[:, :2].contiguous())


_KEEP_ALIVE: list = []  # descriptors carry raw pointers: the tensors behind them must outlive the call


def _pool_args(head, tokens, **override):
    B, T, D = tokens.shape
    arg, p = _native.array_arg, dict(head._params)
    outs = {"logits": torch.empty(B, head.num_classes), "pooled": None, "attn": None,
            "workspace": torch.empty(C_.jwth_workspace_size(B, T, D, head.num_heads, head.num_prefix_tokens,
                                                            head.num_classes, "cpu"))}
    values = {**p, **outs, "tokens": tokens, **override}
    _KEEP_ALIVE[:] = list(values.values())
    order = ["tokens", "wq", "bq", "wk", "wv", "bv", "wo", "bo", "wc", "bc", "logits", "pooled", "attn", "workspace"]
    return [arg(values[k]) if isinstance(values[k], torch.Tensor) else values[k] for k in order]


def test_rejects_mismatched_head(small):
    head, tokens = small
    kw = dict(num_heads=head.num_heads, num_prefix_tokens=head.num_prefix_tokens)
    C_.jwth_pool(*_pool_args(head, tokens), **kw)  # the unmodified call works
    with pytest.raises(ValueError, match=r"wk: expected shape \[64, 64\]"):
        C_.jwth_pool(*_pool_args(head, tokens, wk=torch.zeros(32, 64)), **kw)
    with pytest.raises(ValueError, match="bc: expected shape"):
        C_.jwth_pool(*_pool_args(head, tokens, bc=torch.zeros(5)), **kw)
    with pytest.raises(ValueError, match="num_heads: must divide"):
        C_.jwth_pool(*_pool_args(head, tokens), num_heads=3, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        C_.jwth_pool(*_pool_args(head, tokens), num_heads=4, num_prefix_tokens=12)
    with pytest.raises(TypeError, match="wv: dtype float64"):
        C_.jwth_pool(*_pool_args(head, tokens, wv=torch.zeros(64, 64, dtype=torch.float64)), **kw)
    with pytest.raises(ValueError, match="logits: expected shape"):
        C_.jwth_pool(*_pool_args(head, tokens, logits=torch.empty(3, 7)), **kw)
    with pytest.raises(ValueError, match="attn: expected shape"):
        C_.jwth_pool(*_pool_args(head, tokens, attn=torch.empty(3, 4, 11)), **kw)
    with pytest.raises(ValueError, match="workspace: has 1 floats"):
        C_.jwth_pool(*_pool_args(head, tokens, workspace=torch.empty(1)), **kw)


def test_rejects_wrong_device(small):
    head, tokens = small
    fake_cuda = list(_native.array_arg(head._params["wq"]))
    fake_cuda[4:6] = ["cuda", 0]  # a descriptor claiming another device: rejected before any access
    args = _pool_args(head, tokens)
    args[1] = tuple(fake_cuda)
    with pytest.raises(ValueError, match="wq: is on cuda:0 but tokens is on cpu"):
        C_.jwth_pool(*args, num_heads=4, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="on meta but the head's parameters are on cpu"):
        head(torch.empty(3, 12, 64, device="meta"))


def test_rejects_malformed_descriptor(small):
    head, tokens = small
    args = _pool_args(head, tokens)
    args[0] = tokens  # a tensor instead of a descriptor
    with pytest.raises(TypeError, match="tokens: expected an array descriptor"):
        C_.jwth_pool(*args, num_heads=4, num_prefix_tokens=2)


# ---- CUDA (skipped at run time without a GPU) ----------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", COVER + ODD, ids=case_id)
def test_cuda(case, dtype):
    require_cuda()
    check_against_reference(case, DTYPES[dtype], "cuda")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_probe_cuda(dtype):
    require_cuda()
    probe = LinearProbeHead(1024, 9, 5).double()
    tokens = make_tokens(64, 261, 1024).to(DTYPES[dtype])
    ref = probe(tokens.double())
    logits, pooled, _ = run_native(NativeHead(probe, device="cuda"), tokens.cuda())
    assert rel(logits, ref.logits) <= TOL["cuda"] and rel(pooled, ref.pooled) <= TOL["cuda"]


def test_cuda_uses_current_stream():
    require_cuda()
    head = make_head(1024, 2, 8, 4)
    tokens = make_tokens(64, 261, 1024).float()
    ref = head(tokens.double()).logits
    native = NativeHead(head, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu_tokens = tokens.cuda(non_blocking=False)
        out = native(gpu_tokens).logits
    stream.synchronize()
    assert rel(out, ref) <= TOL["cuda"]


def test_cuda_rejects_too_large_dim():
    require_cuda()
    head = NativeHead(make_head(C_.cuda_max_dim() + 8, 2, 1, 0), device="cuda")
    with pytest.raises(ValueError, match="exceeds"):
        head(torch.zeros(1, 3, C_.cuda_max_dim() + 8, device="cuda"))

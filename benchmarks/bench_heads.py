"""Head cost per tile: the native kernels against the strongest PyTorch baselines.

Rows, at P = 256 patch tokens, R = 4 registers, H = 8 heads, C = 2 classes, D in {1024, 1536},
B in {64, 1} tiles per call:
  native_jwth            jwth_engine._C JWTH pooling (the default head path)
  native_token_pass      native_jwth at P = 256 minus at P = 1 (same B): the streaming pass alone
  native_probe           jwth_engine._C linear probe (class token -> linear)
  torch_folded           the SAME folded algebra as the kernel, in PyTorch (batched matmuls:
                         u = W_k^T q, scores = P u, z = softmax . P, W_v z, out, classifier)
  torch_compile_folded   torch_folded through torch.compile
  torch_naive            the reference module: K and V projected for every token
  torch_sdpa             the reference projections + F.scaled_dot_product_attention

Two claims are reported separately (ratios computed pass by pass, median with min/max):
  algebra win  torch_naive / torch_folded   what folding the projections buys, in PyTorch alone
  kernel win   torch_folded / native_jwth   what the native kernel buys over the same algebra
               (goal >= 2x at D = 1024, B = 64 and at B = 1 with all cores)
Passes are interleaved (every row once per pass, `--passes` times) so load from other processes
hits all rows alike; a goal is "not resolvable" when the spread of its ratio reaches across it.

On a GPU the token buffers rotate through a set larger than 3x the L2 cache (so no call finds its
tokens in L2), each call is timed with CUDA events recorded behind a `torch.cuda._sleep` (the host
enqueues the call before the GPU reaches it, so launch overhead is not counted), and a
device-to-device copy of one buffer gives the bandwidth the token pass is compared with.

    python benchmarks/bench_heads.py                       # CPU -> benchmarks/results/heads_cpu.json
    python benchmarks/bench_heads.py --device cuda         # GPU -> benchmarks/results/heads_cuda.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import add_dry_run, dry_run_exit, finish, provenance, spread, verdict, write_result  # noqa: E402

from jwth_engine import _native  # noqa: E402
from jwth_engine.heads.native import NativeHead  # noqa: E402
from jwth_engine.heads.reference import JwthPoolingHead, LinearProbeHead, folded_single_query_pool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_KERNEL_WIN = 2.0


def folded_head(module: JwthPoolingHead):
    """The kernel's algebra in PyTorch: the key projection folded into the query, the value
    projection after the weighted sum; per token only H dot products and H weighted adds."""
    h, dim = module.num_heads, module.dim
    d = dim // h
    with torch.no_grad():
        wq, bq = module.q_proj.weight.detach(), module.q_proj.bias.detach()
        wk = module.k_proj.weight.detach().view(h, d, dim) / math.sqrt(d)          # [H, d, D]
        wv, bv = module.v_proj.weight.detach().view(h, d, dim), module.v_proj.bias.detach().view(h, d)
        wo, bo = module.out_proj.weight.detach(), module.out_proj.bias.detach()
        wc, bc = module.classifier.weight.detach(), module.classifier.bias.detach()
    prefix = module.num_prefix_tokens

    def run(tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        cls = tokens[:, 0].float()
        patches = tokens[:, prefix:]                                                # [B, P, D]
        q = torch.addmm(bq, cls, wq.t()).view(b, h, d)                              # [B, H, d]
        o = folded_single_query_pool(q, wk, wv, bv, patches)                        # [B, H, d]
        pooled = torch.addmm(bo, o.reshape(b, dim), wo.t())
        return torch.addmm(bc, pooled, wc.t())

    return run


def sdpa_head(module: JwthPoolingHead):
    """The reference maths through PyTorch's fused attention: projections + SDPA + out + classifier."""

    def run(tokens: torch.Tensor) -> torch.Tensor:
        b, _, dim = tokens.shape
        h, d = module.num_heads, dim // module.num_heads
        cls, patches = tokens[:, :1], tokens[:, module.num_prefix_tokens:]
        q = module.q_proj(cls).view(b, 1, h, d).transpose(1, 2)
        k = module.k_proj(patches).view(b, -1, h, d).transpose(1, 2)
        v = module.v_proj(patches).view(b, -1, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).reshape(b, dim)
        return module.classifier(module.out_proj(o))

    return run


class Timer:
    """Seconds per call. CPU: wall time of `calls` back-to-back calls. GPU: CUDA events around the
    calls, recorded behind a sleep kernel so that host launch overhead stays outside them."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, calls: int) -> float:
        if self.device.type != "cuda":
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t) / calls
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)     # ~20-40 ms of GPU time: the host runs ahead of the GPU
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


def token_buffers(B: int, T: int, dim: int, dtype, device, seed: int) -> list[torch.Tensor]:
    """One buffer on the CPU; on a GPU enough buffers that together they exceed 3x the L2 cache,
    so a call rotating through them never finds its tokens in L2."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randn(B, T, dim, generator=gen).to(device=device, dtype=dtype)
    if device.type != "cuda":
        return [first]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
    count = max(2, math.ceil(3 * l2 / (first.numel() * first.element_size())))
    return [first] + [torch.randn_like(first) for _ in range(count - 1)]


def rotating(fn, buffers: list[torch.Tensor]):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(buffers)
        return fn(buffers[state["i"]])

    return call


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_case(dim: int, batch: int, dtype: torch.dtype, args, device: torch.device, timer: Timer) -> dict:
    P, R, H, C = args.patches, args.registers, args.heads, args.classes
    T = 1 + R + P
    torch.manual_seed(0)
    module = JwthPoolingHead(dim, C, H, 1 + R).to(device).eval()
    probe = LinearProbeHead(dim, C, 1 + R).to(device).eval()
    buffers = token_buffers(batch, T, dim, dtype, device, seed=dim + batch)
    short = [b[:, : 1 + R + 1].contiguous() for b in buffers]
    ref_buffers = [b.float() for b in buffers] if dtype != torch.float32 else buffers
    native, native_probe = NativeHead(module, device=device), NativeHead(probe, device=device)
    folded = folded_head(module)
    sdpa = sdpa_head(module)

    with torch.inference_mode():
        want = module(ref_buffers[0]).logits
        checks = {"torch_folded_vs_reference": rel_err(folded(buffers[0]), want),
                  "native_vs_reference": rel_err(native(buffers[0]).logits, want)}
        compiled = None
        compile_s = None
        if not args.no_compile:
            t = time.perf_counter()
            compiled = torch.compile(folded, dynamic=False, fullgraph=True)
            checks["torch_compile_folded_vs_reference"] = rel_err(compiled(buffers[0]), want)
            compile_s = round(time.perf_counter() - t, 1)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    bad = {k: v for k, v in checks.items() if not v <= tolerance}
    if bad:
        raise SystemExit(f"D={dim} B={batch} {dtype}: a baseline disagrees with the reference: {bad}")

    token_bytes = buffers[0].numel() * buffers[0].element_size()
    patch_bytes = batch * P * dim * buffers[0].element_size()
    fast = max(1, args.calls // batch) if device.type == "cpu" else args.calls
    slow = 1 if device.type == "cpu" else args.calls
    rows = {
        "native_jwth": (rotating(native, buffers), fast),
        "native_p1": (rotating(native, short), fast),
        "native_probe": (rotating(native_probe, buffers), fast),
        "torch_folded": (rotating(folded, buffers), fast),
    }
    if compiled is not None:
        rows["torch_compile_folded"] = (rotating(compiled, buffers), fast)
    rows["torch_naive"] = (rotating(module, ref_buffers), slow)
    rows["torch_sdpa"] = (rotating(sdpa, ref_buffers), slow)
    if device.type == "cuda":
        rows["device_copy"] = (rotating(torch.clone, buffers), fast)

    samples: dict[str, list[float]] = {name: [] for name in rows}
    with torch.inference_mode():
        for fn, _ in rows.values():   # warm-up: allocations, kernel choice, workspaces
            fn()
        for _ in range(args.passes):
            for name, (fn, calls) in rows.items():
                samples[name].append(timer(fn, calls))
    samples["native_token_pass"] = [max(a - b, 1e-9) for a, b in zip(samples["native_jwth"], samples.pop("native_p1"))]

    results = {}
    for name, secs in samples.items():
        if name == "device_copy":
            results[name] = {"GBps_read_plus_write": spread([2 * token_bytes / s / 1e9 for s in secs], 1)}
            continue
        nbytes = patch_bytes if name == "native_token_pass" else token_bytes
        results[name] = {"us_per_tile": spread([s / batch * 1e6 for s in secs], 3),
                         "effective_GBps": round(nbytes / statistics.median(secs) / 1e9, 3)}
    ratios = {"algebra_win_naive_over_folded": [n / f for n, f in zip(samples["torch_naive"], samples["torch_folded"])],
              "kernel_win_folded_over_native": [f / n for f, n in zip(samples["torch_folded"], samples["native_jwth"])],
              "native_over_naive": [n / f for n, f in zip(samples["torch_naive"], samples["native_jwth"])],
              "jwth_over_probe_native": [j / p for j, p in zip(samples["native_jwth"], samples["native_probe"])]}
    if "torch_compile_folded" in samples:
        ratios["kernel_win_compiled_folded_over_native"] = [
            f / n for f, n in zip(samples["torch_compile_folded"], samples["native_jwth"])]
    out = {"dim": dim, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "buffers": len(buffers),
           "checks_rel_err": {k: float(f"{v:.3g}") for k, v in checks.items()}, "compile_s": compile_s,
           "results": results, "ratios": {k: spread(v, 3) for k, v in ratios.items()}}
    if device.type == "cuda":
        out["token_pass_read_vs_copy_bandwidth"] = round(
            results["native_token_pass"]["effective_GBps"] / results["device_copy"]["GBps_read_plus_write"]["median"], 3)
    return out


def table(runs: list[dict]) -> list[str]:
    names = ["native_jwth", "native_token_pass", "native_probe", "torch_folded", "torch_compile_folded",
             "torch_naive", "torch_sdpa"]
    lines = [f"{'D':>5} {'B':>3} {'dtype':>8}  " + "  ".join(f"{n:>20}" for n in names) + "   kernel win   algebra win"]
    for r in runs:
        cells = []
        for n in names:
            v = r["results"].get(n)
            cells.append(f"{v['us_per_tile']['median']:>17.1f} us" if v else f"{'-':>20}")
        kw, aw = r["ratios"]["kernel_win_folded_over_native"], r["ratios"]["algebra_win_naive_over_folded"]
        lines.append(f"{r['dim']:>5} {r['batch']:>3} {r['dtype']:>8}  " + "  ".join(cells)
                     + f"   {kw['median']:.2f}x [{kw['min']:.2f}-{kw['max']:.2f}]"
                     + f"   {aw['median']:.1f}x [{aw['min']:.1f}-{aw['max']:.1f}]")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 1536])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--dtypes", nargs="+", default=None, help="token dtypes (default: float32 on CPU, "
                                                                      "float32 and bfloat16 on CUDA)")
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--passes", type=int, default=5, help="interleaved passes (the spread is over these)")
    parser.add_argument("--calls", type=int, default=64, help="tiles per timed sample on CPU (calls of B tiles), "
                                                                  "calls per sample on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch and native threads (default: all cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch_compile_folded")
    parser.add_argument("--out", type=Path, default=None)
    add_dry_run(parser)
    args = parser.parse_args(argv)
    dry_run_exit(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["float32"] if device.type == "cpu" else ["float32", "bfloat16"])
    prov = provenance(argv if argv is not None else None, torch_threads=torch.get_num_threads(),
                      native=_native.describe())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        prov["machine"].update(gpu=props.name, gpu_sms=props.multi_processor_count,
                               gpu_l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                               gpu_memory_gib=round(props.total_memory / 2**30, 1), torch_cuda=torch.version.cuda)
    timer = Timer(device)
    runs = []
    for name in dtypes:
        for dim in args.dims:
            for batch in args.batches:
                print(f"D={dim} B={batch} {name} ...", file=sys.stderr, flush=True)
                runs.append(bench_case(dim, batch, getattr(torch, name), args, device, timer))
    goals = {}
    for r in runs:
        if r["dim"] == 1024 and r["dtype"] == "float32" and r["batch"] in (64, 1) and device.type == "cpu":
            stat = r["ratios"]["kernel_win_folded_over_native"]
            goals[f"cpu_kernel_win_D1024_B{r['batch']}"] = {
                "goal": f">= {GOAL_KERNEL_WIN}x (torch_folded / native_jwth)", "measured": stat,
                "verdict": verdict(stat, GOAL_KERNEL_WIN)}
        if device.type == "cuda":
            goals[f"gpu_token_read_vs_copy_D{r['dim']}_B{r['batch']}_{r['dtype']}"] = {
                "goal": ">= 0.70", "measured": r["token_pass_read_vs_copy_bandwidth"],
                "verdict": "met" if r["token_pass_read_vs_copy_bandwidth"] >= 0.70 else "not met",
                "note": "median-based: the bandwidth ratio of medians"}
    report = {
        "benchmark": "heads", "provenance": finish(prov),
        "config": {"patches": args.patches, "registers": args.registers, "heads": args.heads, "classes": args.classes,
                   "passes": args.passes, "calls": args.calls, "device": str(device),
                   "statistic": "median of --passes interleaved passes, with min and max; each pass times "
                                "--calls tiles (CPU: perf_counter; GPU: CUDA events behind a sleep kernel)"},
        "goals": goals, "runs": runs,
    }
    out = args.out or RESULTS / f"heads_{device.type}.json"
    write_result(out, report)
    print("\n".join(table(runs)))
    for name, g in goals.items():
        m = g["measured"]
        shown = f"{m['median']} [{m['min']}-{m['max']}]" if isinstance(m, dict) else m
        print(f"{name}: {shown}  goal {g['goal']}  -> {g['verdict']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

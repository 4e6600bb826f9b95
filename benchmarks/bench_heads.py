"""Head cost per tile: native JWTH pooling and linear probe vs the PyTorch implementations.

Measures, at B = 64 tiles, P = 256 patch tokens, R = 4 registers, H = 8 heads, D in {1024, 1536}:
  native_jwth        jwth_engine._C (the default head path)
  native_probe       jwth_engine._C linear probe (class token -> linear)
  torch_naive        the reference module: K and V projected for every token
  torch_sdpa         the same projections + torch.nn.functional.scaled_dot_product_attention
and reports microseconds per tile and effective GB/s of token bytes (B * T * D * itemsize / time).
`native_token_pass` is native_jwth at P = 256 minus native_jwth at P = 1 (same batch): the time of the
streaming pass alone, the part that should run at memory speed. On a GPU the device-to-device copy
bandwidth of the same token tensor is measured too (bytes read + written / time), and the token
pass's read bandwidth is compared with it.

    python benchmarks/bench_heads.py                       # CPU -> benchmarks/results/heads_cpu.json
    python benchmarks/bench_heads.py --device cuda         # GPU -> benchmarks/results/heads_cuda.json

Not a test: timings depend on the machine, which the JSON describes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jwth_engine import _native
from jwth_engine import runtime
from jwth_engine.heads.native import NativeHead
from jwth_engine.heads.reference import JwthPoolingHead, LinearProbeHead

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> dict:
    info = {**runtime.machine(), "versions": runtime.library_versions(), "native": _native.describe()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def timeit(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def bench_dim(dim: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    B, P, R, H, C = args.batch, args.patches, args.registers, args.heads, args.classes
    T = 1 + R + P
    torch.manual_seed(0)
    module = JwthPoolingHead(dim, C, H, 1 + R).to(device).eval()
    probe = LinearProbeHead(dim, C, 1 + R).to(device).eval()
    tokens = torch.randn(B, T, dim, device=device).to(dtype)
    tokens_p1 = tokens[:, : 1 + R + 1].contiguous()
    native, native_probe = NativeHead(module, device=device), NativeHead(probe, device=device)
    token_bytes = tokens.numel() * tokens.element_size()
    patch_bytes = B * P * dim * tokens.element_size()
    ref_tokens = tokens.to(torch.float32)
    sdpa = sdpa_head(module)

    rows = {}

    def record(name, seconds, nbytes=token_bytes):
        rows[name] = {"ms_per_batch": round(seconds * 1e3, 4), "us_per_tile": round(seconds / B * 1e6, 3),
                      "effective_GBps": round(nbytes / seconds / 1e9, 3)}

    with torch.inference_mode():
        record("native_jwth", timeit(lambda: native(tokens), device, args.repeats))
        small = timeit(lambda: native(tokens_p1), device, args.repeats)
        record("native_token_pass", max(rows["native_jwth"]["ms_per_batch"] / 1e3 - small, 1e-9), patch_bytes)
        record("native_probe", timeit(lambda: native_probe(tokens), device, args.repeats))
        slow_repeats = max(1, args.repeats // 4) if device.type == "cpu" else args.repeats
        record("torch_naive", timeit(lambda: module(ref_tokens), device, slow_repeats, warmup=1))
        record("torch_sdpa", timeit(lambda: sdpa(ref_tokens), device, slow_repeats, warmup=1))
        if device.type == "cuda":
            copy = timeit(lambda: tokens.clone(), device, args.repeats)
            rows["device_copy"] = {"GBps_read_plus_write": round(2 * token_bytes / copy / 1e9, 1)}
    out = {"dim": dim, "dtype": str(dtype).replace("torch.", ""), "results": rows,
           "speedup_native_vs_naive": round(rows["torch_naive"]["ms_per_batch"] / rows["native_jwth"]["ms_per_batch"], 1),
           "speedup_native_vs_sdpa": round(rows["torch_sdpa"]["ms_per_batch"] / rows["native_jwth"]["ms_per_batch"], 1)}
    if device.type == "cuda":
        out["token_pass_read_vs_copy_bandwidth"] = round(
            rows["native_token_pass"]["effective_GBps"] / rows["device_copy"]["GBps_read_plus_write"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 1536])
    parser.add_argument("--dtypes", nargs="+", default=None, help="token dtypes (default: float32 on CPU, "
                                                                      "float32 and bfloat16 on CUDA)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = args.dtypes or (["float32"] if device.type == "cpu" else ["float32", "bfloat16"])
    runs = [bench_dim(dim, args, device, getattr(torch, name)) for name in dtypes for dim in args.dims]
    goals = {}
    cpu_1024 = [r for r in runs if r["dim"] == 1024 and r["dtype"] == "float32"]
    if device.type == "cpu" and cpu_1024:
        goals["cpu_native_vs_naive_at_D1024"] = {"goal": ">= 5x", "measured": cpu_1024[0]["speedup_native_vs_naive"]}
    if device.type == "cuda":
        goals["gpu_token_read_vs_copy"] = {"goal": ">= 0.70",
                                           "measured": {f"D{r['dim']}-{r['dtype']}": r["token_pass_read_vs_copy_bandwidth"]
                                                        for r in runs}}
    report = {
        "benchmark": "heads", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "config": {"batch": args.batch, "patches": args.patches, "registers": args.registers, "heads": args.heads,
                   "classes": args.classes, "repeats": args.repeats, "device": str(device),
                   "timing": "median; CUDA events on GPU, perf_counter on CPU"},
        "goals": goals, "runs": runs,
    }
    out = args.out or RESULTS / f"heads_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"goals": goals, "runs": [{k: r[k] for k in ("dim", "dtype", "speedup_native_vs_naive")}
                                               | {n: v.get("us_per_tile") for n, v in r["results"].items()}
                                               for r in runs]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

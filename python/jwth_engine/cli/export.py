"""`jwth-engine export-onnx` and `jwth-engine build-engine`: backbone artifacts for the runtimes.

Both load the backbone like `score` does (preset + optional --weights; random weights warn) and
import torch/timm/onnx/tensorrt only when they run.
"""

from __future__ import annotations

import json

import click


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.command("export-onnx")
@click.option("--model", required=True, metavar="PRESET|FILE.json", help="Backbone preset name or preset JSON.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Backbone checkpoint (.safetensors, or .pt/.pth/.bin loaded with weights_only).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp32: the reference graph. fp16/bf16: mixed-precision graph for TensorRT's strongly "
                   "typed builds (matmuls low precision, norms/residual fp32).")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the graph on ONNX Runtime (CPU) at batch 1 and 3 and compare with PyTorch fp32.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights (no --weights).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def export_onnx(model, weights, output, precision, opset, verify, seed, as_json):
    """Export the backbone: images [batch, 3, S, S] -> tokens [batch, T, D] (class, registers,
    patches after the final norm), dynamic batch."""
    from ..scoring.export import export_onnx as export

    report = export(model, output, weights=weights, precision=precision, opset=opset, verify=verify, seed=seed,
                    log=_log)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _, _, size, _ = report["input"]
    _, tokens, dim = report["output"]
    click.echo(f"wrote {report['onnx']}: images [batch, 3, {size}, {size}] -> tokens [batch, {tokens}, {dim}] "
               f"({precision}, opset {opset})")
    check = report.get("verification", {})
    if "token_rel_error" in check:
        click.echo(f"verified on ONNX Runtime (batch {check['batch_sizes']}): token relative error "
                   f"{check['token_rel_error']:.2e} < {check['tolerance']:.0e}")


@click.command("build-engine")
@click.option("--model", required=True, metavar="PRESET|FILE.json", help="Backbone preset name or preset JSON.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Backbone checkpoint (.safetensors, or .pt/.pth/.bin loaded with weights_only).")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp8", "fp32"]), default="bf16", show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Largest batch of the optimisation profile (1 ... N); score with --batch-size N reuses it.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="fp8 only: .npy of >= 64 representative tiles, uint8 [N, S, S, 3] or normalised float32 "
                   "[N, 3, S, S].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Engine cache (default $JWTH_CACHE_DIR, else ~/.cache/jwth-engine).")
@click.option("--profile", default="default", show_default=True,
              help="TensorRT build profile: engine/tensorrt/NAME.json or a JSON path.")
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this engine.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights (no --weights).")
def build_engine(model, weights, precision, max_batch, calibration, cache_dir, profile, force, seed):
    """Build the TensorRT engine of a backbone for this GPU into the engine cache (reused by
    `score --backend tensorrt`) and print its path."""
    from ..scoring.export import build_engine as build

    path = build(model, weights=weights, precision=precision, max_batch=max_batch, calibration=calibration,
                 cache_dir=cache_dir, profile=profile, force=force, seed=seed, log=_log)
    click.echo(str(path))

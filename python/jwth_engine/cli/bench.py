"""`jwth-engine bench SLIDE`: per-stage and end-to-end throughput of the scoring pipeline on one slide."""

from __future__ import annotations

import json
import os
import sys

import click

from .options import POOLINGS, model_options, tiling_options


@click.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=str))
@model_options(poolings=(*POOLINGS, "both"))
@tiling_options
@click.option("--backbone", "backbone_kind", type=click.Choice(["model", "null"]), default="model", show_default=True,
              help="null: no backbone runs (fixed tokens of the preset's shape), so the figures are what the "
                   "pipeline can feed a free backbone (decode, preprocess, head).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the full result to this JSON file ('-' for stdout).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Passes per measurement; medians are reported.")
@click.option("--prefetch", type=click.IntRange(min=1), default=2, show_default=True,
              help="Decoded batches the reader may run ahead.")
@click.option("--locality", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Read along the stored tile grid (on/auto) or one region per tile (off).")
@click.option("--nice", type=click.IntRange(0, 19), default=0, show_default=True,
              help="Lower the reader threads' priority by this much (Linux).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Time OpenSlide single-thread reads of the same tiles.")
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="Also run the sequential reference once and compare scores.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights/heads.")
def bench(slide, model, weights, head, pooling, device, backend, precision, no_compile, batch_size,
          num_workers, mpp, tile_size, target_mpp, min_tissue, top_k, reader, backbone_kind, json_path, repeats,
          prefetch, locality, nice, baseline, sequential, seed):
    """Benchmark scoring SLIDE: decode, preprocess, backbone and head alone, then end to end.

    Reports tiles/s per stage, p50/p99 batch latency, slides/h, peak RSS and GPU memory, and the
    pipeline efficiency (end-to-end tiles/s / backbone-only tiles/s), plus OpenSlide single-thread
    reads of the same tiles as the decode baseline. --top-k has no effect here.

    --pooling both: one backbone, the JWTH head and a linear probe on the same tokens; per-batch and
    per-tile latency (p50/p99) of each head and of the whole tile, and end-to-end tiles/s of each,
    interleaved, with the difference and its noise band.
    """
    # Each pass must decode: cuCIM's decoded-tile cache would turn repeated passes into cache
    # reads. Set before cuCIM is first imported (it reads its configuration once per process).
    os.environ.setdefault("JWTH_CUCIM_CACHE_MB", "0")
    from ..errors import ConfigError
    from ..pipeline.bench import bench_slide, format_table
    from ..pipeline.bench_pooling import bench_pooling, format_pooling_table

    def log(message: str) -> None:
        click.echo(message, err=True)

    if backbone_kind == "null":
        if backend not in ("auto", "null"):
            raise ConfigError(f"--backbone null runs no backbone; --backend {backend} contradicts it")
        backend = "null"
    if pooling == "both":
        if head:
            raise ConfigError("--pooling both compares a random JWTH head with a random linear probe; drop --head")
        result = bench_pooling(
            slide, model=model, weights=weights, backend=backend, device=device, precision=precision,
            batch_size=batch_size, num_workers=num_workers, prefetch=prefetch, reader=reader, mpp=mpp,
            tile_size=tile_size, target_mpp=target_mpp, min_tissue=min_tissue, repeats=repeats,
            compile=False if no_compile else None, seed=seed, log=log)
        result["command"] = sys.argv
        _emit(result, json_path, format_pooling_table)
        return
    result = bench_slide(
        slide, model=model, weights=weights, head=head, pooling=pooling, backend=backend, device=device,
        precision=precision, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch, reader=reader,
        mpp=mpp, tile_size=tile_size, target_mpp=target_mpp, min_tissue=min_tissue, repeats=repeats,
        locality=locality, compile=False if no_compile else None, seed=seed, baseline=baseline,
        sequential=sequential, nice=nice, log=log,
    )
    result["command"] = sys.argv
    _emit(result, json_path, format_table)


def _emit(result: dict, json_path: str | None, table) -> None:
    from ..outputs.atomic import atomic_write_bytes

    text = json.dumps(result, indent=2) + "\n"
    if json_path == "-":
        sys.stdout.write(text)
        return
    for line in table(result):
        click.echo(line)
    if json_path:
        atomic_write_bytes(json_path, text.encode())
        click.echo(f"wrote {json_path}")


commands = [bench]

"""`jwth-engine bench SLIDE`: per-stage and end-to-end throughput of the scoring pipeline on one slide."""

from __future__ import annotations

import json
import os
import sys

import click

from .options import config_options, run_config


@click.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=str))
@config_options("model", "runtime", "tiling", "aggregation")
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
def bench(slide, json_path, repeats, prefetch, locality, nice, baseline, sequential, **settings):
    """Benchmark scoring SLIDE: decode, preprocess, backbone and head alone, then end to end.

    Reports tiles/s per stage, p50/p99 batch latency, slides/h, peak RSS and GPU memory, and the
    pipeline efficiency (end-to-end tiles/s / backbone-only tiles/s), plus OpenSlide single-thread
    reads of the same tiles as the decode baseline. --top-k has no effect here.
    """
    # Each pass must decode: cuCIM's decoded-tile cache would turn repeated passes into cache
    # reads. Set before cuCIM is first imported (it reads its configuration once per process).
    os.environ.setdefault("JWTH_CUCIM_CACHE_MB", "0")
    from ..bench import bench_slide, format_table

    config = run_config(settings)

    def log(message: str) -> None:
        click.echo(message, err=True)

    result = bench_slide(slide, config, prefetch=prefetch, repeats=repeats, locality=locality,
                         baseline=baseline, sequential=sequential, nice=nice, log=log)
    text = json.dumps(result, indent=2) + "\n"
    if json_path == "-":
        sys.stdout.write(text)
    else:
        for line in format_table(result):
            click.echo(line)
        if json_path:
            with open(json_path, "w", encoding="utf-8") as handle:
                handle.write(text)
            click.echo(f"wrote {json_path}")


commands = [bench]

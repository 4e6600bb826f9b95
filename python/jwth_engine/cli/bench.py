"""`jwth-engine bench SLIDE`: per-stage and end-to-end throughput of the scoring pipeline on one slide."""

from __future__ import annotations

import json
import os
import sys

import click

from ..config import POOLINGS
from ..outputs.atomic import atomic_write_bytes
from .options import config_options, run_config


@click.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=str))
@config_options("model", "runtime", "tiling", "aggregation", exclude=("pooling",))
@click.option("--pooling", type=click.Choice([*POOLINGS, "both"]),
              help="Head kind when no --head is given (default jwth); both: JWTH and a linear probe on the same "
                   "tokens, latency side by side.")
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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw stage throughputs (and JWTH vs linear-probe head latency with --pooling both) "
                   "into this PNG.")
def bench(slide, json_path, repeats, prefetch, locality, nice, baseline, sequential, pooling, backbone_kind,
          plot_path, **settings):
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
    from ..bench import bench_pooling, bench_slide, format_pooling_table, format_table
    from ..errors import ConfigError

    if backbone_kind == "null":
        if settings.get("backend") not in ("auto", "null"):
            raise ConfigError(f"--backbone null runs no backbone; --backend {settings['backend']} contradicts it")
        settings["backend"] = "null"

    def log(message: str) -> None:
        click.echo(message, err=True)

    if pooling == "both":
        if settings.get("head"):
            raise ConfigError("--pooling both compares a random JWTH head with a random linear probe; drop --head")
        result = bench_pooling(slide, run_config(settings, pooling="jwth"), prefetch=prefetch, repeats=repeats,
                               log=log)
        table = format_pooling_table
    else:
        result = bench_slide(slide, run_config(settings, pooling=pooling), prefetch=prefetch, repeats=repeats,
                             locality=locality, baseline=baseline, sequential=sequential, nice=nice, log=log)
        table = format_table
    result["command"] = sys.argv
    text = json.dumps(result, indent=2) + "\n"
    if plot_path:
        from ..outputs.plots import write_bench_plot

        write_bench_plot(result, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if json_path == "-":
        sys.stdout.write(text)
        return
    for line in table(result):
        click.echo(line)
    if json_path:
        atomic_write_bytes(json_path, text.encode())
        click.echo(f"wrote {json_path}")


commands = [bench]

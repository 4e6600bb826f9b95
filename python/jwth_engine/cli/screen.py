"""`jwth-engine screen SOURCE --out DIR` (bulk scoring with a resumable ledger) and
`jwth-engine screen-status DIR`."""

from __future__ import annotations

import json
import sys

import click

from .options import config_options, run_config


def _parse_gpus(value: str | None) -> list[int] | None:
    """`all`, a count `N` (GPUs 0..N-1) or a list `0,2,3`; None when not given."""
    from ..errors import ConfigError

    if value is None:
        return None
    value = value.strip().lower()
    if value == "all":
        from ..screen.gpus import visible_gpus

        gpus = visible_gpus()
        if not gpus:
            raise ConfigError("--gpus all: no CUDA GPU is visible on this machine")
        return gpus
    try:
        if "," in value:
            gpus = [int(v) for v in value.split(",") if v.strip()]
        else:
            gpus = list(range(int(value)))
    except ValueError:
        raise ConfigError(f"--gpus {value!r}: expected all, a count or a list like 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {value!r}: GPU ids must be distinct and >= 0")
    return gpus


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Screening folder: ledger, slides/<slide_id>/ outputs, summary.csv/.parquet.")
@config_options("model", "runtime", "tiling", "aggregation")
@click.option("--gpus", default=None, metavar="all|N|0,1,..",
              help="One worker process per GPU (default: one worker on --device).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes when not one per GPU (default 1); with --ray-address, CPU workers "
                   "when the cluster has no GPUs or --device cpu (default: one per node).")
@click.option("--slide-timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              metavar="SECONDS", help="A slide still running after this long is failed and its worker replaced.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=1800, show_default=True, metavar="SECONDS",
              help="A worker not ready after this long (model load, engine build, compile) is killed and the "
                   "slide it was given is failed.")
@click.option("--retry-failed", is_flag=True, help="Score slides that failed in an earlier run again.")
@click.option("--reconfigure", is_flag=True,
              help="Accept a model/head/tiling configuration different from the one DIR was screened "
                   "with; slides finished under the old one are scored again.")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT",
              help="Run the workers as Ray actors on this cluster (one per GPU, else --jobs CPU actors); "
                   "--out must be a path shared by all nodes.")
@click.option("--ray-cpus-per-job", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="CPUs each Ray actor reserves (and torch threads it uses, on CPU).")
@click.option("--progress/--no-progress", default=None, help="Live display on stderr (default: on a terminal).")
@click.option("--report", "write_reports", is_flag=True,
              help="Write each slide's NAME.report.html (linked from DIR/index.html).")
def screen(source, out, gpus, jobs, slide_timeout, ready_timeout, retry_failed, reconfigure, ray_address,
           ray_cpus_per_job, progress, write_reports, **settings):
    """Score every slide of SOURCE (a folder, searched recursively, or a manifest CSV with a `path`
    column and optional `slide_id`, `mpp` and extra columns) into --out.

    Reruns skip finished slides; a run killed at any moment loses no finished slide. Slides that
    fail (a bad file, a crash of the reader, --slide-timeout) are recorded and the run goes on.
    Exit code 0: every slide done; 1: some failed (see summary.csv or screen-status); 2: bad
    input or configuration; 130: interrupted."""
    from ..screen.config import with_absolute_paths
    from ..screen.run import run_screen

    config = with_absolute_paths(run_config(settings))
    try:
        report = run_screen(
            source, out, config, gpus=_parse_gpus(gpus), jobs=jobs, slide_timeout_s=slide_timeout,
            ready_timeout_s=ready_timeout, retry_failed=retry_failed, reconfigure=reconfigure, ray_address=ray_address,
            ray_cpus_per_job=ray_cpus_per_job, progress=progress, argv=sys.argv, report=write_reports,
        )
    except KeyboardInterrupt:
        click.echo("interrupted: finished slides are kept; run the same command again to resume", err=True)
        sys.exit(130)
    counts = report.counts
    rate, tiles = report.slides_per_hour, report.tiles_per_second
    click.echo(
        f"{report.out}: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending "
        f"(this run: {len(report.done)} done, {len(report.failed)} failed, {report.skipped} skipped"
        + (f"; {report.scored} scored, {len(report.no_tissue)} no tissue" if report.done else "")
        + (f"; {rate:.1f} scored slides/h, {tiles:.1f} tiles/s" if rate and tiles else "") + ")"
    )
    if counts["failed"]:
        sys.exit(1)


@click.command("screen-status")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable status on stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every slide, not only failed and running ones.")
def screen_status(out, as_json, show_all):
    """Print the state of the screening folder OUT: configuration, counts per status, runs, and the
    slides that failed (with their cause) or are running."""
    from ..screen.status import collect_status, render_status

    status = collect_status(out)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(render_status(status, show_all=show_all))


commands = [screen, screen_status]

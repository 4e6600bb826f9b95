"""`jwth-engine score SLIDE`: score one slide, write the tile Parquet and the summary JSON."""

from __future__ import annotations

import json
import sys

import click

from .options import config_options, run_config


@click.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=str))
@config_options("model", "runtime", "tiling", "aggregation")
@click.option("--out", type=click.Path(file_okay=False), default="jwth-results", show_default=True,
              help="Output folder (created).")
@click.option("--json", "print_json", is_flag=True, help="Print the slide summary JSON to stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def score(slide, out, print_json, progress, **settings):
    """Score SLIDE: tissue detection, tiling, backbone, head; writes SLIDE.tiles.parquet and
    SLIDE.summary.json into --out."""
    from ..scoring import score_slide

    config = run_config(settings, out=out)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressBar(slide) if show else None
    try:
        result = score_slide(slide, config=config, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    summary = result.summary
    if print_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if summary["status"] == "no_tissue":
        click.echo(f"{slide}: no tissue tiles (score: no tissue); wrote {result.summary_path}")
        return
    scores = ", ".join(f"{c}={v['mean']:.4f} (top-{v['k']} {v['topk_mean']:.4f})"
                       for c, v in summary["scores"].items())
    click.echo(f"{slide}: {summary['tiles']['scored']} tiles, {scores}")
    click.echo(f"wrote {result.tiles_path} and {result.summary_path}")


class _ProgressBar:
    """rich progress on stderr, so --json output on stdout stays machine-readable."""

    def __init__(self, slide: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._progress = Progress("[progress.description]{task.description}", BarColumn(),
                                  MofNCompleteColumn(), TimeRemainingColumn(),
                                  console=Console(stderr=True), transient=False)
        self._task = None
        self._slide = slide
        self._progress.start()

    def update(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._progress.add_task(f"scoring {self._slide}", total=total)
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()

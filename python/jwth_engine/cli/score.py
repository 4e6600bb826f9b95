"""`jwth-engine score SLIDE`: score one slide, write the tile Parquet and the summary JSON."""

from __future__ import annotations

import json
import logging
import sys

import click

from .heatmap import visual_options
from .options import config_options, run_config


@click.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=str))
@config_options("model", "runtime", "tiling", "aggregation")
@click.option("--out", type=click.Path(file_okay=False), default="jwth-results", show_default=True,
              help="Output folder (created).")
@click.option("--json", "print_json", is_flag=True, help="Print the slide summary JSON to stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@click.option("--slide-head", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Slide head from fit-slide-head: slide prediction in the summary, per-tile "
                   "attention in the tiles table (slide_attention), from the same pass.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no backend notice on stderr.")
@visual_options
def score(slide, out, print_json, progress, slide_head, quiet, heatmap, geojson, attention, report, heatmap_class,
          heatmap_size, heatmap_colormap, heatmap_opacity, heatmap_scale, **settings):
    """Score SLIDE: tissue detection, tiling, backbone, head; writes SLIDE.tiles.parquet and
    SLIDE.summary.json into --out."""
    from ..scoring import score_slide
    from ..scoring.visuals import VisualOptions

    config = run_config(settings, out=out)
    visuals = VisualOptions(heatmap=heatmap, geojson=geojson, report=report, attention=attention,
                            heatmap_class=heatmap_class, heatmap_size=heatmap_size, colormap=heatmap_colormap,
                            opacity=heatmap_opacity, stretch=heatmap_scale == "slide")
    if quiet:
        logging.getLogger("jwth_engine.backends").setLevel(logging.WARNING)
    show = (sys.stderr.isatty() if progress is None else progress) and not quiet
    bar = _ProgressBar(slide) if show else None
    try:
        result = score_slide(slide, config=config, progress=bar.update if bar else None, slide_head=slide_head,
                             visuals=visuals if visuals.wanted else None)
    finally:
        if bar:
            bar.close()
    summary = result.summary
    if print_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if summary["status"] == "no_tissue":
        click.echo(f"{slide}: no tissue tiles (score: no tissue); wrote {result.summary_path}")
        if heatmap:
            click.echo(f"{slide}: no tissue tiles were scored, so no heat map was drawn", err=True)
        _echo_visuals(result)
        return
    scores = ", ".join(f"{c}={v['mean']:.4f} (top-{v['k']} {v['topk_mean']:.4f})"
                       for c, v in summary["scores"].items())
    click.echo(f"{slide}: {summary['tiles']['scored']} tiles, {scores}")
    if "slide_head" in summary:
        sh = summary["slide_head"]
        probs = ", ".join(f"{c}={p:.4f}" for c, p in sh["probs"].items())
        click.echo(f"slide head ({sh['kind']}): {sh['prediction']} ({probs})")
    click.echo(f"wrote {result.tiles_path} and {result.summary_path}")
    _echo_visuals(result)


def _echo_visuals(result) -> None:
    outputs = result.summary.get("outputs", {})
    names = [outputs[k] for k in ("heatmap_png", "geojson", "attention_npz", "attention_dir", "report_html")
             if k in outputs]
    if names and result.summary_path is not None:
        click.echo(f"wrote {', '.join(names)} in {result.summary_path.parent}")


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

"""`jwth-engine heatmap RESULTS_DIR/NAME`, and the picture options `score` shares with it."""

from __future__ import annotations

import click

from ..config import READERS, field_default
from ..outputs.heatmap import DEFAULT_COLORMAP, DEFAULT_OPACITY, DEFAULT_SIZE, MIN_SIZE


def heatmap_style_options(func):
    """Class, size, colormap, opacity: one definition for `score` and `heatmap`."""
    decorators = [
        click.option("--heatmap-class", "heatmap_class", default=None, metavar="CLASS",
                     help="Class whose tile probability is drawn (default: the slide's prediction)."),
        click.option("--heatmap-size", "heatmap_size", type=click.IntRange(min=MIN_SIZE), default=DEFAULT_SIZE,
                     show_default=True, help="Long side of the heat map PNG, px."),
        click.option("--heatmap-colormap", "heatmap_colormap", default=DEFAULT_COLORMAP, show_default=True,
                     help="matplotlib colormap name."),
        click.option("--heatmap-opacity", "heatmap_opacity", type=click.FloatRange(0, 1, min_open=True),
                     default=DEFAULT_OPACITY, show_default=True, help="Opacity of the tile colours."),
        click.option("--heatmap-scale", "heatmap_scale", type=click.Choice(["fixed", "slide"]), default="fixed",
                     show_default=True, help="Colour scale: fixed [0, 1], or stretched over this slide's tiles."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def visual_options(func):
    """`score`'s switches for pictures and exports."""
    decorators = [
        click.option("--heatmap", is_flag=True, help="Write NAME.heatmap.png (tile probabilities over the thumbnail)."),
        click.option("--geojson", is_flag=True, help="Write NAME.tiles.geojson for QuPath (tiles + tissue outline)."),
        click.option("--attention", type=click.IntRange(min=0), default=0, metavar="K",
                     help="Keep the JWTH head's attention of the K highest and K lowest tiles: "
                          "NAME.attention.npz and NAME.attention/*.png."),
        click.option("--report", is_flag=True, help="Write NAME.report.html (self-contained; implies the heat map)."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return heatmap_style_options(func)


@click.command()
@click.argument("results", type=click.Path(path_type=str), metavar="RESULTS_DIR/NAME")
@heatmap_style_options
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default RESULTS_DIR/NAME.heatmap.png).")
@click.option("--slide", "slide_path", type=click.Path(dir_okay=False), default=None,
              help="Where the slide is now, if it moved since it was scored.")
@click.option("--reader", type=click.Choice(READERS), default=field_default("reader"), show_default=True,
              help="Slide reader for the thumbnail (the scoring run's setting).")
def heatmap(results, heatmap_class, heatmap_size, heatmap_colormap, heatmap_opacity, heatmap_scale, output,
            slide_path, reader):
    """Draw the heat map of a scored slide from its outputs (NAME.summary.json + NAME.tiles.parquet)."""
    from ..scoring.visuals import VisualOptions, heatmap_from_results

    options = VisualOptions(heatmap=True, heatmap_class=heatmap_class, heatmap_size=heatmap_size,
                            colormap=heatmap_colormap, opacity=heatmap_opacity, stretch=heatmap_scale == "slide")
    dest = heatmap_from_results(results, options, out=output, slide_path=slide_path, reader=reader)
    if dest is None:
        click.echo(f"{results}: no tissue tiles were scored on this slide; no heat map drawn", err=True)
        return
    click.echo(f"wrote {dest}")


commands = [heatmap]

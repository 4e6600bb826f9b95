"""Options shared by `score`, `bench` and `screen` (one definition, same names everywhere)."""

from __future__ import annotations

import click

POOLINGS = ["jwth", "linear-probe"]
DEVICES = ["auto", "cpu", "cuda"]
BACKENDS = ["auto", "torch", "onnxruntime", "tensorrt", "null"]
PRECISIONS = ["auto", "fp32", "bf16", "fp16", "fp8"]


def model_options(func=None, *, poolings: tuple[str, ...] = tuple(POOLINGS)):
    """Backbone, head and runtime options (`@model_options`, or `@model_options(poolings=...)` for a
    command that accepts more --pooling values)."""
    if func is None:
        return lambda f: model_options(f, poolings=poolings)
    decorators = [
        click.option("--model", default=None, metavar="PRESET|FILE.json",
                      help="Backbone preset name or preset JSON (default: the head's preset, else jwth_vitl14_reg4). "
                           "`jwth-engine doctor` lists them."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Backbone checkpoint (.safetensors, or .pt/.pth/.bin loaded with weights_only)."),
        click.option("--head", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Head file (.safetensors from fit-head). Without it a random head is used."),
        click.option("--pooling", type=click.Choice(list(poolings)), default=None,
                     help="Head kind when no --head is given (default jwth)."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="Backbone runtime; auto = TensorRT with a GPU when installed, else torch; "
                          "null = no backbone (fixed tokens; feed-rate benchmarks only, scores meaningless)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto = bf16 (GPU and CPU); fp32 forces full precision."),
        click.option("--no-compile", "no_compile", is_flag=True,
                     help="Disable torch.compile / CUDA graphs in the torch backend."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--workers", "num_workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Decode threads."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def tiling_options(func):
    decorators = [
        click.option("--mpp", type=float, default=None,
                     help="Override the slide's microns per pixel at level 0."),
        click.option("--tile-size", type=click.IntRange(min=16), default=None,
                     help="Model input size in px (default: head's, else preset's, 224)."),
        click.option("--target-mpp", type=click.FloatRange(min=0.01), default=None,
                     help="Resolution the tiles are cut at (default: head's, else preset's, 0.5)."),
        click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.25, show_default=True,
                     help="Tiles with a smaller tissue fraction are not scored."),
        click.option("--top-k", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Slide score also reports the mean of the k highest tile probabilities."),
        click.option("--reader", type=click.Choice(["auto", "cucim", "openslide"]), default="auto",
                     show_default=True),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func

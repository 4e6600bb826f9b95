"""`jwth-engine` command line: a click group; each command lives in its own module and imports
its heavy dependencies (torch, cuCIM, timm) only when it runs, so `--help` is instant."""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings

import click

from ..config import flag_of
from ..errors import JwthError


class _Group(click.Group):
    """Turns JwthError into one line on stderr and its exit code, instead of a traceback; a
    setting named in the API's words (`batch_size`) is named by its flag (`--batch-size`)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JwthError as exc:
            message = exc.cli_message(flag_of(exc.field)) if exc.field else str(exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="jwth-engine", prog_name="jwth-engine")
def cli(verbose: int) -> None:
    """Score whole-slide images with JWTH attention-pooling heads on foundation-model backbones."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose else "jwth-engine: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    warnings.showwarning = _show_warning
    # Which backend runs, and why, is shown by default: the issue of "why is this slow" starts there.
    logging.getLogger("jwth_engine.backends").setLevel(min(level, logging.INFO))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (random weights, random head, head/backbone mismatch) as one line each on stderr."""
    click.echo(f"warning: {message}", err=True)


def _register() -> None:
    from . import (bench, doctor, embed, embed_regions, export, fit_head, fit_slide_head, heatmap,
                   info, pretrain_regions, score, screen)

    for command in (info.info, score.score, doctor.doctor, export.export_onnx, export.build_engine,
                    *bench.commands, *screen.commands, *fit_head.commands, *embed.commands,
                    *fit_slide_head.commands, *embed_regions.commands, *pretrain_regions.commands,
                    *heatmap.commands):
        cli.add_command(command)


_register()


def _reserve_stdout_for_results() -> None:
    """Native libraries print diagnostics on file descriptor 1 (cuFile inside cuCIM: "cuFile
    initialization failed" on a machine without a driver; libjpeg: "Bogus marker length"), which
    would corrupt `--json` output. Point fd 1 at stderr for the whole process (worker processes
    inherit it) and keep Python's sys.stdout on a private copy of the real stdout."""
    try:
        sys.stdout.flush()
        results_fd = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):
        return  # no usable stdout/stderr (daemonised): nothing to protect
    sys.stdout = io.TextIOWrapper(os.fdopen(results_fd, "wb"), encoding=sys.stdout.encoding or "utf-8",
                                  errors=sys.stdout.errors, line_buffering=True)


def main() -> None:
    _reserve_stdout_for_results()
    # torch's OpenMP threads spin-wait after each parallel region by default, taking the cores the
    # tile decoder threads need (and stalling short kernels such as the head). libgomp reads it
    # once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli(prog_name="jwth-engine")

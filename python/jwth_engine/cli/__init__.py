"""`jwth-engine` command line: a click group; each command lives in its own module and imports
its heavy dependencies (torch, cuCIM, timm) only when it runs, so `--help` is instant."""

from __future__ import annotations

import logging
import sys

import click

from ..errors import JwthError


class _Group(click.Group):
    """Turns JwthError into one line on stderr and its exit code, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JwthError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="jwth-engine", prog_name="jwth-engine")
def cli(verbose: int) -> None:
    """Score whole-slide images with JWTH attention-pooling heads on foundation-model backbones."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)


def _register() -> None:
    from . import doctor, export, info, score

    cli.add_command(info.info)
    cli.add_command(score.score)
    cli.add_command(doctor.doctor)
    cli.add_command(export.export_onnx)
    cli.add_command(export.build_engine)
    for optional in ("bench", "screen", "fit_head"):
        try:
            module = __import__(f"{__name__}.{optional}", fromlist=["commands"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{optional}":
                raise
            continue
        for command in module.commands:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="jwth-engine")

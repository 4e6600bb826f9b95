"""`jwth-engine doctor`: what this machine can run, and why not when it cannot."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Report the runtime: GPU, CUDA, cuCIM, OpenSlide, backends and native kernels."""
    from ..models import list_presets
    from ..runtime import probe

    report = {**probe(), "presets": list_presets()}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        click.echo(f"{key:22s} {', '.join(map(str, value)) if isinstance(value, list) else value}")

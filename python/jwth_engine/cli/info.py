"""`jwth-engine info SLIDE`: what the readers see in a slide file."""

from __future__ import annotations

import json

import click

from ..config import TilingConfig
from .options import config_options


@click.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=str))
@config_options(TilingConfig, only=("reader",))
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
def info(slide: str, reader: str, as_json: bool) -> None:
    """Vendor, pyramid levels, MPP, stored tile size, compression and the reader used."""
    from ..slide import open_slide

    with open_slide(slide, reader=reader) as handle:
        data = handle.info.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    mpp = data.get("mpp")
    rows = [
        ("file", data["path"]),
        ("reader", f"{data['reader']}" + (f" ({data['reader_note']})" if data.get("reader_note") else "")),
        ("vendor", data.get("vendor")),
        ("levels", data["level_count"]),
        ("mpp", f"{mpp[0]:.4f} x {mpp[1]:.4f} µm/px (from {data['mpp_source']})" if mpp else "not in metadata (use --mpp)"),
        ("objective", data.get("objective")),
        ("compression", data.get("compression")),
        ("associated", ", ".join(data.get("associated_images") or []) or "-"),
    ]
    for key, value in rows:
        click.echo(f"{key:12s} {value}")
    for i, (dims, down, tile) in enumerate(zip(data["level_dimensions"], data["level_downsamples"],
                                               data["level_tile_sizes"])):
        click.echo(f"  level {i}: {dims[0]} x {dims[1]} px, downsample {down:.3f}, tile {tile[0]} x {tile[1]}")

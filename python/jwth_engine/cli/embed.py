"""`jwth-engine embed SLIDE|FOLDER|MANIFEST --out DIR`: tile embeddings as TRIDENT-layout HDF5 files."""

from __future__ import annotations

import os
import sys
import warnings

import click

from .options import config_options, run_config


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder: features_<model>[_<kind>]/<slide>.h5 (and, for many slides, the ledger).")
@click.option("--features", "features", default="cls", show_default=True, metavar="KIND[,KIND..]",
              help="cls | mean (of patch tokens) | cls+mean | jwth (pooled vector of --head); several "
                   "in one pass, one file each.")
@click.option("--coords", type=click.Path(exists=True, path_type=str), default=None,
              help="Tile with a TRIDENT/CLAM coordinates .h5 instead of our tiling (a folder of "
                   "<slide>.h5 / <slide>_patches.h5 for many slides).")
@click.option("--parquet", is_flag=True, help="Also write each file's rows as <slide>.parquet.")
@config_options("model", "runtime", "tiling", "aggregation")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Worker processes for many slides (default 1).")
@click.option("--slide-timeout", type=click.FloatRange(min=1), default=3600, show_default=True, metavar="SECONDS")
@click.option("--retry-failed", is_flag=True, help="Embed slides that failed in an earlier run again.")
@click.option("--reconfigure", is_flag=True, help="Accept settings different from the ones DIR was embedded with.")
@click.option("--progress/--no-progress", default=None, help="Progress display (default: on a terminal).")
@click.option("--magnifications", default=None, metavar="M[,M..]",
              help="Mixed-magnification regions (e.g. 5,10,20): writes region sequences to DIR/regions_<model>/ "
                   "(see embed-regions).")
@click.option("--region-tiles", type=click.IntRange(min=1), default=None,
              help="Region side in tiles at the lowest magnification (with --magnifications; default 1).")
def embed(source, out, features, coords, parquet, jobs, slide_timeout, retry_failed, reconfigure, progress,
          magnifications, region_tiles, **settings):
    """Embed the tiles of SOURCE (a slide, a folder searched recursively, or a manifest CSV with a
    `path` column) with the backbone and write one HDF5 file per slide and feature kind. Many
    slides run like `screen`: crash-isolated workers, resumable, failures recorded per slide
    (exit 1 when some failed)."""
    from ..embed.run import EmbedSettings, check_embed_options
    from ..screen.config import with_absolute_paths

    config = with_absolute_paths(run_config(settings))
    if magnifications is not None or region_tiles is not None:
        _embed_regions(source, out, magnifications or "5,10,20", region_tiles or 1, features=features,
                       coords=coords, config=config)
        return
    kinds = check_embed_options(features, config.model.head)
    extra = EmbedSettings(features=kinds, out=os.path.abspath(out), coords=coords and os.path.abspath(coords),
                          parquet=parquet)
    if os.path.isfile(source) and not source.lower().endswith(".csv"):
        _embed_one(source, config, extra)
    else:
        _embed_many(source, config, extra, jobs=jobs, slide_timeout=slide_timeout, retry_failed=retry_failed,
                    reconfigure=reconfigure, progress=progress)


def _embed_regions(source, out, magnifications, region_tiles, *, features, coords, config) -> None:
    """The region path (regions/): every tile of each tissue region at each magnification, class tokens."""
    from ..config import DEFAULT_PRESET
    from ..errors import ConfigError
    from ..screen.sources import load_sources
    from .embed_regions import run_region_embedding

    m, r, t = config.model, config.runtime, config.tiling
    if features != "cls" or coords or m.head:
        raise ConfigError("--magnifications/--region-tiles embed class tokens on our region grid; "
                          "--features other than cls, --coords and --head do not apply")
    model = m.model or DEFAULT_PRESET
    if os.path.isfile(source) and not source.lower().endswith(".csv"):
        slides, mpps = [source], {}
    else:
        sources = load_sources(source)
        slides, mpps = [s.path for s in sources], {s.path: s.mpp for s in sources if s.mpp is not None}
    folder = os.path.join(out, f"regions_{os.path.splitext(os.path.basename(model))[0]}")
    run_region_embedding(slides, folder, magnifications=magnifications, region_tiles=region_tiles, model=model,
                         weights=m.weights, tile_size=t.tile_size, mpp=t.mpp, mpps=mpps, min_tissue=t.min_tissue,
                         reader=t.reader, decode=t.decode, device=r.device, backend=r.backend, precision=r.precision,
                         batch_size=r.batch_size, num_workers=r.num_workers, seed=m.seed)


def _embed_one(slide: str, config, extra) -> None:
    from ..embed.run import embed_slide

    with warnings.catch_warnings():
        if not config.model.head:
            # The tile head's probabilities are not written by a single-slide embed.
            warnings.filterwarnings("ignore", message="no --head given")
        result = embed_slide(slide, out=extra.out, features=extra.features, coords=extra.coords,
                             parquet=extra.parquet, config=config)
    rate = result.score.summary["throughput"]["tiles_per_s"]
    paths = ", ".join(str(p) for p in result.features.values())
    click.echo(f"{slide}: {result.num_tiles} tiles" + (f" ({rate:.1f} tiles/s)" if rate else "")
               + f"; wrote {paths}")


def _embed_many(source: str, config, extra, *, jobs, slide_timeout, retry_failed, reconfigure, progress) -> None:
    from ..embed.run import EMBED_JOB
    from ..screen.local import LocalPool, cpu_specs
    from ..screen.run import run_screen

    def pool_factory(options, *, timeout_s, log_dir):
        specs = cpu_specs(jobs or 1, hide_gpus=options["runtime"]["device"] == "cpu")
        return LocalPool(specs, {**options, "embed": extra.to_dict()}, timeout_s=timeout_s, log_dir=log_dir,
                         job=EMBED_JOB)

    try:
        report = run_screen(source, extra.out, config, slide_timeout_s=slide_timeout, retry_failed=retry_failed,
                            reconfigure=reconfigure, progress=progress, argv=sys.argv, pool_factory=pool_factory,
                            extra_identity=extra.identity())
    except KeyboardInterrupt:
        click.echo("interrupted: finished slides are kept; run the same command again to resume", err=True)
        sys.exit(130)
    counts = report.counts
    click.echo(f"{report.out}: {counts['done']} embedded, {counts['failed']} failed, {counts['pending']} pending "
               f"(this run: {len(report.done)} done, {len(report.failed)} failed, {report.skipped} skipped)")
    for sid, error in report.failed.items():
        click.echo(f"failed: {sid}: {error}", err=True)
    if counts["failed"]:
        sys.exit(1)


commands = [embed]

"""`jwth-engine embed-regions SLIDE... --out DIR`: mixed-magnification region features, one HDF5 per slide."""

from __future__ import annotations

import json
import sys

import click

from ..config import BACKENDS, DECODES, DEFAULT_PRESET, DEVICES, PRECISIONS, READERS, field_default as _d


# `--decode auto` without a GPU model: region blocks stay with the slide reader, which read them
# faster than the raw CPU path on JPEG slides (benchmarks/results/decode_cpu.json, region_blocks:
# raw/cuCIM 0.88 on CMU-1, 0.87 on 4:2:0 JPEG, 1.17 on JPEG 2000, 2 threads on 2 cores, 8b47186).
REGION_AUTO_CPU = "region blocks read by the slide reader (faster than the raw CPU path on JPEG: benchmarks/results/decode_cpu.json)"


def backbone_stage(model, weights, *, device, backend, precision, batch_size, seed, tile_size=None):
    """(LoadedBackbone, ModelStage without a head): the backbone half of the scoring stage."""
    from ..backends import select_backend
    from ..models import load_backbone
    from ..pipeline import ModelStage

    backbone = load_backbone(model, weights, seed=seed)
    chosen = select_backend(backbone, backend=backend, device=device, precision=precision,
                            max_batch=batch_size, compile=False)
    preset = backbone.preset
    stage = ModelStage(chosen, head=None, tile_size=preset.input_size, mean=preset.mean, std=preset.std)
    return backbone, stage


def backbone_provenance(backbone, stage) -> dict:
    return {"model": backbone.preset.name, "weights_hash": backbone.weights_hash,
            "random_init": bool(backbone.random_init), "feature": "class_token",
            "backend": json.dumps(stage.backend.describe(), default=str)}


@click.command("embed-regions")
@click.argument("slides", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder (created).")
@click.option("--magnifications", default="5,10,20", show_default=True,
              help="Comma-separated magnifications (m <-> 10/m µm/px); each a whole multiple of the lowest.")
@click.option("--region-tiles", type=click.IntRange(min=1), default=1, show_default=True,
              help="r: a region is r x r tiles at the lowest magnification.")
@click.option("--model", default=DEFAULT_PRESET, show_default=True, metavar="PRESET|FILE.json")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=_d("weights"))
@click.option("--tile-size", type=click.IntRange(min=16), default=_d("tile_size"), help="Tile px (default: the preset's input size).")
@click.option("--mpp", type=float, default=_d("mpp"), help="Override the slide's level-0 µm/px.")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=_d("min_tissue"), show_default=True,
              help="Regions with a smaller tissue fraction are skipped.")
@click.option("--reader", type=click.Choice(READERS), default=_d("reader"), show_default=True)
@click.option("--decode", type=click.Choice(DECODES), default=_d("decode"), show_default=True,
              help="Who decodes the level blocks: gpu/cpu = stored tiles decoded by nvImageCodec; cucim/openslide = "
                   "that reader; auto = gpu with a GPU model, else the slide reader (measured faster here on a CPU).")
@click.option("--device", type=click.Choice(DEVICES), default=_d("device"), show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default=_d("backend"), show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=_d("precision"), show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_d("batch_size"), show_default=True)
@click.option("--workers", "num_workers", type=click.IntRange(min=0), default=_d("num_workers"), show_default=True)
@click.option("--seed", type=int, default=_d("seed"), show_default=True, help="Seed of random backbone weights.")
@click.option("--overwrite", is_flag=True, help="Embed slides whose feature file already exists (default: skip them).")
@click.option("--json", "print_json", is_flag=True, help="Print one JSON line per slide.")
def embed_regions(slides, out_dir, magnifications, region_tiles, model, weights, tile_size, mpp, min_tissue, reader,
                  decode, device, backend, precision, batch_size, num_workers, seed, overwrite, print_json):
    """Embed every tile of every tissue region of each SLIDE at each magnification with a frozen backbone;
    writes DIR/<slide>.h5 (region sequences, coordinates, layout)."""
    run_region_embedding(list(slides), out_dir, magnifications=magnifications, region_tiles=region_tiles, model=model,
                         weights=weights, tile_size=tile_size, mpp=mpp, min_tissue=min_tissue, reader=reader,
                         decode=decode, device=device, backend=backend, precision=precision, batch_size=batch_size,
                         num_workers=num_workers, seed=seed, overwrite=overwrite, print_json=print_json)


def run_region_embedding(slides, out_dir, *, magnifications, region_tiles, model, weights, tile_size, mpp,
                         min_tissue, reader, device, backend, precision, batch_size, num_workers, seed,
                         decode=_d("decode"), mpps=None, overwrite=False, print_json=False) -> None:
    """The region path of `embed-regions` and of `embed --magnifications/--region-tiles`; `mpps`
    gives per-slide MPPs (a manifest's), else `mpp` applies to all. One slide: a bad slide is its
    one-line error (exit 2). Several: each bad slide is a `failed:` line, the others are embedded,
    and the run exits 1; slides already embedded are skipped, so running it again retries the rest."""
    from ..errors import SlideError
    from ..models import get_preset
    from ..regions.extract import check_layout, extract_slide, output_path, prepare_slide
    from ..regions.planning import RegionLayout, parse_magnifications
    from ..scoring import check_out_dir
    from ..slide.decoding import reader_for, resolve_decode

    reader = reader_for(decode, reader)      # a contradiction fails before any slide is opened
    if decode in ("gpu", "cpu"):
        resolve_decode(decode, None)         # so does an explicit decoder this machine lacks
    layout = RegionLayout(parse_magnifications(magnifications), region_tiles, tile_size or get_preset(model).input_size)
    check_layout(layout)
    # Checked now, created only once a slide has been opened and planned: a slide that cannot give
    # the magnifications asked for leaves nothing behind, not even the folder.
    out = check_out_dir(out_dir, create=False)
    todo = [s for s in slides if overwrite or not output_path(out, s).exists()]
    for s in slides:
        if s not in todo:
            click.echo(f"{s}: {output_path(out, s)} exists, skipped", err=True)
    if not todo:
        return
    loaded = None
    failed: list[str] = []

    def slide_failed(s: str, exc: SlideError) -> None:
        if len(slides) == 1:
            raise exc
        # One bad slide of many: said, counted, and the others still run (as bulk `embed`).
        failed.append(s)
        click.echo(f"failed: {exc}", err=True)

    for s in todo:
        slide_mpp = (mpps or {}).get(s, mpp)
        try:
            prepared = prepare_slide(s, layout, mpp=slide_mpp, reader=reader, min_tissue=min_tissue)
        except SlideError as exc:
            slide_failed(s, exc)
            continue
        try:
            if loaded is None:          # the first readable slide: load the model, create the folder
                backbone, stage = backbone_stage(model, weights, device=device, backend=backend,
                                                 precision=precision, batch_size=batch_size, seed=seed)
                request = resolve_decode(decode, stage.backend.device, auto_cpu=REGION_AUTO_CPU)
                loaded = (backbone, stage, backbone_provenance(backbone, stage), request)
                check_out_dir(out)
        except BaseException:
            prepared.close()
            raise
        backbone, stage, provenance, request = loaded
        try:
            result = extract_slide(prepared, out, stage, dim=backbone.embed_dim, provenance=provenance,
                                   min_tissue=min_tissue, batch_size=batch_size, num_workers=num_workers,
                                   decode=request)
        except SlideError as exc:       # a stored tile that cannot be decoded, found mid-slide
            slide_failed(s, exc)
            continue
        st = result.stats
        record = {"slide": s, "out": str(result.path), "layout": layout.to_dict(), "regions": result.regions,
                  "tiles": st.tiles, "decoded_px": st.decoded_px, "wall_s": round(st.wall_s, 3),
                  "levels": [r.level for r in result.plan.reads], "decode": result.decode}
        if print_json:
            click.echo(json.dumps(record))
        else:
            decoders = ", ".join(f"level {level}: {d['decoder']}" for level, d in result.decode.items())
            click.echo(f"{s}: {result.regions} regions x {layout.length} tiles ({layout.describe()}), "
                       f"{st.tiles} tiles embedded in {st.wall_s:.1f}s ({decoders}) -> {result.path}")
    if failed:
        click.echo(f"{out}: {len(todo) - len(failed)} embedded, {len(failed)} failed (listed above), "
                   f"{len(slides) - len(todo)} skipped as already embedded; "
                   "run the same command again to retry them", err=True)
        sys.exit(1)


commands = [embed_regions]

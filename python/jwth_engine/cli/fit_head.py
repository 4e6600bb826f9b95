"""`jwth-engine fit-head LABELS.csv`: train a JWTH (or linear-probe) head for a biomarker."""

from __future__ import annotations

import json

import click

from .options import BACKENDS, DEVICES, POOLINGS, PRECISIONS


@click.command("fit-head")
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", default="jwth_vitl14_reg4", show_default=True, metavar="PRESET|FILE.json")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--pooling", type=click.Choice(POOLINGS), default="jwth", show_default=True)
@click.option("--num-heads", type=click.IntRange(min=1), default=8, show_default=True,
              help="Attention heads of the JWTH pooling (must divide the embedding dim).")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Head file to write (.safetensors).")
@click.option("--root", type=click.Path(file_okay=False, exists=True), default=None,
              help="Folder relative tile paths resolve against (default: the CSV's folder).")
@click.option("--where", multiple=True, metavar="COLUMN=VALUE", help="Keep only matching rows (repeatable).")
@click.option("--tile-size", type=click.IntRange(min=16), default=None, help="Default: the preset's.")
@click.option("--target-mpp", type=float, default=None,
              help="Resolution the training tiles were cut at (recorded; default: the preset's).")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 0.9), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--json", "print_json", is_flag=True, help="Print the training report as JSON.")
def fit_head(labels_csv, model, weights, pooling, num_heads, out_path, root, where, tile_size,
             target_mpp, epochs, lr, val_fraction, seed, device, backend, precision, batch_size, print_json):
    """Train a head on labelled tiles (CSV with `path` and `label` columns) with a frozen backbone."""
    import numpy as np

    from ..backends import select_backend
    from ..errors import ConfigError
    from ..heads import HeadMeta, save_head
    from ..heads.fit import embed_tiles, load_tile_images, read_labels_csv, train_head
    from ..models import load_backbone
    from ..pipeline import ModelStage

    conditions = []
    for item in where:
        column, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--where {item!r}: expected COLUMN=VALUE")
        conditions.append((column, value))
    data = read_labels_csv(labels_csv, root=root, where=conditions)
    backbone = load_backbone(model, weights, seed=seed)
    if pooling == "jwth" and backbone.embed_dim % num_heads:
        raise ConfigError(f"--num-heads {num_heads} does not divide the embedding dim {backbone.embed_dim}")
    preset = backbone.preset
    tile_size = tile_size or preset.input_size
    chosen = select_backend(backbone, backend=backend, device=device, precision=precision,
                            max_batch=batch_size, compile=False)
    stage = ModelStage(chosen, head=None, tile_size=tile_size, mean=preset.mean, std=preset.std)
    tiles = load_tile_images(data.paths, tile_size)
    tokens = embed_tiles(tiles, stage, batch_size)
    labels = np.array([data.classes.index(label) for label in data.labels])
    head, report = train_head(
        tokens, labels, pooling=pooling, num_classes=len(data.classes), num_heads=num_heads,
        num_prefix_tokens=backbone.num_prefix_tokens, epochs=epochs, lr=lr, val_fraction=val_fraction,
        seed=seed, classes=data.classes, log=lambda msg: click.echo(msg, err=True),
        warn=lambda msg: click.echo(f"warning: {msg}", err=True),
    )
    # Listed in the --json report so that the validation score can be checked; kept out of the head
    # file, whose metadata would grow with the data set.
    val_tiles = [str(data.paths[i]) for i in report.pop("val_tiles")]
    report.update({"labels_csv": str(labels_csv), "num_tiles": len(labels), "classes": data.classes,
                   "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(data.classes)},
                   "backbone_random_init": backbone.random_init})
    meta = HeadMeta(pooling=pooling, classes=data.classes, num_heads=num_heads if pooling == "jwth" else 0,
                    dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                    backbone_preset=preset.name, backbone_weights_hash=backbone.weights_hash,
                    tile_size=tile_size, target_mpp=target_mpp or preset.native_mpp, training=report)
    report["sha256"] = save_head(head, meta, out_path)
    report["val_tiles"] = val_tiles
    if print_json:
        click.echo(json.dumps(report, indent=2))
    else:
        val = report["val_balanced_accuracy"]
        split = ", ".join(f"{c} {n['train']}/{n['val']}" for c, n in report["split"].items())
        click.echo(f"wrote {out_path}: {pooling} head, {len(data.classes)} classes; tiles train/val: {split}")
        click.echo(f"epoch {report['selected_epoch'] + 1} (last): balanced accuracy train "
                   f"{report['train_balanced_accuracy']:.3f}, validation "
                   + (f"{val:.3f} on {report['num_val']} tiles" if val is not None else "not measured (--val-fraction 0)"))


commands = [fit_head]

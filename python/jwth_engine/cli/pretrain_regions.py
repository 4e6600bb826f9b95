"""`jwth-engine pretrain-regions FEATURES_DIR -o region_encoder.safetensors`: MEM pretraining of the
region mixing encoder on the region feature files `embed-regions` wrote."""

from __future__ import annotations

import json

import click

from ..config import field_default as _d

# Pretraining's own settings (not the tile-head training group's epochs/lr, which share the names).
PRETRAIN_EPOCHS = 50
PRETRAIN_LR = 1e-3


@click.command("pretrain-regions")
@click.argument("features_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Region encoder file to write (.safetensors).")
@click.option("--mask-ratio", type=float, default=0.5, show_default=True, help="Share of each region's slots hidden.")
@click.option("--epochs", type=click.IntRange(min=1), default=PRETRAIN_EPOCHS, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=PRETRAIN_LR, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--dim", type=click.IntRange(min=8), default=64, show_default=True, help="Encoder width.")
@click.option("--depth", type=click.IntRange(min=1), default=2, show_default=True, help="Encoder layers.")
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=0.1, show_default=True)
@click.option("--seed", type=int, default=_d("seed"), show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint written after every epoch (default: OUT.ckpt).")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint when it exists.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--json", "print_json", is_flag=True, help="Print the training report as JSON.")
def pretrain_regions(features_dir, out_path, mask_ratio, epochs, batch_size, lr, weight_decay, dim, depth, heads,
                     val_fraction, seed, checkpoint, resume, threads, print_json):
    """Masked-embedding-modelling pretraining: hide --mask-ratio of each region's tile embeddings,
    reconstruct them (per-magnification weighted cosine loss), AdamW."""
    import numpy as np
    import torch

    from ..errors import ConfigError
    from ..regions.encoder import save_region_encoder
    from ..regions.io import load_feature_dir
    from ..regions.mem import PretrainConfig, masked_count, pretrain

    if threads:
        torch.set_num_threads(threads)
    files = load_feature_dir(features_dir)
    layout = files[0].layout
    masked_count(layout.length, mask_ratio)
    seqs = torch.from_numpy(np.concatenate([f.features for f in files if len(f.features)]))
    if len(seqs) == 0:
        raise ConfigError(f"{features_dir}: the feature files hold no regions")
    cfg = PretrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, mask_ratio=mask_ratio,
                         val_fraction=val_fraction, seed=seed, encoder={"dim": dim, "depth": depth, "heads": heads})
    model, report = pretrain(seqs, layout, cfg, checkpoint=checkpoint or f"{out_path}.ckpt", resume=resume,
                             log=lambda msg: click.echo(msg, err=True))
    sources = sorted({(f.attrs.get("model"), f.attrs.get("weights_hash")) for f in files})
    report.update({"features_dir": str(features_dir), "slides": [f.slide_id for f in files], "layout": layout.to_dict(),
                   "backbone": [{"model": m, "weights_hash": h} for m, h in sources]})
    save_region_encoder(model, out_path, {"training": report})
    if print_json:
        click.echo(json.dumps(report, indent=2))
    else:
        val = report["val"] or report["train_eval"]
        which = "val" if report["val"] else "train (too few regions for a validation split)"
        click.echo(f"wrote {out_path}: {layout.describe()}, {report['regions']} regions from {len(files)} slides; "
                   f"{which} masked cosine {val['masked_cosine']:.3f} vs mean embedding {val['mean_embedding_cosine']:.3f}")


commands = [pretrain_regions]

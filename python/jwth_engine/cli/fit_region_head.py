"""`jwth-engine fit-region-head FEATURES_DIR LABELS.csv --encoder E -o HEAD`: gated AB-MIL over region
embeddings, reported beside AB-MIL on the 20x tiles alone of the same slides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from ..config import field_default as _d


def read_slide_labels(path: str) -> dict[str, str]:
    from ..errors import ConfigError

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slide_id", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: slide labels CSV needs 'slide_id' and 'label' columns")
    return {r["slide_id"].strip(): r["label"].strip() for r in rows if r["label"].strip()}


@click.command("fit-region-head")
@click.argument("features_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--encoder", "encoder_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Region encoder from pretrain-regions.")
@click.option("--embedding", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="Region embedding: mean of the contextualised tiles, or the compressed class token.")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Slide head (.safetensors).")
@click.option("--scores", "scores_path", type=click.Path(dir_okay=False), default=None,
              help="Per-slide scores CSV (out-of-fold when cross-validated).")
@click.option("--baseline-magnification", type=float, default=20.0, show_default=True,
              help="Magnification whose tiles alone form the baseline bags.")
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=0.1, show_default=True)
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--seed", type=int, default=_d("seed"), show_default=True)
@click.option("--json", "print_json", is_flag=True, help="Print the report as JSON.")
def fit_region_head(features_dir, labels_csv, encoder_path, embedding, out_path, scores_path, baseline_magnification,
                    epochs, lr, label_smoothing, folds, seed, print_json):
    """Train gated AB-MIL over each slide's region embeddings (slide labels: CSV with slide_id, label),
    cross-validated, next to the same head on the slides' 20x tiles alone."""
    import numpy as np

    from ..errors import ConfigError
    from ..heads.slide_io import SlideHeadMeta, save_slide_head
    from ..outputs.atomic import atomic_write_bytes
    from ..regions.encoder import load_region_encoder
    from ..regions.io import load_feature_dir
    from ..regions.mil import MilConfig, config_dict, cross_validate, predict, region_bags, tile_bags, train_abmil

    labels_by_slide = read_slide_labels(labels_csv)
    files = [f for f in load_feature_dir(features_dir) if f.slide_id in labels_by_slide]
    empty = [f.slide_id for f in files if len(f.features) == 0]
    files = [f for f in files if len(f.features)]
    if len(files) < 2:
        raise ConfigError(f"{labels_csv}: fewer than two labelled slides with regions in {features_dir}")
    encoder, meta = load_region_encoder(encoder_path)
    layout = files[0].layout
    if layout != encoder.layout or files[0].features.shape[2] != encoder.cfg.in_dim:
        raise ConfigError(f"{encoder_path}: encoder was trained on {encoder.layout.describe()} D={encoder.cfg.in_dim}, "
                          f"the features are {layout.describe()} D={files[0].features.shape[2]}")
    classes = sorted({labels_by_slide[f.slide_id] for f in files})
    if len(classes) < 2:
        raise ConfigError(f"{labels_csv}: need at least two classes, found {classes}")
    labels = np.array([classes.index(labels_by_slide[f.slide_id]) for f in files])
    cfg = MilConfig(epochs=epochs, lr=lr, label_smoothing=label_smoothing, folds=folds, seed=seed)
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731

    feats = [f.features for f in files]
    bags = {f"regions_{embedding}": region_bags(encoder, feats, embedding),
            f"tiles_{baseline_magnification:g}x": tile_bags(feats, files[0].slots_at(baseline_magnification))}
    report = {"slides": len(files), "skipped_without_regions": empty, "classes": classes,
              "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
              "config": config_dict(cfg), "layout": layout.to_dict(), "encoder": str(encoder_path), "heads": {}}
    oof_all = {}
    for name, slide_bags in bags.items():
        log(f"{name}: {sum(len(b) for b in slide_bags)} instances over {len(files)} slides")
        oof, cv = cross_validate(slide_bags, labels, len(classes), cfg, log=log)
        oof_all[name] = oof
        report["heads"][name] = {"dim": int(slide_bags[0].shape[1]), "cross_validation": cv}
    head = train_abmil(bags[f"regions_{embedding}"], labels, len(classes), cfg)
    final = predict(head, bags[f"regions_{embedding}"])
    enc_meta = meta.get("training", {}).get("backbone") or [{}]
    slide_meta = SlideHeadMeta(kind="abmil", classes=classes, dim=encoder.cfg.dim, feature_kind=f"region_{embedding}",
                               encoder=str(enc_meta[0].get("model")), encoder_weights_hash=str(enc_meta[0].get("weights_hash")),
                               hidden=cfg.hidden, dropout=cfg.dropout, tile_size=layout.tile_size,
                               training={**report, "region_encoder": str(encoder_path)})
    report["sha256"] = save_slide_head(head, slide_meta, out_path)
    if scores_path:
        rows = ["slide_id,label,scored_by," + ",".join(f"prob_{c}" for c in classes)]
        key = f"regions_{embedding}"
        probs, how = (oof_all[key], "out_of_fold") if oof_all[key] is not None else (final, "in_sample")
        for f, p in zip(files, probs):
            rows.append(f"{f.slide_id},{labels_by_slide[f.slide_id]},{how}," + ",".join(f"{v:.6f}" for v in p))
        atomic_write_bytes(scores_path, ("\n".join(rows) + "\n").encode())
    if print_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"wrote {out_path}: AB-MIL over {embedding} region embeddings, {len(files)} slides, classes {classes}")
    for name, entry in report["heads"].items():
        cv = entry["cross_validation"]
        text = (f"AUROC {cv['auroc']:.3f}, balanced accuracy {cv['balanced_accuracy']:.3f} ({cv['folds']}-fold)"
                if cv else "no cross-validation (a class has fewer than 2 slides)")
        click.echo(f"  {name:>16}: {text}")
    if scores_path:
        click.echo(f"wrote {Path(scores_path)}")


commands = [fit_region_head]

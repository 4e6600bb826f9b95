"""`jwth-engine fit-slide-head MANIFEST --features DIR --head abmil|wsc|mean|max -o HEAD`; with
`--regions --region-encoder ENC`, over region embeddings beside the tiles of one magnification."""

from __future__ import annotations

import json

import click

from ..config import SlideTrainingConfig
from .options import config_options, pop_settings


@click.command("fit-slide-head")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--features", "features_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of <slide_id>.h5 feature files (embed's features_<model>[_<kind>]/).")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Slide head to write (.safetensors); the report goes next to it (.report.json, .predictions.csv).")
@config_options(SlideTrainingConfig)
@click.option("--json", "print_json", is_flag=True, help="Print the report as JSON instead of a table.")
def fit_slide_head(manifest, features_dir, out_path, print_json, **settings):
    """Train a slide head on bags of tile features (MANIFEST: slide_id,label[,split,patient]); with
    --regions, on bags of region embeddings, reported beside the same head on one magnification's tiles."""
    from pathlib import Path

    from ..heads.fit_slide import fit_slide_head as fit
    from ..heads.slide_io import save_slide_head
    from ..outputs.atomic import atomic_write_bytes
    from ..regions.mil import fit_region_heads

    cfg = SlideTrainingConfig(**pop_settings(settings, SlideTrainingConfig))
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if cfg.regions:
        result, baseline = fit_region_heads(manifest, features_dir, cfg, log=log)
    else:
        result, baseline = fit(manifest, features_dir, cfg, log=log), None
    report = result.report
    report["sha256"] = save_slide_head(result.module, result.meta, out_path)
    stem = str(Path(out_path).with_suffix(""))
    atomic_write_bytes(stem + ".report.json", (json.dumps(report, indent=2) + "\n").encode())
    columns = list(result.predictions[0])
    lines = [",".join(columns)] + [",".join(_csv_cell(p[c]) for c in columns) for p in result.predictions]
    atomic_write_bytes(stem + ".predictions.csv", ("\n".join(lines) + "\n").encode())
    if print_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_report(report))
    if baseline is not None:
        click.echo(f"beside it, the same head on {baseline.report['bags']} of the same slides (same splits, seed):")
        click.echo(render_report(baseline.report))
    click.echo(f"wrote {out_path}, {stem}.report.json, {stem}.predictions.csv")


def _csv_cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text or '"' in text else text


def render_report(report: dict) -> str:
    classes = report["classes"]
    bags = f" over {report['bags']}" if "bags" in report else ""
    out = [f"{report['kind']} slide head{bags}, {report['num_slides']} slides ({report['num_patients']} patients), "
           f"classes {', '.join(classes)}",
           f"selection: {report['selection']}; chosen epoch {report['chosen_epoch']} of {report['epochs_run']} run"]
    sets = [(s, report[s]) for s in ("train", "val", "test", "cross_validated") if s in report]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    out.append(f"{'set':<16}{'n':>5}{'bal.acc':>9}{'AUROC':>8}  " + "  ".join(f"rec.{c}" for c in classes))
    for name, m in sets:
        recalls = "  ".join(f"{fmt(m['per_class_recall'][c]):>{len(c) + 4}}" for c in classes)
        out.append(f"{name:<16}{m['n']:>5}{fmt(m['balanced_accuracy']):>9}{fmt(m['auroc']):>8}  {recalls}")
    for name, m in sets:
        out.append(f"confusion ({name}, rows true {'/'.join(classes)}): {m['confusion_matrix']}")
    return "\n".join(out)


commands = [fit_slide_head]

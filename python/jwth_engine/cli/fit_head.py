"""`jwth-engine fit-head LABELS.csv`: train a JWTH (or linear-probe) head for a biomarker."""

from __future__ import annotations

import json

import click

from ..config import ModelConfig, RuntimeConfig, TilingConfig, TrainingConfig
from .options import config_options, pop_settings, run_config


@click.command("fit-head")
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False))
@config_options(ModelConfig, exclude=("head",))
@config_options(TrainingConfig)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Head file to write (.safetensors).")
@click.option("--root", type=click.Path(file_okay=False, exists=True), default=None,
              help="Folder relative tile paths resolve against (default: the CSV's folder).")
@click.option("--where", multiple=True, metavar="COLUMN=VALUE", help="Keep only matching rows (repeatable).")
@config_options(TilingConfig, exclude=("mpp", "min_tissue", "reader"))
@config_options(RuntimeConfig, exclude=("compile", "num_workers"))
@click.option("--json", "print_json", is_flag=True, help="Print the training report as JSON.")
def fit_head(labels_csv, out_path, root, where, print_json, **settings):
    """Train a head on labelled tiles (CSV with `path` and `label` columns) with a frozen backbone."""
    from ..errors import ConfigError
    from ..scoring.fit import fit_head as fit

    conditions = []
    for item in where:
        column, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--where {item!r}: expected COLUMN=VALUE")
        conditions.append((column, value))
    training = TrainingConfig(**pop_settings(settings, TrainingConfig))
    report = fit(labels_csv, out_path, run_config(settings), training, root=root, where=conditions,
                 log=lambda msg: click.echo(msg, err=True),
                 warn=lambda msg: click.echo(f"warning: {msg}", err=True))
    report["plots"] = _write_training_plots(out_path, report)
    if print_json:
        click.echo(json.dumps(report, indent=2))
    else:
        val = report["val_balanced_accuracy"]
        split = ", ".join(f"{c} {n['train']}/{n['val']}" for c, n in report["split"].items())
        click.echo(f"wrote {out_path}: {report['pooling']} head, {len(report['classes'])} classes; "
                   f"tiles train/val: {split}")
        click.echo(f"epoch {report['selected_epoch'] + 1} (last): balanced accuracy train "
                   f"{report['train_balanced_accuracy']:.3f}, validation "
                   + (f"{val:.3f} on {report['num_val']} tiles" if val is not None else "not measured (--val-fraction 0)"))



def _write_training_plots(out_path, report) -> list[str]:
    """HEAD.curves.png and HEAD.confusion.png beside the head file."""
    from pathlib import Path

    from ..outputs.figures import write_png
    from ..outputs.plots import confusion_matrix_plot, training_curves

    stem = Path(out_path)
    stem = stem.with_name(stem.name.removesuffix(".safetensors"))
    curves, matrix = Path(f"{stem}.curves.png"), Path(f"{stem}.confusion.png")
    classes = report["classes"]
    write_png(training_curves(report["history"], title=f"{report['pooling']} head, {len(classes)} classes: "
                                                       f"kept epoch {report['selected_epoch'] + 1} (last)"), curves)
    write_png(confusion_matrix_plot(report["confusion"], classes,
                                    title=f"kept epoch, {report['confusion_split']} tiles"), matrix)
    return [curves.name, matrix.name]


commands = [fit_head]

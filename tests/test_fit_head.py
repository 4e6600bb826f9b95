"""fit-head trains a head on real labelled H&E tiles, and `score --head` uses it."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from jwth_engine.errors import JwthError
from jwth_engine.heads import load_head
from jwth_engine.heads.fit import balanced_accuracy, read_labels_csv


def test_read_labels_csv_filters_and_validates(data_dir, tmp_path):
    data = read_labels_csv(data_dir / "tiles/labels.csv", root=data_dir, where=[("label_type", "tissue_class")])
    assert data.classes == ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert len(data.paths) == 33 and all(p.is_file() for p in data.paths)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,y\na.png,1\n")
    with pytest.raises(JwthError, match="'path' and 'label'"):
        read_labels_csv(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nnope.png,A\nnope2.png,B\n")
    with pytest.raises(JwthError, match="nope.png"):
        read_labels_csv(missing)


def test_linear_probe_standardisation_folds_exactly():
    import torch
    from torch import nn

    from jwth_engine.heads.fit import _fold_standardisation, _standardised_class_tokens

    g = torch.Generator().manual_seed(0)
    tokens = 5.0 + 0.05 * torch.randn(20, 7, 16, generator=g, dtype=torch.float64)
    scaled, mean, std = _standardised_class_tokens(tokens, np.arange(15))
    assert torch.allclose(scaled[:15, 0].mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(scaled[:15, 0].std(0, unbiased=False), torch.ones(16, dtype=torch.float64))
    layer = nn.Linear(16, 3).double()
    expected = layer(scaled[:, 0])
    _fold_standardisation(layer, mean, std)
    assert torch.allclose(layer(tokens[:, 0]), expected, rtol=1e-9, atol=1e-9)


def test_balanced_accuracy():
    target = np.array([0, 0, 0, 0, 1])
    assert balanced_accuracy(np.zeros(5, int), target, 2) == 0.5
    assert balanced_accuracy(target.copy(), target, 2) == 1.0


@pytest.mark.parametrize("pooling", ["jwth", "linear-probe"])
def test_fit_head_then_score(pooling, cli_cmd, data_dir, cmu_small, tmp_path):
    head_path = tmp_path / f"{pooling}.safetensors"
    proc = subprocess.run(
        [*cli_cmd, "fit-head", str(data_dir / "tiles/labels.csv"), "--root", str(data_dir),
         "--where", "label_type=tissue_class", "--model", "test_tiny_patch14_reg4", "--pooling", pooling,
         "--num-heads", "4", "--epochs", "40", "--lr", "3e-3", "--val-fraction", "0.25", "--precision", "fp32",
         "-o", str(head_path), "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["last_loss"] < 0.8 * report["first_loss"]
    # 8 classes: chance is 0.125. Even a random tiny backbone separates these tiles' colour/texture;
    # the training score says the head learned, the held-out one that it did not only memorise
    # (one or two validation tiles per class: a coarse but honest estimate, above chance).
    assert report["train_balanced_accuracy"] > 0.6
    assert report["val_balanced_accuracy"] > 0.125 and report["num_val"] >= 8
    head = load_head(head_path)
    assert head.meta.classes[0] == "ADI" and head.meta.pooling == pooling
    assert head.meta.training["num_tiles"] == 33 and head.meta.training["num_train"] + report["num_val"] == 33
    proc = subprocess.run([*cli_cmd, "score", str(cmu_small), "--head", str(head_path), "--out",
                           str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model"]["preset"] == "test_tiny_patch14_reg4"  # taken from the head file
    assert summary["head"]["pooling"] == pooling and not summary["head"]["random_init"]
    assert set(summary["scores"]) == set(head.meta.classes)

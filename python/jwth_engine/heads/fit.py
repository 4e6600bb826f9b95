"""Train a head (JWTH pooling or linear probe) on labelled tiles with a frozen backbone.

The backbone runs once over every tile and its tokens are kept (fp16, on the CPU), so each epoch
costs only the head. Class-balanced cross-entropy, AdamW, a fixed number of epochs and the last one kept; balanced
accuracy (the paper's metric) is reported on the training and the held-out split, with the size of
each class in both.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import TrainingConfig
from ..errors import FitError
from .reference import build_head


@dataclass
class LabelledTiles:
    paths: list[Path]
    labels: list[str]
    classes: list[str]


def read_labels_csv(csv_path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                    where: Sequence[tuple[str, str]] = ()) -> LabelledTiles:
    """CSV with `path` and `label` columns; relative paths resolve against `root` (default: the
    CSV's folder). `where` keeps rows whose COLUMN equals VALUE. Rows with an empty label are skipped."""
    csv_path = Path(csv_path)
    base = Path(root) if root else csv_path.parent
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise FitError(f"{csv_path}: cannot read labels file ({exc.strerror})") from exc
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise FitError(f"{csv_path}: labels CSV needs 'path' and 'label' columns")
    for column, _ in where:
        if column not in rows[0]:
            raise FitError(f"{csv_path}: where column {column!r} is not in the CSV", field="where")
    paths, labels = [], []
    for row in rows:
        if any(row.get(c) != v for c, v in where) or not row["label"].strip():
            continue
        path = Path(row["path"])
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise FitError(f"{path}: tile image listed in {csv_path.name} not found")
        paths.append(path)
        labels.append(row["label"].strip())
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise FitError(f"{csv_path}: need at least two classes to train a head, found {classes}")
    return LabelledTiles(paths, labels, classes)


def load_tile_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """RGB uint8 [h, w, 3] per tile, at the size it was saved: resizing to the model's input is
    `preprocess`'s job, the same antialiased kernel scoring uses (no train/score skew)."""
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                out.append(np.asarray(img.convert("RGB")))
        except OSError as exc:
            raise FitError(f"{path}: cannot read tile image ({exc})") from exc
    return out


def embed_tiles(tiles: Sequence[np.ndarray], stage, batch_size: int) -> torch.Tensor:
    """Token tensors [N, T, D] (fp16 on CPU) for uint8 tiles, through a pipeline ModelStage
    (preprocess, backbone); consecutive tiles of one size are batched together."""
    chunks = []
    start = 0
    while start < len(tiles):
        end = start + 1
        while end < len(tiles) and end - start < batch_size and tiles[end].shape == tiles[start].shape:
            end += 1
        images = stage.preprocess(np.stack(tiles[start:end]))
        chunks.append(stage.embed(images).to("cpu", torch.float16))
        start = end
    return torch.cat(chunks)


def balanced_accuracy(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    recalls = [(pred[target == c] == c).mean() for c in range(num_classes) if (target == c).any()]
    return float(np.mean(recalls))


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: each class with at least two tiles gives round(n * val_fraction) of them,
    at least one, to validation (flooring would leave every class of a small set with none);
    a class with a single tile stays in training."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0
        if val_fraction > 0 and len(idx) > 1:
            n_val = min(len(idx) - 1, max(1, int(round(len(idx) * val_fraction))))
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def split_sizes(labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, classes: Sequence[str]) -> dict:
    """{class: {"train": n, "val": n}} for the report."""
    return {name: {"train": int((labels[train_idx] == i).sum()), "val": int((labels[val_idx] == i).sum())}
            for i, name in enumerate(classes)}


def _standardised_class_tokens(tokens: torch.Tensor, train_idx: np.ndarray):
    """Class tokens z-scored with the training split's statistics: (tokens with token 0 replaced,
    mean, std). A linear probe trains on these, as MAE's protocol does with a BatchNorm without
    affine parameters in front of the classifier: class tokens vary by a few percent between tiles,
    too little for a few hundred optimiser steps on the raw scale."""
    cls = tokens[train_idx, 0].double()
    mean = cls.mean(0)
    std = cls.std(0, unbiased=False) if len(train_idx) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-6 * cls.abs().mean().clamp_min(1e-30), std, torch.ones_like(std))
    scaled = tokens.clone()
    scaled[:, 0] = ((tokens[:, 0].double() - mean) / std).to(tokens.dtype)
    return scaled, mean, std


def _fold_standardisation(classifier: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """W((x - m)/s) + b  ==  (W/s) x + (b - (W/s) m): the saved head takes raw class tokens."""
    with torch.no_grad():
        weight = classifier.weight.double() / std
        classifier.bias.copy_((classifier.bias.double() - weight @ mean).to(classifier.bias.dtype))
        classifier.weight.copy_(weight.to(classifier.weight.dtype))


def train_head(tokens: torch.Tensor, labels: np.ndarray, *, pooling: str, num_classes: int,
               num_prefix_tokens: int, training: TrainingConfig, seed: int, weight_decay: float = 1e-4,
               batch_size: int = 64, classes: Sequence[str] | None = None,
               log: Callable[[str], None] = lambda _: None,
               warn: Callable[[str], None] = lambda _: None) -> tuple[nn.Module, dict]:
    """Train on precomputed tokens [N, T, D] for `epochs` and keep the last epoch; returns the head
    (eval mode) and its report. Validation tiles are only measured, never used to pick an epoch, so
    the reported validation score is an unbiased estimate for that split (a best-epoch choice on a
    few tiles would report the luckiest of `epochs` draws)."""
    num_heads, epochs, lr, val_fraction = training.num_heads, training.epochs, training.lr, training.val_fraction
    classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
    torch.manual_seed(seed)
    dim = tokens.shape[-1]
    head = build_head(pooling, dim, num_classes, num_heads, num_prefix_tokens)
    train_idx, val_idx = _split(labels, val_fraction, seed)
    sizes = split_sizes(labels, train_idx, val_idx, classes)
    unvalidated = [c for c, n in sizes.items() if n["val"] == 0]
    if val_fraction > 0:
        if not len(val_idx):
            raise FitError(f"val_fraction {val_fraction:g}: no class has two tiles, so there is nothing to "
                           f"validate on; add tiles or set it to 0 (training accuracy only)", field="val_fraction")
        if unvalidated:
            warn(f"classes with a single tile have no validation tiles and are missing from the validation "
                 f"score: {', '.join(unvalidated)}")
    if pooling == "linear-probe":
        tokens, cls_mean, cls_std = _standardised_class_tokens(tokens, train_idx)
    y = torch.as_tensor(labels, dtype=torch.long)
    counts = np.bincount(labels[train_idx], minlength=num_classes).astype(np.float64)
    weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0),
                           dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        head.train()
        order = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = loss_fn(head(tokens[batch].float()).logits, y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        head.eval()
        with torch.no_grad():
            pred = head(tokens.float()).logits.argmax(-1).numpy()
        train_bacc = balanced_accuracy(pred[train_idx], labels[train_idx], num_classes)
        val_bacc = balanced_accuracy(pred[val_idx], labels[val_idx], num_classes) if len(val_idx) else None
        history.append({"epoch": epoch, "loss": total / len(order), "train_bacc": train_bacc, "val_bacc": val_bacc})
        log(f"epoch {epoch + 1}/{epochs} loss {history[-1]['loss']:.4f} train bacc {train_bacc:.3f}"
            + (f" val bacc {val_bacc:.3f}" if val_bacc is not None else ""))
    # The kept (last) epoch's confusion matrix (rows: true class), on the validation split when
    # there is one; computed before a linear probe's standardisation is folded in, on the tokens it
    # was trained on.
    split = val_idx if len(val_idx) else train_idx
    with torch.no_grad():
        pred = head(tokens[split].float()).logits.argmax(-1).numpy()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels[split], pred), 1)
    if pooling == "linear-probe":
        _fold_standardisation(head.classifier, cls_mean, cls_std)
    final = history[-1]
    report = {
        "pooling": pooling, "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "seed": seed,
        "val_fraction": val_fraction, "num_train": int(len(train_idx)), "num_val": int(len(val_idx)),
        "split": sizes, "classes_without_validation": unvalidated if len(val_idx) else list(classes),
        "selected_epoch": final["epoch"], "selection": "last epoch (validation is not used to choose)",
        "train_balanced_accuracy": final["train_bacc"], "val_balanced_accuracy": final["val_bacc"],
        "val_tiles": val_idx.tolist(),
        "first_loss": history[0]["loss"], "last_loss": final["loss"],
        "history": history, "confusion": confusion.tolist(),
        "confusion_split": "validation" if len(val_idx) else "training",
    }
    return head.eval(), report

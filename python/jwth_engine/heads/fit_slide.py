"""Train a slide head (heads/mil.py) on per-slide feature files written by `embed` (or TRIDENT/CLAM).

Data: a manifest CSV `slide_id,label[,split,patient]` and a folder of `<slide_id>.h5`. Each step
sees one whole bag (no padding, no truncation); gradients of `bags_per_step` bags are summed
before an AdamW step. Class-balanced cross-entropy (weights from the training slides).

Splits are by patient, so no patient's slides sit on both sides: a `split` column (train / val /
test) is used as given; otherwise patients are drawn per class into a validation share
(`val_fraction`). With `folds` K, patients are dealt into K stratified folds, each fold is the
validation set once (the out-of-fold predictions give the cross-validated metrics), and the head
that is saved is retrained on every non-test slide for the median of the folds' chosen epochs.

Early stopping watches validation balanced accuracy (ties: lower validation loss) with `patience`
epochs; the weights of the chosen epoch are restored and every reported metric is computed again
from the head as saved, so the report describes the file, not the best value seen during training.
Validation metrics are those of the set the epoch was chosen on (optimistic); a `test` split, or
the out-of-fold metrics of `folds`, are the unbiased estimate.

Bags live in memory when they fit `cache_bytes` (default 8 GiB), else each is read from its file
when needed, so a cohort of 100k-tile bags trains in the memory of one bag plus the model.
"""

from __future__ import annotations

import copy
import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import SlideTrainingConfig
from ..errors import ConfigError
from ..outputs.features_h5 import read_features_h5
from .mil import build_slide_head
from .slide_io import SlideHeadMeta
from .slide_metrics import balanced_accuracy, classification_report

SPLITS = ("train", "val", "test")


@dataclass
class SlideRow:
    slide_id: str
    label: str
    split: str | None
    patient: str


def read_slide_manifest(path: str | os.PathLike) -> list[SlideRow]:
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read manifest ({exc.strerror})") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a CSV manifest ({exc})") from exc
    if not rows or not {"slide_id", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: manifest needs 'slide_id' and 'label' columns (optional 'split', 'patient')")
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        sid, label = (row.get("slide_id") or "").strip(), (row.get("label") or "").strip()
        if not sid or not label:
            raise ConfigError(f"{path}: line {i} has an empty slide_id or label")
        if sid in seen:
            raise ConfigError(f"{path}: slide_id {sid!r} appears twice")
        seen.add(sid)
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise ConfigError(f"{path}: line {i}: split {split!r} is not one of {', '.join(SPLITS)}")
        out.append(SlideRow(sid, label, split, (row.get("patient") or "").strip() or sid))
    classes = sorted({r.label for r in out})
    if len(classes) < 2:
        raise ConfigError(f"{path}: a slide head needs at least two classes, the manifest has only {classes}")
    return out


class BagStore:
    """The bags of the manifest's slides, checked up front (headers only), loaded once when they fit."""

    def __init__(self, features_dir: str | os.PathLike, rows: list[SlideRow], *, manifest: str,
                 cache_bytes: int = 8 << 30):
        folder = Path(features_dir)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: --features folder not found")
        self.paths = [folder / f"{r.slide_id}.h5" for r in rows]
        missing = [p.name for p in self.paths if not p.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConfigError(f"{folder}: no features for {len(missing)} slide(s) of {manifest}: {shown}")
        self.attrs, sizes, dims = [], [], {}
        for path in self.paths:
            head = read_features_h5(path, load=False)
            n, dim = len(head.coords), int(head.attrs["feature_dim"])
            if n == 0:
                raise ConfigError(f"{path}: empty bag (no tissue tiles); drop the slide from {manifest}")
            dims.setdefault(dim, path)
            if len(dims) > 1:
                (d0, p0), (d1, p1) = list(dims.items())[:2]
                raise ConfigError(f"{p1}: {d1}-dim features, but {p0.name} has {d0}-dim; mixed encoders?")
            self.attrs.append(head.attrs)
            sizes.append(n * dim * 4)
        for key in ("encoder", "feature_kind", "encoder_weights_hash"):
            values = {str(a.get(key)) for a in self.attrs}
            if len(values) > 1:
                raise ConfigError(f"{folder}: feature files disagree on {key} ({', '.join(sorted(values))}); "
                                  f"one head needs one encoder and feature kind")
        self.dim = next(iter(dims))
        self.sizes = sizes
        self.cached = sum(sizes) <= cache_bytes
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        bag = torch.from_numpy(read_features_h5(self.paths[i]).features)
        if self.cached:
            self._cache[i] = bag
        return bag


class MemoryBags:
    """Bags built in memory (region embeddings, tile subsets of region files), with the same surface
    as BagStore so they train, validate and report through the same code."""

    def __init__(self, bags: list[torch.Tensor], attrs: dict):
        self.bags = [b.float().contiguous() for b in bags]
        self.dim = int(self.bags[0].shape[1])
        self.attrs = [attrs] * len(self.bags)
        self.sizes = [len(b) * self.dim * 4 for b in self.bags]
        self.cached = True

    def __len__(self) -> int:
        return len(self.bags)

    def get(self, i: int) -> torch.Tensor:
        return self.bags[i]


def _stratified_patients(rows: list[SlideRow], idx: np.ndarray, rng: np.random.Generator) -> dict[str, list[str]]:
    """class label -> shuffled patients (a patient's class: its first slide's label)."""
    by_class: dict[str, list[str]] = {}
    seen = set()
    for i in idx:
        patient = rows[i].patient
        if patient not in seen:
            seen.add(patient)
            by_class.setdefault(rows[i].label, []).append(patient)
    return {c: list(rng.permutation(p)) for c, p in sorted(by_class.items())}


def assign_splits(rows: list[SlideRow], *, val_fraction: float, seed: int) -> list[str]:
    """train / val / test per slide: the manifest's `split` column, else a patient-level draw."""
    if any(r.split for r in rows):
        if not all(r.split for r in rows):
            raise ConfigError("manifest: the split column is filled for some slides only")
        return [r.split for r in rows]
    rng = np.random.default_rng(seed)
    val_patients = set()
    for patients in _stratified_patients(rows, np.arange(len(rows)), rng).values():
        n_val = int(math.floor(len(patients) * val_fraction)) if len(patients) > 1 else 0
        if val_fraction > 0 and len(patients) > 1:
            n_val = max(1, n_val)
        val_patients.update(patients[:n_val])
    return ["val" if r.patient in val_patients else "train" for r in rows]


def assign_folds(rows: list[SlideRow], idx: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per slide of `idx` (-1 elsewhere), patients dealt round-robin within each class."""
    rng = np.random.default_rng(seed)
    fold_of_patient: dict[str, int] = {}
    offset = 0
    for patients in _stratified_patients(rows, idx, rng).values():
        for k, patient in enumerate(patients):
            fold_of_patient[patient] = (k + offset) % folds
        offset += len(patients)
    out = np.full(len(rows), -1)
    for i in idx:
        out[i] = fold_of_patient[rows[i].patient]
    return out


@torch.no_grad()
def predict(module: nn.Module, store: BagStore, idx) -> np.ndarray:
    module.eval()
    probs = [torch.softmax(module(store.get(int(i))).logits.double(), -1).numpy() for i in idx]
    return np.stack(probs) if probs else np.zeros((0, module.num_classes))


def feature_stats(store: BagStore, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over every tile of the bags `idx` (float64 sums, one bag at a time)."""
    total, sq, count = np.zeros(store.dim), np.zeros(store.dim), 0
    for i in idx:
        bag = store.get(int(i)).numpy()
        for start in range(0, len(bag), 8192):    # float64 copies of a whole 100k bag would triple its memory
            rows = bag[start:start + 8192].astype(np.float64)
            total += rows.sum(0)
            sq += (rows * rows).sum(0)
        count += len(bag)
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0),
                        dtype=torch.float32)


def train_one(store: BagStore, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, num_classes: int,
              cfg: SlideTrainingConfig, *, epochs: int | None = None,
              log: Callable[[str], None] = lambda _: None) -> tuple[nn.Module, dict]:
    """Train on `train_idx`, choose the epoch on `val_idx` (none: the last epoch of `epochs`)."""
    torch.manual_seed(cfg.seed)
    module = build_slide_head(cfg.head, store.dim, num_classes, hidden=cfg.hidden, num_heads=cfg.num_heads,
                              dropout=cfg.dropout)
    module.set_feature_stats(*feature_stats(store, train_idx))
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(y[train_idx], num_classes))
    optimiser = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    epochs = epochs or cfg.epochs
    best = {"epoch": -1, "bacc": -1.0, "loss": math.inf, "state": None}
    history, since_best = [], 0
    for epoch in range(epochs):
        module.train()
        total = 0.0
        order = rng.permutation(train_idx)
        for step_start in range(0, len(order), cfg.bags_per_step):
            optimiser.zero_grad(set_to_none=True)
            for i in order[step_start:step_start + cfg.bags_per_step]:
                logits = module(store.get(int(i))).logits
                loss = loss_fn(logits[None], torch.tensor([y[i]])) / cfg.bags_per_step
                loss.backward()
                total += float(loss.detach()) * cfg.bags_per_step
            optimiser.step()
        entry = {"epoch": epoch + 1, "train_loss": total / max(len(order), 1)}
        if len(val_idx):
            probs = predict(module, store, val_idx)
            entry["val_loss"] = float(-np.mean(np.log(np.clip(probs[np.arange(len(val_idx)), y[val_idx]], 1e-12, 1))))
            entry["val_bacc"] = balanced_accuracy(y[val_idx], probs.argmax(1), num_classes)
            better = (entry["val_bacc"] > best["bacc"]
                      or (entry["val_bacc"] == best["bacc"] and entry["val_loss"] < best["loss"]))
        else:
            better = True
        history.append(entry)
        log(f"epoch {epoch + 1}/{epochs} loss {entry['train_loss']:.4f}"
            + (f" val bacc {entry['val_bacc']:.3f} val loss {entry['val_loss']:.4f}" if len(val_idx) else ""))
        if better:
            best = {"epoch": epoch + 1, "bacc": entry.get("val_bacc", -1.0), "loss": entry.get("val_loss", math.inf),
                    "state": copy.deepcopy(module.state_dict())}
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    module.load_state_dict(best["state"])
    return module.eval(), {"chosen_epoch": best["epoch"], "epochs_run": len(history), "history": history}


@dataclass
class FitResult:
    module: nn.Module
    meta: SlideHeadMeta
    report: dict
    predictions: list[dict] = field(default_factory=list)


def fit_slide_head(manifest: str | os.PathLike, features_dir: str | os.PathLike, cfg: SlideTrainingConfig, *,
                   log: Callable[[str], None] = lambda _: None) -> FitResult:
    rows = read_slide_manifest(manifest)
    store = BagStore(features_dir, rows, manifest=str(manifest), cache_bytes=int(cfg.cache_gb * 2**30))
    return fit_bags(rows, store, cfg, manifest=manifest, features_dir=features_dir, log=log)


def fit_bags(rows: list[SlideRow], store: BagStore | MemoryBags, cfg: SlideTrainingConfig, *,
             manifest: str | os.PathLike, features_dir: str | os.PathLike,
             log: Callable[[str], None] = lambda _: None) -> FitResult:
    """Split, train, choose and report one head on the bags of `rows` (store.get(i) is row i's bag)."""
    folds, val_fraction = cfg.folds, cfg.val_fraction
    classes = sorted({r.label for r in rows})
    y = np.array([classes.index(r.label) for r in rows])
    splits = assign_splits(rows, val_fraction=0.0 if folds else val_fraction, seed=cfg.seed)
    if folds and any(s == "val" for s in splits):
        raise ConfigError(f"{manifest}: --folds deals its own validation folds; use split train/test only")
    pool = np.array([i for i, s in enumerate(splits) if s != "test"])
    test_idx = np.array([i for i, s in enumerate(splits) if s == "test"], dtype=np.int64)
    train_classes = {rows[i].label for i in pool}
    if len(train_classes) < 2:
        raise ConfigError(f"{manifest}: the training slides hold only {sorted(train_classes)}; need two classes")
    report: dict = {"kind": cfg.head, "classes": classes, "num_slides": len(rows),
                    "num_patients": len({r.patient for r in rows}), "config": cfg.to_dict(),
                    "features_dir": str(features_dir), "manifest": str(manifest),
                    "bags_in_memory": store.cached, "instances_per_slide": _spread([s // (4 * store.dim) for s in store.sizes])}

    if folds:
        fold_of = assign_folds(rows, pool, folds, cfg.seed)
        oof = np.zeros((len(rows), len(classes)))
        fold_reports, chosen = [], []
        for k in range(folds):
            val_idx = np.array([i for i in pool if fold_of[i] == k], dtype=np.int64)
            train_idx = np.array([i for i in pool if fold_of[i] != k], dtype=np.int64)
            log(f"fold {k + 1}/{folds}: {len(train_idx)} train, {len(val_idx)} val slides")
            module, info = train_one(store, y, train_idx, val_idx, len(classes), cfg, log=log)
            oof[val_idx] = predict(module, store, val_idx)
            chosen.append(info["chosen_epoch"])
            fold_reports.append({"fold": k + 1, "chosen_epoch": info["chosen_epoch"], "epochs_run": info["epochs_run"],
                                 "val": classification_report(y[val_idx], oof[val_idx], classes)})
        final_epochs = int(np.median(chosen))
        log(f"final head: all {len(pool)} non-test slides, {final_epochs} epochs (median chosen epoch)")
        module, info = train_one(store, y, pool, np.zeros(0, np.int64), len(classes), cfg, epochs=final_epochs, log=log)
        report.update({"selection": f"{folds}-fold cross-validation; final head retrained on all non-test "
                                    f"slides for the median chosen epoch", "folds": fold_reports,
                       "cross_validated": classification_report(y[pool], oof[pool], classes),
                       "chosen_epoch": final_epochs, "epochs_run": info["epochs_run"]})
        split_of = ["test" if s == "test" else "train" for s in splits]
    else:
        train_idx = np.array([i for i, s in enumerate(splits) if s == "train"], dtype=np.int64)
        val_idx = np.array([i for i, s in enumerate(splits) if s == "val"], dtype=np.int64)
        module, info = train_one(store, y, train_idx, val_idx, len(classes), cfg, log=log)
        report.update({"selection": ("validation balanced accuracy, early stopping (patience "
                                     f"{cfg.patience})") if len(val_idx) else "none (no validation slides): last epoch",
                       "chosen_epoch": info["chosen_epoch"], "epochs_run": info["epochs_run"],
                       "history": info["history"]})
        split_of = splits

    # Every number below comes from the head as it is saved.
    probs = predict(module, store, np.arange(len(rows)))
    for split in SPLITS:
        idx = np.array([i for i, s in enumerate(split_of) if s == split], dtype=np.int64)
        if len(idx):
            report[split] = classification_report(y[idx], probs[idx], classes)
    predictions = [{"slide_id": r.slide_id, "label": r.label, "split": split_of[i], "patient": r.patient,
                    "prediction": classes[int(probs[i].argmax())],
                    **{f"prob_{c}": float(probs[i, j]) for j, c in enumerate(classes)}}
                   for i, r in enumerate(rows)]
    first = store.attrs[0]
    meta = SlideHeadMeta(
        kind=cfg.head, classes=classes, dim=store.dim, feature_kind=str(first.get("feature_kind", "unknown")),
        encoder=str(first.get("encoder", "unknown")), encoder_weights_hash=str(first.get("encoder_weights_hash", "")),
        hidden=cfg.hidden, num_heads=cfg.num_heads, dropout=cfg.dropout,
        tile_size=int(first.get("patch_size", 0) or 0), target_mpp=float(first.get("target_mpp", 0.0) or 0.0),
        training={k: v for k, v in report.items() if k not in ("history", "folds")},
    )
    return FitResult(module, meta, report, predictions)


def _spread(values: list[int]) -> dict:
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}

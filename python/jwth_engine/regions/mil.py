"""Slide labels from region embeddings: gated AB-MIL over each slide's regions, beside the same head over
the slide's 20x tiles alone (the baseline the region encoder has to beat on the same slides).

Bags: `regions` = the region encoder's embedding of every region (the class token, "cls", or the mean
of the contextualised tiles, "mean"); `tiles` = the raw backbone embeddings of every tile of one
magnification (the 20x slots of the same regions). Training: AdamW, cross-entropy with label
smoothing, one bag per step, fixed seeds. Evaluation: stratified k-fold cross-validation over slides,
out-of-fold probabilities -> AUROC (one-vs-rest macro for more than two classes) and balanced
accuracy; with fewer than two slides in some class there is no held-out estimate and none is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..heads.mil import GatedABMIL


@dataclass
class MilConfig:
    epochs: int = 40
    lr: float = 2e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    hidden: int = 128
    dropout: float = 0.1
    folds: int = 5
    seed: int = 0


def region_bags(encoder, features: Sequence[np.ndarray], kind: str, batch_size: int = 512) -> list[torch.Tensor]:
    """[R, dim] per slide: the encoder's region embedding of every region."""
    bags = []
    encoder.eval()
    with torch.no_grad():   # not inference_mode: the bags are then trained on
        for seqs in features:
            x = torch.from_numpy(np.ascontiguousarray(seqs, np.float32))
            bags.append(torch.cat([encoder.region_embedding(x[s:s + batch_size], kind)
                                   for s in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, encoder.cfg.dim))
    return bags


def tile_bags(features: Sequence[np.ndarray], slots: np.ndarray) -> list[torch.Tensor]:
    """[R * n, D] per slide: the backbone embeddings of the chosen slots of every region."""
    return [torch.from_numpy(np.ascontiguousarray(f[:, slots].reshape(-1, f.shape[-1]), np.float32)) for f in features]


def train_abmil(bags: Sequence[torch.Tensor], labels: np.ndarray, num_classes: int, cfg: MilConfig) -> GatedABMIL:
    torch.manual_seed(cfg.seed)
    dim = bags[0].shape[1]
    model = GatedABMIL(dim, num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    # Bags are standardised by statistics of the training bags, folded into the model's input below.
    stack = torch.cat(list(bags))
    mean, std = stack.mean(0), stack.std(0).clamp_min(1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    g = torch.Generator().manual_seed(cfg.seed)
    targets = torch.as_tensor(labels, dtype=torch.long)
    for _ in range(cfg.epochs):
        model.train()
        for i in torch.randperm(len(bags), generator=g).tolist():
            logits = model((bags[i] - mean) / std).logits
            loss = loss_fn(logits[None], targets[i:i + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return fold_standardisation(model.eval(), mean, std)


def fold_standardisation(head: GatedABMIL, mean: torch.Tensor, std: torch.Tensor) -> GatedABMIL:
    """The same head on raw bags: x -> (x - mean) / std folded into the three input-side linears.

    Exact for the classifier too: the attention weights sum to 1, so the pooled vector of
    standardised tiles is the standardised pooled vector. The result is a plain GatedABMIL, which
    the slide-head files (heads/slide_io.py) store and load as is.
    """
    with torch.no_grad():
        for linear in (head.attn_v, head.attn_u, head.classifier):
            w = linear.weight / std
            linear.bias -= w @ mean
            linear.weight.copy_(w)
    return head


def predict(model: nn.Module, bags: Sequence[torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return np.stack([torch.softmax(model(b).logits.float(), -1).numpy() for b in bags])


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    values = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):          # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(values))
    r[order] = ranks
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    pred = probs.argmax(1)
    recalls = [float((pred[labels == c] == c).mean()) for c in range(num_classes) if (labels == c).any()]
    if num_classes == 2:
        auc = auroc(probs[:, 1], labels == 1)
    else:
        auc = float(np.nanmean([auroc(probs[:, c], labels == c) for c in range(num_classes)]))
    return {"auroc": round(auc, 4), "balanced_accuracy": round(float(np.mean(recalls)), 4)}


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [[] for _ in range(folds)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, i in enumerate(idx):
            out[j % folds].append(i)
    return [np.sort(np.asarray(f, np.int64)) for f in out]


def cross_validate(bags: Sequence[torch.Tensor], labels: np.ndarray, num_classes: int, cfg: MilConfig,
                   log: Callable[[str], None] | None = None) -> tuple[np.ndarray | None, dict | None]:
    """Out-of-fold probabilities [S, C] and their metrics, or (None, None) when a class has < 2 slides."""
    smallest = min(int((labels == c).sum()) for c in range(num_classes))
    k = min(cfg.folds, smallest)
    if k < 2:
        return None, None
    oof = np.zeros((len(bags), num_classes))
    for f, held in enumerate(stratified_folds(labels, k, cfg.seed)):
        train = np.setdiff1d(np.arange(len(bags)), held)
        model = train_abmil([bags[i] for i in train], labels[train], num_classes, cfg)
        oof[held] = predict(model, [bags[i] for i in held])
        if log:
            log(f"fold {f + 1}/{k}: {len(train)} training slides, {len(held)} held out")
    return oof, {**metrics(oof, labels, num_classes), "folds": k}


def config_dict(cfg: MilConfig) -> dict:
    return asdict(cfg)

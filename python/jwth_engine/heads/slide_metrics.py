"""Slide-level classification metrics: balanced accuracy, AUROC, per-class recall, confusion matrix.

Written out (numpy only) rather than taken from scikit-learn, which the engine does not otherwise
need; AUROC is the Mann-Whitney statistic with ties counted half, macro one-vs-rest for more than
two classes (scikit-learn's `roc_auc_score(multi_class="ovr", average="macro")`).
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (target, pred), 1)
    return matrix


def per_class_recall(matrix: np.ndarray) -> list[float | None]:
    totals = matrix.sum(1)
    return [float(matrix[c, c] / totals[c]) if totals[c] else None for c in range(len(matrix))]


def balanced_accuracy(target: np.ndarray, pred: np.ndarray, num_classes: int) -> float | None:
    recalls = [r for r in per_class_recall(confusion_matrix(target, pred, num_classes)) if r is not None]
    return float(np.mean(recalls)) if recalls else None


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties count 1/2."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = score[order]
    # Average ranks over ties.
    start = 0
    for end in range(1, len(score) + 1):
        if end == len(score) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc(target: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUROC of class 1's probability; multi-class: macro one-vs-rest over the classes present."""
    num_classes = probs.shape[1]
    if num_classes == 2:
        return binary_auroc(target == 1, probs[:, 1])
    values = [binary_auroc(target == c, probs[:, c]) for c in range(num_classes)]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def classification_report(target: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    if len(target) == 0:
        return {"n": 0}
    pred = probs.argmax(1)
    matrix = confusion_matrix(target, pred, len(classes))
    return {
        "n": int(len(target)),
        "balanced_accuracy": balanced_accuracy(target, pred, len(classes)),
        "auroc": auroc(target, probs),
        "per_class_recall": dict(zip(classes, per_class_recall(matrix))),
        "confusion_matrix": matrix.tolist(),
    }

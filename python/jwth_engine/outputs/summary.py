"""Slide-level summary: aggregation of tile probabilities and the JSON record of a run, built here
next to its schema."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Sequence

import numpy as np

from ..config import RunConfig
from .atomic import atomic_write_bytes

# v2: the run's configuration (`config`, RunConfig.to_dict()) is recorded; library versions come
# from the one runtime probe (adds torch_cuda and cucim).
SUMMARY_SCHEMA = "jwth-engine/slide-summary/v2"


def aggregate_scores(probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict:
    """Per class: mean of tile probabilities and the mean of the k highest (k clipped to N).

    The top-k mean is the usual slide score when the signal is focal (a small tumour region in a
    large slide dilutes the plain mean); both are reported so the user can choose.
    """
    n = probs.shape[0]
    if n == 0:
        return {}
    k = max(1, min(top_k, n))
    top = -np.sort(-probs, axis=0)[:k]
    return {
        name: {"mean": float(probs[:, i].mean()), "topk_mean": float(top[:, i].mean()), "k": k}
        for i, name in enumerate(classes)
    }


def build_summary(*, name: str, slide_info: dict, slide_mpp: float, mpp_overridden: bool, classes: Sequence[str],
                  scores: dict, grid, tissue_fraction: float, preset, backbone, head, head_kernel: str,
                  backend: dict, device: str, pipeline: dict | None, notes: Sequence[str], versions: dict,
                  config: RunConfig) -> dict:
    """The slide summary (schema SUMMARY_SCHEMA) without its timings and outputs, which the caller
    adds once the files are written. `scores` is `aggregate_scores`' result ({} without tiles)."""
    classes = list(classes)
    total = len(grid.coords)
    return {
        "schema": SUMMARY_SCHEMA,
        "status": "scored" if total else "no_tissue",
        "slide": {**slide_info, "name": name, "mpp_used": slide_mpp, "mpp_overridden": mpp_overridden},
        "classes": classes,
        "scores": scores if total else "no tissue",
        "prediction": max(classes, key=lambda c: scores[c]["mean"]) if total else None,
        "tiles": {
            "scored": total, "candidates": grid.num_candidates, "min_tissue": config.tiling.min_tissue,
            "tile_size": grid.tile_size, "target_mpp": grid.target_mpp, "read_level": grid.level,
            "read_size": grid.read_size, "size_level0": list(grid.size_level0),
            "tissue_fraction_of_thumbnail": tissue_fraction,
        },
        "model": {"preset": preset.name, "timm_arch": preset.timm_arch,
                  "weights_hash": backbone.weights_hash, "weights_source": backbone.weights_source,
                  "random_init": backbone.random_init},
        "head": {"pooling": head.meta.pooling, "num_heads": head.meta.num_heads,
                 "sha256": head.sha256, "source": head.source, "random_init": head.meta.random_init,
                 "kernel": head_kernel},
        "backend": backend,
        "settings": {"batch_size": config.runtime.batch_size, "num_workers": config.runtime.num_workers,
                     "top_k": config.aggregation.top_k, "device": device, "reader": slide_info.get("reader")},
        "config": config.to_dict(),
        "pipeline": pipeline,
        "notes": list(notes),
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_summary_json(summary: dict, dest: str | os.PathLike) -> None:
    atomic_write_bytes(dest, (json.dumps(summary, indent=2, sort_keys=False) + "\n").encode())

"""Slide-level summary: aggregation of tile probabilities and the JSON record of a run."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Sequence

import numpy as np

from .atomic import atomic_write_bytes

SUMMARY_SCHEMA = "jwth-engine/slide-summary/v1"
_VERSIONED = ("jwth-engine", "torch", "timm", "numpy", "pyarrow", "cucim-cu12", "cucim-cu13",
              "openslide-python", "openslide-bin", "onnxruntime", "tensorrt")


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


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import openslide

        versions["openslide-library"] = openslide.__library_version__
    except ImportError:
        pass
    return versions


def write_summary_json(summary: dict, dest: str | os.PathLike) -> None:
    atomic_write_bytes(dest, (json.dumps(summary, indent=2, sort_keys=False) + "\n").encode())

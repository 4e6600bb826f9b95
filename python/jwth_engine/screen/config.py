"""What must not change within one screening folder: the identity of a run's configuration.

The configuration itself is the run's `RunConfig` (jwth_engine.config); its identity is the part
that decides the scores (hashed, stored in the ledger), with the file-dependent defaults resolved
by the config's own rule and files named by their content, so that spelling a default out, or
moving a weights file, does not count as a different configuration. Speed settings (device, batch
size, decode threads, reader) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from ..heads import read_head_meta
from ..models import get_preset
from ..outputs.atomic import sha256_file

# Keys of the identity; their order is the order `screen-status` prints them in.
IDENTITY_KEYS = ("model", "model_file_sha256", "weights_sha256", "head_sha256", "pooling", "tile_size",
                 "target_mpp", "min_tissue", "top_k", "mpp_override", "backend", "precision", "seed")


def _sha256(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc


def identity(config: RunConfig) -> dict:
    """The settings that decide a slide's scores, with defaults resolved as scoring resolves them."""
    m = config.model
    head_meta = read_head_meta(m.head) if m.head else None
    model = config.model_name(head_meta)
    model_is_file = model.endswith(".json") and Path(model).is_file()
    resolved = config.resolve(head_meta, get_preset(model))
    return {
        "model": Path(model).stem if model_is_file else model,
        "model_file_sha256": _sha256(model) if model_is_file else None,
        "weights_sha256": _sha256(m.weights) if m.weights else None,
        "head_sha256": _sha256(m.head) if m.head else None,
        "pooling": resolved.pooling,
        "tile_size": resolved.tile_size,
        "target_mpp": resolved.target_mpp,
        "min_tissue": config.tiling.min_tissue,
        "top_k": config.aggregation.top_k,
        "mpp_override": config.tiling.mpp,
        "backend": config.runtime.backend,
        "precision": config.runtime.precision,
        # Only random weights or a random head depend on the seed.
        "seed": m.seed if not (m.weights and m.head) else None,
    }


def config_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def describe_difference(old: dict, new: dict) -> str:
    """`key old -> new` for each differing key, shortening hashes."""
    def show(value):
        if isinstance(value, str) and len(value) == 64:
            return value[:12]
        return "none" if value is None else value

    parts = [f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in IDENTITY_KEYS
             if old.get(k) != new.get(k)]
    return "; ".join(parts) or "same"


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """Workers (and Ray actors on other nodes) may run elsewhere: files named absolutely."""
    m = config.model
    model = m.model
    if model and model.endswith(".json") and os.path.isfile(model):
        model = os.path.abspath(model)
    return config.with_values(model=model, weights=m.weights and os.path.abspath(m.weights),
                              head=m.head and os.path.abspath(m.head))

"""Slide-head files: `.safetensors` weights with the head's JSON description in the header metadata,
like tile heads (io.py), under their own format tag so neither loader mistakes one for the other.

The metadata names what the head was trained on — the encoder preset and weights hash, the
feature kind (cls, jwth, mean, cls+mean) and dimension — so that features from another encoder are
refused with one line instead of giving silent nonsense.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ModelError
from .mil import build_slide_head

SLIDE_HEAD_FORMAT = "jwth-engine/slide-head/v1"
SLIDE_META_KEY = "jwth_slide_head"


@dataclass
class SlideHeadMeta:
    kind: str                          # abmil | wsc | mean | max
    classes: list[str]
    dim: int                           # feature dimension the head expects
    feature_kind: str                  # cls | jwth | mean | cls+mean
    encoder: str                       # backbone preset the features came from
    encoder_weights_hash: str
    hidden: int = 128
    num_heads: int = 4
    dropout: float = 0.0
    tile_size: int = 0
    target_mpp: float = 0.0
    training: dict = field(default_factory=dict)
    format: str = SLIDE_HEAD_FORMAT


@dataclass
class LoadedSlideHead:
    module: nn.Module
    meta: SlideHeadMeta
    source: str
    sha256: str


def build_from_meta(meta: SlideHeadMeta) -> nn.Module:
    return build_slide_head(meta.kind, meta.dim, len(meta.classes), hidden=meta.hidden,
                            num_heads=meta.num_heads, dropout=meta.dropout)


def save_slide_head(module: nn.Module, meta: SlideHeadMeta, path: str | os.PathLike) -> str:
    """Write atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    from ..outputs.atomic import atomic_path, sha256_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={SLIDE_META_KEY: json.dumps(asdict(meta))})
    return sha256_file(path)


def load_slide_head(path: str | os.PathLike) -> LoadedSlideHead:
    from safetensors import SafetensorError, safe_open

    from ..outputs.atomic import sha256_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: slide head file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(SLIDE_META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors slide head ({exc})") from exc
    if raw is None:
        raise ModelError(f"{path}: no '{SLIDE_META_KEY}' metadata; not a jwth-engine slide head "
                         f"(tile heads go to --head)")
    try:
        meta = SlideHeadMeta(**json.loads(raw))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"{path}: slide head metadata is malformed ({exc})") from exc
    if meta.format != SLIDE_HEAD_FORMAT:
        raise ModelError(f"{path}: slide head format {meta.format!r} is not {SLIDE_HEAD_FORMAT!r}")
    try:
        module = build_from_meta(meta)
        module.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: slide head tensors do not match its metadata ({' '.join(str(exc).split())})") from exc
    return LoadedSlideHead(module.eval(), meta, str(path), sha256_file(path))


def check_features_match(meta: SlideHeadMeta, *, source: str, dim: int, encoder: str | None,
                         weights_hash: str | None, feature_kind: str | None) -> None:
    """Raise one ModelError line when features (from `source`) cannot feed this head. Attributes a
    foreign file lacks (TRIDENT's have no weights hash) are not held against it; the dimension is."""
    if dim != meta.dim:
        raise ModelError(f"{source}: features are {dim}-dim but the slide head expects {meta.dim} "
                         f"({meta.encoder} {meta.feature_kind})")
    if encoder not in (None, "None", "") and encoder != meta.encoder:
        raise ModelError(f"{source}: features come from encoder {encoder!r} but the slide head was trained "
                         f"on {meta.encoder!r}")
    if weights_hash and meta.encoder_weights_hash and weights_hash != meta.encoder_weights_hash:
        raise ModelError(f"{source}: features come from weights {weights_hash[:12]} but the slide head was "
                         f"trained on {meta.encoder_weights_hash[:12]}")
    if feature_kind and feature_kind != meta.feature_kind:
        raise ModelError(f"{source}: features are of kind {feature_kind!r} but the slide head expects "
                         f"{meta.feature_kind!r}")

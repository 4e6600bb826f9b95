"""Head files: one `.safetensors` file whose header metadata holds the head's JSON description.

Keeping weights and metadata in one file means a head cannot lose its class names or be paired
with the wrong backbone by accident; safetensors means loading never unpickles user data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..outputs.atomic import atomic_path, sha256_file
from .reference import build_head

HEAD_FORMAT = "jwth-engine/head/v1"
META_KEY = "jwth_head"


@dataclass
class HeadMeta:
    pooling: str                      # "jwth" | "linear-probe"
    classes: list[str]
    num_heads: int                    # attention heads of the pooling (0 for linear-probe)
    dim: int                          # backbone embedding dim the head expects
    num_prefix_tokens: int            # class + register tokens skipped as keys/values
    backbone_preset: str
    backbone_weights_hash: str
    tile_size: int
    target_mpp: float
    random_init: bool = False
    training: dict = field(default_factory=dict)   # provenance of fit-head (data, metrics)
    format: str = HEAD_FORMAT


@dataclass
class LoadedHead:
    module: nn.Module
    meta: HeadMeta
    source: str        # file path or "random init (seed N)"
    sha256: str        # of the file, or of the random parameters


def _state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def random_head(pooling: str, *, dim: int, num_prefix_tokens: int, classes: list[str],
                num_heads: int, backbone_preset: str, backbone_weights_hash: str,
                tile_size: int, target_mpp: float, seed: int = 0) -> LoadedHead:
    """A seeded random head, so that a pipeline can run end to end before a head is trained."""
    warnings.warn(
        f"no --head given: using a RANDOM {pooling} head (seed {seed}); slide scores are NOT meaningful",
        stacklevel=2,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        module = build_head(pooling, dim, len(classes), num_heads, num_prefix_tokens).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    meta = HeadMeta(pooling, list(classes), num_heads if pooling == "jwth" else 0, dim,
                    num_prefix_tokens, backbone_preset, backbone_weights_hash, tile_size,
                    target_mpp, random_init=True)
    return LoadedHead(module, meta, f"random init (seed {seed})", _state_hash(module))


def save_head(module: nn.Module, meta: HeadMeta, path: str | os.PathLike) -> str:
    """Write the head atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(asdict(meta))})
    return sha256_file(path)


_MAX_HEADER = 100_000_000


def read_head_meta(path: str | os.PathLike) -> HeadMeta:
    """The metadata of a head file, read from the safetensors header alone (no tensors loaded):
    the one reader of the head format, used to load a head and to resolve a configuration."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: head file not found")
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable safetensors head file ({exc})") from exc
    raw_meta = (header.get("__metadata__") or {}).get(META_KEY)
    if raw_meta is None:
        raise ModelError(f"{path}: safetensors file has no '{META_KEY}' metadata; not a jwth-engine head")
    try:
        meta = HeadMeta(**json.loads(raw_meta))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"{path}: head metadata is malformed ({exc})") from exc
    if meta.format != HEAD_FORMAT:
        raise ModelError(f"{path}: head format {meta.format!r} is not supported (expected {HEAD_FORMAT!r})")
    return meta


def load_head(path: str | os.PathLike) -> LoadedHead:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    meta = read_head_meta(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors head file ({exc})") from exc
    try:
        module = build_head(meta.pooling, meta.dim, len(meta.classes), max(meta.num_heads, 1),
                            meta.num_prefix_tokens)
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise ModelError(
            f"{path}: head tensors do not match its metadata (missing {missing}, unexpected "
            f"{unexpected}, wrong shape {[(k, found[k], expected[k]) for k in shapes]})"
        )
    module.load_state_dict(tensors, strict=True)
    return LoadedHead(module.eval(), meta, str(path), sha256_file(path))


def check_head_matches_backbone(head: LoadedHead, *, preset: str, dim: int, num_prefix_tokens: int,
                                weights_hash: str) -> list[str]:
    """Raise on a structural mismatch; return warnings for provenance mismatches."""
    meta = head.meta
    if meta.dim != dim:
        raise ModelError(f"{head.source}: head expects {meta.dim}-dim tokens but backbone {preset} gives {dim}")
    if meta.num_prefix_tokens != num_prefix_tokens:
        raise ModelError(
            f"{head.source}: head skips {meta.num_prefix_tokens} prefix tokens but backbone {preset} has "
            f"{num_prefix_tokens} (class + registers)"
        )
    notes = []
    if not meta.random_init and meta.backbone_weights_hash != weights_hash:
        raise ModelError(
            f"{head.source}: head was trained on backbone weights {meta.backbone_weights_hash[:12]} "
            f"but the loaded backbone is {weights_hash[:12]}; pass the matching --weights"
        )
    if meta.backbone_preset != preset:
        notes.append(f"head was trained with preset {meta.backbone_preset}, scoring with {preset}")
    return notes

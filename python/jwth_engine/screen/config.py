"""A screening run's configuration: the options handed to every `score_slide` call, split into the
part that decides the scores (hashed, stored in the ledger, must not change within one folder) and
the part that only decides speed (device, batch size, decode threads, reader)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, ModelError

# Keys of the identity; their order is the order `screen-status` prints them in.
IDENTITY_KEYS = ("model", "model_file_sha256", "weights_sha256", "head_sha256", "pooling", "tile_size",
                 "target_mpp", "min_tissue", "top_k", "mpp_override", "backend", "precision", "seed")


@dataclass
class ScreenOptions:
    """Everything `score_slide` takes except the slide, its name and its output folder."""

    model: str | None = None
    weights: str | None = None
    head: str | None = None
    pooling: str | None = None
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    mpp: float | None = None
    tile_size: int | None = None
    target_mpp: float | None = None
    min_tissue: float = 0.25
    top_k: int = 16
    num_workers: int = 2
    reader: str = "auto"
    seed: int = 0
    compile: bool | None = None
    report: bool = False         # NAME.report.html per slide; pictures only, so not in `identity`

    def score_kwargs(self) -> dict:
        return asdict(self)


def _read_head_meta(path: Path) -> dict:
    """The JSON metadata of a head `.safetensors` file, read from its header (no torch needed)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(size))
        return json.loads(header["__metadata__"]["jwth_head"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelError(f"{path}: not a jwth-engine head file ({exc})") from exc


def _sha256(path: str) -> str:
    from ..outputs.atomic import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc


def _preset_defaults(name: str) -> tuple[int | None, float | None]:
    """(input size, native mpp) of a backbone preset."""
    from ..models import get_preset

    preset = get_preset(name)
    return int(preset.input_size), float(preset.native_mpp)


def identity(options: ScreenOptions) -> dict:
    """The options that decide a slide's scores, with defaults resolved the way `score_slide`
    resolves them, so that spelling a default out does not count as a different configuration."""
    from ..scorer import DEFAULT_PRESET

    head_meta = _read_head_meta(Path(options.head)) if options.head else None
    model = options.model or (head_meta["backbone_preset"] if head_meta else DEFAULT_PRESET)
    model_file = Path(model)
    model_is_file = model.endswith(".json") and model_file.is_file()
    tile_size = options.tile_size or (head_meta["tile_size"] if head_meta else None)
    target_mpp = options.target_mpp or (head_meta["target_mpp"] if head_meta else None)
    if tile_size is None or target_mpp is None:
        preset_size, preset_mpp = _preset_defaults(model)
        tile_size = tile_size or preset_size
        target_mpp = target_mpp or preset_mpp
    return {
        "model": model_file.stem if model_is_file else model,
        "model_file_sha256": _sha256(model) if model_is_file else None,
        "weights_sha256": _sha256(options.weights) if options.weights else None,
        "head_sha256": _sha256(options.head) if options.head else None,
        "pooling": head_meta["pooling"] if head_meta else (options.pooling or "jwth"),
        "tile_size": int(tile_size),
        "target_mpp": float(target_mpp),
        "min_tissue": float(options.min_tissue),
        "top_k": int(options.top_k),
        "mpp_override": options.mpp,
        "backend": options.backend,
        "precision": options.precision,
        # Only random weights or a random head depend on the seed.
        "seed": options.seed if not (options.weights and options.head) else None,
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


def absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None

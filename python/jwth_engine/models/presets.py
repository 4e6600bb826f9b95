"""Backbone presets: declarative JSON files in `engine/presets/`, validated into `BackbonePreset`.

A preset names a timm architecture and everything the pipeline must know about it without building
it: input size, normalisation, token layout (class + register/storage tokens, then patches) and the
resolution it was trained at. Each file cites its `source` (model card, paper, timm cfg).

Layers named in `timm_kwargs` (e.g. `"mlp_layer": "timm.layers.SwiGLUPacked"`) resolve through the
`LAYER_WHITELIST` below and nothing else: a preset is data a user may hand us, so it never reaches
`eval` or an arbitrary import.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..specs import spec_path

FAMILIES = ("dinov2", "dinov3", "vit")

# Names a preset may use for a layer class in timm_kwargs -> (module, attribute). Extend with care:
# every entry is code a preset file can make us run.
LAYER_WHITELIST = {
    "timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "timm.layers.SwiGLU": ("timm.layers", "SwiGLU"),
    "timm.layers.GluMlp": ("timm.layers", "GluMlp"),
    "timm.layers.Mlp": ("timm.layers", "Mlp"),
    "timm.layers.LayerNorm": ("timm.layers", "LayerNorm"),
    "timm.layers.RmsNorm": ("timm.layers", "RmsNorm"),
    "torch.nn.SiLU": ("torch.nn", "SiLU"),
    "torch.nn.GELU": ("torch.nn", "GELU"),
    "torch.nn.LayerNorm": ("torch.nn", "LayerNorm"),
}
# timm kwargs whose string value is a layer class rather than a plain option.
_LAYER_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_norm_layer")
# Set by the loader, never by a preset: random or local weights only, no classifier head, and the
# input size comes from `input_size` so the two cannot disagree.
_RESERVED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                    "num_classes", "img_size")
_NAME_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9.]+)+$")

_REQUIRED = {
    "name": str, "family": str, "timm_arch": str, "timm_kwargs": dict, "input_size": int,
    "patch_size": int, "mean": list, "std": list, "num_prefix_tokens": int,
    "num_register_tokens": int, "embed_dim": int, "native_mpp": (int, float), "source": str,
}
_OPTIONAL = {"notes": str}


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    family: str                      # "dinov2" | "dinov3" | "vit": picks the checkpoint filter
    timm_arch: str
    timm_kwargs: dict = field(hash=False, compare=True)
    input_size: int = 224
    patch_size: int = 14
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_prefix_tokens: int = 1       # class + registers, in that order, before the patch tokens
    num_register_tokens: int = 0
    embed_dim: int = 0
    native_mpp: float = 0.5
    source: str = ""
    notes: str = ""
    path: str = field(default="", compare=False)   # the JSON it was read from

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patch_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patch_tokens

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("path")
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def digest(self) -> str:
        """sha256 of the preset's content (not its path): part of every export/engine cache key."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def resolved_timm_kwargs(self) -> dict:
        """timm_kwargs with layer names resolved to classes, plus img_size and num_classes=0."""
        kwargs = {k: (_resolve_layer(v, self) if k in _LAYER_KWARGS and isinstance(v, str) and "." in v else v)
                  for k, v in self.timm_kwargs.items()}
        kwargs["img_size"] = self.input_size
        kwargs["num_classes"] = 0
        return kwargs


def _resolve_layer(name: str, preset: BackbonePreset):
    if name not in LAYER_WHITELIST:
        raise ModelError(f"{preset.path or preset.name}: layer {name!r} is not allowed in a preset; "
                         f"allowed: {', '.join(sorted(LAYER_WHITELIST))}")
    module, attr = LAYER_WHITELIST[name]
    return getattr(importlib.import_module(module), attr)


def _fail(where: str, problem: str) -> ModelError:
    return ModelError(f"{where}: invalid backbone preset: {problem}")


def preset_from_dict(data: Any, where: str = "<preset>") -> BackbonePreset:
    """Validate a parsed preset JSON; every problem is a one-line ModelError naming the file."""
    if not isinstance(data, dict):
        raise _fail(where, f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise _fail(where, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(unknown)}")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise _fail(where, f"{key} must be {getattr(kind, '__name__', 'a number')}, got {data[key]!r}")
    name = data["name"]
    if not _NAME_RE.match(name):
        raise _fail(where, f"name {name!r} is not in the family_size_patchN_tag style (lower case, '_'-separated)")
    if data["family"] not in FAMILIES:
        raise _fail(where, f"family {data['family']!r} is not one of {', '.join(FAMILIES)}")
    for key in ("mean", "std"):
        values = data[key]
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise _fail(where, f"{key} must be 3 numbers (RGB, in [0, 1] units), got {values!r}")
    if any(not s > 0 for s in data["std"]):
        raise _fail(where, f"std values must be > 0, got {data['std']!r}")
    for key in ("input_size", "patch_size", "embed_dim", "num_prefix_tokens"):
        if data[key] < 1:
            raise _fail(where, f"{key} must be >= 1, got {data[key]}")
    if data["input_size"] % data["patch_size"]:
        raise _fail(where, f"input_size {data['input_size']} is not a multiple of patch_size {data['patch_size']}")
    if not 0 <= data["num_register_tokens"] < data["num_prefix_tokens"]:
        raise _fail(where, f"num_register_tokens {data['num_register_tokens']} must be below num_prefix_tokens "
                           f"{data['num_prefix_tokens']} (the class token comes first)")
    if not (math.isfinite(data["native_mpp"]) and 0.01 <= data["native_mpp"] <= 100):
        raise _fail(where, f"native_mpp {data['native_mpp']} is not a plausible microns-per-pixel")
    kwargs = data["timm_kwargs"]
    reserved = [k for k in _RESERVED_KWARGS if k in kwargs]
    if reserved:
        raise _fail(where, f"timm_kwargs may not set {', '.join(reserved)} (input_size sets img_size; "
                           f"weights come from --weights)")
    if "patch_size" in kwargs and kwargs["patch_size"] != data["patch_size"]:
        raise _fail(where, f"timm_kwargs.patch_size {kwargs['patch_size']} != patch_size {data['patch_size']}")
    if "embed_dim" in kwargs and kwargs["embed_dim"] != data["embed_dim"]:
        raise _fail(where, f"timm_kwargs.embed_dim {kwargs['embed_dim']} != embed_dim {data['embed_dim']}")
    for key, value in kwargs.items():
        if key in _LAYER_KWARGS and isinstance(value, str) and "." in value and value not in LAYER_WHITELIST:
            raise _fail(where, f"timm_kwargs.{key} {value!r} is not an allowed layer; allowed: "
                               f"{', '.join(sorted(LAYER_WHITELIST))}")
        scalars = (int, float, str, bool, type(None))
        if not (isinstance(value, scalars) or (isinstance(value, list) and all(isinstance(v, scalars) for v in value))):
            raise _fail(where, f"timm_kwargs.{key} must be a number, string, boolean or list of those, got {value!r}")
    return BackbonePreset(
        name=name, family=data["family"], timm_arch=data["timm_arch"], timm_kwargs=dict(kwargs),
        input_size=data["input_size"], patch_size=data["patch_size"],
        mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
        num_prefix_tokens=data["num_prefix_tokens"], num_register_tokens=data["num_register_tokens"],
        embed_dim=data["embed_dim"], native_mpp=float(data["native_mpp"]), source=data["source"],
        notes=data.get("notes", ""), path=where,
    )


def load_preset_file(path: str | Path) -> BackbonePreset:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read backbone preset ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: backbone preset is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return preset_from_dict(data, str(path))


def _presets_dir() -> Path:
    return spec_path("presets")


def list_presets() -> list[str]:
    """Names of the shipped presets (engine/presets/*.json), sorted."""
    return sorted(p.stem for p in _presets_dir().glob("*.json"))


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".json") or "/" in name_or_path or "\\" in name_or_path


@lru_cache(maxsize=64)
def _shipped(name: str) -> BackbonePreset:
    path = _presets_dir() / f"{name}.json"
    preset = load_preset_file(path)
    if preset.name != name:
        raise ModelError(f"{path}: preset file is named {name} but declares name {preset.name!r}")
    return preset


def get_preset(name_or_path: str) -> BackbonePreset:
    """A shipped preset by name, or a user's preset JSON by path."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ModelError(f"backbone preset: expected a preset name or a JSON path, got {name_or_path!r}")
    if _looks_like_path(name_or_path):
        if not Path(name_or_path).is_file():
            raise ModelError(f"{name_or_path}: backbone preset file not found")
        return load_preset_file(name_or_path)
    if not (_presets_dir() / f"{name_or_path}.json").is_file():
        raise ModelError(f"unknown backbone preset {name_or_path!r}; known: {', '.join(list_presets())} "
                         f"(or pass a preset .json file)")
    return _shipped(name_or_path)

"""Local backbone checkpoints: read, unwrap, map onto the timm architecture, load strictly.

Reading: `.safetensors` (preferred: no code runs on load), or `.pt/.pth/.bin/.ckpt` through
`torch.load(weights_only=True)` only. A pickle that needs more than tensors and plain containers is
refused with a line saying how to convert it, rather than unpickled.

Unwrapping: training checkpoints nest the weights (`{"teacher": ...}` in DINO/DINOv2/DINOv3,
`{"model": ...}`, `{"state_dict": ...}`) and prefix them (`module.` from DDP, `_orig_mod.` from
torch.compile, `backbone.` in DINO teachers next to their `dino_head.*`/`ibot_head.*`).

Mapping: one filter per preset family (`FAMILY_FILTERS`) turns foreign layouts into timm's. They
reuse timm's own `checkpoint_filter_fn` (which also resamples position embeddings and patch
kernels to the preset's input size) and only add what timm lacks:
  - "vit":    timm/OpenCLIP/original-ViT layouts (timm's vision_transformer filter as is).
  - "dinov2": the above + original DINOv2 (register_tokens, w12/w3 SwiGLU, cls pos folding, all in
              timm's filter) + HF transformers Dinov2 / Dinov2WithRegisters key names.
  - "dinov3": original DINOv3 (storage_tokens, ls*.gamma, qkv bias split) via timm's eva filter.

Loading: strict. Every missing, unexpected and shape-mismatched key is collected first and reported
in one ModelError line (long lists truncated with a count), so a wrong preset/checkpoint pairing is
diagnosed in one run instead of one key at a time.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import ModelError
from ..outputs.atomic import sha256_file

log = logging.getLogger("jwth_engine.models")

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Checked in this order; DINO teachers come before "model" because the teacher is the network
# DINO evaluates (the student is a training-time copy).
_CONTAINER_KEYS = ("teacher", "model_ema", "model", "state_dict", "module", "model_state_dict", "student")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "dinov2.", "encoder.")
_MAX_LISTED = 8


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw object in a checkpoint file (a dict; tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # weights_only refuses arbitrary objects; that is the point, so say how to get a
            # tensors-only file instead of falling back to a full unpickle.
            raise ModelError(
                f"{path}: checkpoint holds Python objects besides tensors and cannot be loaded with "
                f"torch.load(weights_only=True); re-save its state_dict (torch.save(model.state_dict())) "
                f"or convert it to .safetensors ({str(exc).splitlines()[0]})"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise ModelError(f"{path}: cannot read PyTorch checkpoint ({str(exc).splitlines()[0]})") from exc
        if not isinstance(obj, Mapping):
            raise ModelError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
        return dict(obj)
    raise ModelError(f"{path}: unsupported weights format {suffix or '(no suffix)'}; expected "
                     f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Mapping, where: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], list[str]]:
    """(flat name -> tensor dict, notes on what was unwrapped or dropped)."""
    notes: list[str] = []
    for _ in range(4):  # containers nest at most a few levels deep in practice
        if _is_state_dict(obj):
            break
        for key in _CONTAINER_KEYS:
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                notes.append(f"took checkpoint[{key!r}]")
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise ModelError(f"{where}: no state dict found in checkpoint")
    # Non-tensor entries (epoch counters, configs) are metadata, not weights.
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelError(f"{where}: checkpoint holds no tensors (top-level keys: {_listed(sorted(map(str, obj)))})")
    for prefix in _PREFIXES:
        with_prefix = [k for k in state if k.startswith(prefix)]
        if not with_prefix:
            continue
        if len(with_prefix) == len(state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped prefix {prefix!r}")
        elif prefix in ("backbone.", "dinov2."):
            # DINO-style teacher (backbone.* next to dino_head.*/ibot_head.*) or an HF
            # Dinov2ForImageClassification (dinov2.* next to classifier.*): keep the backbone.
            dropped = sorted({k.split(".", 1)[0] for k in state if not k.startswith(prefix)})
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            notes.append(f"kept backbone.* and dropped {', '.join(dropped)}")
    return state, notes


# --- family filters -------------------------------------------------------------------------------

_HF_DINOV2_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_DINOV2_RENAMES = {
    "norm1.": "norm1.", "norm2.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.",
}
_HF_DINOV2_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _hf_dinov2_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF transformers Dinov2(WithRegisters)Model names -> facebookresearch/dinov2 names.

    The inverse of transformers' convert_dinov2_to_hf.py; timm's filter then takes the original
    layout the rest of the way (it already knows that one).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_DINOV2_TOP:
            out[_HF_DINOV2_TOP[key]] = value
            continue
        match = _HF_DINOV2_LAYER.match(key)
        if not match:
            out[key] = value  # left for the strict check to report
            continue
        index, rest = int(match.group(1)), match.group(2)
        qkv_match = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if qkv_match:
            qkv.setdefault((index, qkv_match.group(2)), {})[qkv_match.group(1)] = value
            continue
        for old, new in _HF_DINOV2_RENAMES.items():
            if rest.startswith(old):
                out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                break
        else:
            out[key] = value
    for (index, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            for name, value in parts.items():  # incomplete: keep as is so the error names them
                out[f"encoder.layer.{index}.attention.attention.{name}.{kind}"] = value
            continue
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    # timm's filter recognises the original DINOv2 layout by its mask token; HF checkpoints have
    # one too, but a pruned export might not, and without it registers would not be unfolded.
    out.setdefault("mask_token", torch.zeros(1))
    return out


def _timm_vit_filter(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state), model)  # it pops keys; never hand it the caller's dict


def filter_vit(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _timm_vit_filter(state, model)


def filter_dinov2(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
        state = _hf_dinov2_to_original(state)
    return _timm_vit_filter(state, model)


def filter_dinov3(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.eva import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state), model)


FAMILY_FILTERS: dict[str, Callable[[dict, torch.nn.Module], dict]] = {
    "vit": filter_vit, "dinov2": filter_dinov2, "dinov3": filter_dinov3,
}


# --- strict loading -------------------------------------------------------------------------------

def _listed(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple[list, list, list]:
    """(missing, unexpected, [(key, checkpoint shape, model shape)]) against model.state_dict()."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted((k, tuple(state[k].shape), tuple(expected[k].shape))
                        for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    return missing, unexpected, mismatched


def mismatch_message(missing: list, unexpected: list, mismatched: list) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch(es): {_listed(shapes)}")
    return "; ".join(parts)


def _drop_classifier(state: dict[str, torch.Tensor], model: torch.nn.Module, notes: list[str]) -> dict:
    """Classifier weights of a fine-tuned checkpoint: the scorer builds num_classes=0 backbones."""
    expected = model.state_dict()
    head = [k for k in state if k.split(".", 1)[0] in ("head", "fc_norm") and k not in expected]
    if head:
        notes.append(f"ignored classifier weights {', '.join(sorted(head))}")
        state = {k: v for k, v in state.items() if k not in head}
    return state


def load_into(model: torch.nn.Module, path: str | os.PathLike, family: str, *, preset_name: str) -> list[str]:
    """Read `path`, map it with the family filter, load it strictly into `model`; returns notes."""
    raw = read_checkpoint(path)
    state, notes = unwrap_state_dict(raw, str(path))
    try:
        state = FAMILY_FILTERS[family](state, model)
    except (KeyError, RuntimeError, ValueError) as exc:
        # timm's filters index fixed key names and reshape tensors; a checkpoint of another
        # architecture fails inside them. Say which file and family, keep timm's reason.
        raise ModelError(f"{path}: cannot map checkpoint onto {preset_name} ({family} layout): "
                         f"{type(exc).__name__}: {exc}") from exc
    state = _drop_classifier(state, model, notes)
    missing, unexpected, mismatched = check_state_dict(state, model)
    if missing or unexpected or mismatched:
        raise ModelError(f"{path}: checkpoint does not fit preset {preset_name}: "
                         f"{mismatch_message(missing, unexpected, mismatched)}")
    model.load_state_dict(state, strict=True)
    for note in notes:
        log.info("%s: %s", path, note)
    return notes

"""Build a preset's timm model and load its weights: `load_backbone` -> `LoadedBackbone`.

The module the rest of the engine sees is `TokenEncoder`: images [B, 3, S, S] (normalised float) ->
timm `forward_features` tokens [B, T, D] = [class, registers, patches] after the final norm. That is
the one definition of "the backbone's output" that every backend (torch, ONNX Runtime, TensorRT)
reproduces and is tested against.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelError
from .checkpoint import load_into, sha256_file
from .presets import BackbonePreset, get_preset

log = logging.getLogger("jwth_engine.models")


class TokenEncoder(nn.Module):
    """A timm ViT whose forward is `forward_features`: the full token sequence, not a pooled vector."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


@dataclass
class LoadedBackbone:
    module: nn.Module               # TokenEncoder, eval mode, on the CPU in fp32
    preset: BackbonePreset
    weights_hash: str               # sha256 of the weights file, or "random-init-seed-<seed>"
    weights_source: str             # the path, or "random init (seed N)"
    embed_dim: int
    num_prefix_tokens: int
    num_patch_tokens: int
    num_tokens: int
    random_init: bool
    notes: list[str] = field(default_factory=list)   # what checkpoint loading unwrapped/dropped


def _register_tokens(model: nn.Module) -> int:
    if hasattr(model, "num_reg_tokens"):            # timm VisionTransformer
        return int(model.num_reg_tokens)
    reg = getattr(model, "reg_token", None)          # timm Eva (DINOv3 storage tokens)
    return 0 if reg is None else int(reg.shape[1])


def check_model_matches_preset(model: nn.Module, preset: BackbonePreset) -> None:
    """The built model's token layout must be the one the preset (and so the head) declares."""
    actual = {
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", -1)),
        "num_register_tokens": _register_tokens(model),
        "embed_dim": int(getattr(model, "embed_dim", getattr(model, "num_features", -1))),
        "patch_size": int(model.patch_embed.patch_size[0]),
    }
    wrong = [f"{k} {getattr(preset, k)} (model has {v})" for k, v in actual.items() if v != getattr(preset, k)]
    if wrong:
        raise ModelError(f"{preset.path or preset.name}: preset does not match the timm model "
                         f"{preset.timm_arch} it builds: {', '.join(wrong)}")


def build_model(preset: BackbonePreset | str, device: torch.device | str | None = None) -> nn.Module:
    """The bare timm model of a preset, with timm's own initialisation (seed it outside).

    `device="meta"` builds the structure without allocating weights (shape checks of ViT-L/g).
    """
    import timm

    preset = get_preset(preset) if isinstance(preset, str) else preset
    kwargs = preset.resolved_timm_kwargs()
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = timm.create_model(preset.timm_arch, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelError(f"{preset.path or preset.name}: timm {timm.__version__} has no architecture "
                             f"{preset.timm_arch!r} (DINOv3 models need timm >= 1.0.20): pip install -U timm") from exc
        raise
    except TypeError as exc:
        raise ModelError(f"{preset.path or preset.name}: timm rejected timm_kwargs for "
                         f"{preset.timm_arch}: {exc}") from exc
    check_model_matches_preset(model, preset)
    return model


def load_backbone(preset: BackbonePreset | str, weights: str | None = None, *,
                  seed: int = ModelConfig.seed) -> LoadedBackbone:
    """Build `preset` and load `weights` (strict), or a seeded random init with a loud warning."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    # Seed only the model's construction (fork_rng restores the caller's RNG afterwards): the
    # same seed gives the same random backbone in every run and process. devices=[] keeps CUDA
    # untouched, so loading a backbone never initialises a GPU context.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(preset)
    notes: list[str] = []
    if weights:
        path = Path(weights)
        notes = load_into(model, path, preset.family, preset_name=preset.name)
        weights_hash, weights_source, random_init = sha256_file(path), str(path), False
    else:
        weights_hash, weights_source, random_init = f"random-init-seed-{seed}", f"random init (seed {seed})", True
        warnings.warn(
            f"backbone {preset.name}: no weights given (--weights), using a random initialisation "
            f"(seed {seed}): scores are NOT meaningful",
            UserWarning, stacklevel=2,
        )
    module = TokenEncoder(model).eval().requires_grad_(False)
    return LoadedBackbone(
        module=module, preset=preset, weights_hash=weights_hash, weights_source=weights_source,
        embed_dim=preset.embed_dim, num_prefix_tokens=preset.num_prefix_tokens,
        num_patch_tokens=preset.num_patch_tokens, num_tokens=preset.num_tokens,
        random_init=random_init, notes=notes,
    )

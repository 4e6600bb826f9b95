"""Backbones: presets (engine/presets/*.json) -> timm modules, and local checkpoint loading.

    >>> from jwth_engine.models import list_presets, load_backbone
    >>> backbone = load_backbone("jwth_vits14_reg4", "dinov2_vits14_reg4.safetensors")
    >>> tokens = backbone.module(images)          # [B, 5 + 256, 384]: class, 4 registers, patches
"""

from .backbone import LoadedBackbone, TokenEncoder, build_model, check_model_matches_preset, load_backbone
from .checkpoint import FAMILY_FILTERS, read_checkpoint, sha256_file, unwrap_state_dict
from .presets import FAMILIES, BackbonePreset, get_preset, list_presets, preset_from_dict

__all__ = [
    "FAMILIES", "FAMILY_FILTERS", "BackbonePreset", "LoadedBackbone", "TokenEncoder", "build_model",
    "check_model_matches_preset", "get_preset", "list_presets", "load_backbone", "preset_from_dict",
    "read_checkpoint", "sha256_file", "unwrap_state_dict",
]

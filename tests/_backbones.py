"""Small locally initialised backbones for the backend, export and TensorRT tests."""

from __future__ import annotations

import warnings

import torch

from jwth_engine.models import load_backbone


def lively_backbone(preset: str = "test_tiny_patch14_reg4", seed: int = 0):
    """Random init with LayerScale raised from 1e-5 to ~0.5: the blocks (attention, RoPE, MLP), not
    the patch embedding, set the tokens, so a wrong op in a graph or backend shows in the parity numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the random-weights warning is expected here
        backbone = load_backbone(preset, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in backbone.module.named_parameters():
            if name.endswith("gamma") or "gamma_" in name:
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=generator))
    return backbone

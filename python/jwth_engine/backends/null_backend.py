"""A free backbone: tokens of the preset's shape at no cost (`--backend null`, `bench --backbone null`).

It answers one question: how many tiles per second can the rest of the pipeline (open, tissue,
decode, preprocess, head, writes) feed a backbone that costs nothing? It is the ceiling the
pipeline puts on any real backbone. No model is built: the token tensor is one fixed, seeded
buffer of [max_batch, T, D] (the preset's token layout), returned as a read-only slice, so the
head does its real work on real-shaped tokens. Scores computed from it are meaningless and the
summary says so.
"""

from __future__ import annotations

import torch

from ..models.backbone import LoadedBackbone
from .base import check_images, describe_device

NULL_NOTE = ("backbone: null (no model runs; fixed tokens of the preset's shape, for feed-rate benchmarks): "
             "scores are meaningless")


def null_backbone(preset) -> LoadedBackbone:
    """The preset's token layout without building its model."""
    patches = preset.num_patch_tokens
    return LoadedBackbone(module=None, preset=preset, weights_hash="null-backbone", weights_source="null backbone",
                          embed_dim=int(preset.embed_dim), num_prefix_tokens=int(preset.num_prefix_tokens),
                          num_patch_tokens=int(patches), num_tokens=int(preset.num_prefix_tokens + patches),
                          random_init=True, notes=[NULL_NOTE])


class NullBackend:
    name = "null"
    compiled = False

    def __init__(self, backbone: LoadedBackbone, device: torch.device, *, max_batch: int, seed: int,
                 reason: str = "--backend null"):
        self.device = device
        self.precision = "fp32" if device.type == "cpu" else "bf16"
        token_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.input_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.size = backbone.preset.input_size
        self.max_batch = max_batch
        self.reason = reason
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randn(max_batch, backbone.num_tokens, backbone.embed_dim, generator=gen)
        self._tokens = tokens.to(device=device, dtype=token_dtype)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, size=self.size, device=self.device, dtypes=(self.input_dtype,),
                     max_batch=self.max_batch)
        return self._tokens[: images.shape[0]]

    def describe(self) -> dict:
        return {"name": self.name, "precision": self.precision, "device": describe_device(self.device),
                "compiled": False, "input_dtype": str(self.input_dtype).replace("torch.", ""),
                "token_dtype": str(self._tokens.dtype).replace("torch.", ""), "max_batch": self.max_batch,
                "reason": self.reason, "note": NULL_NOTE}

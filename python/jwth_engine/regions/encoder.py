"""The region mixing encoder (reference PyTorch module): a small transformer over a region's sequence of
tile embeddings at several magnifications.

Each slot's input is its backbone embedding (LayerNorm, then a linear projection to `dim`) plus two
learned encodings: magnification (one vector per magnification) and position within the region. The
position table lives on the finest magnification's grid and a coarser tile takes the mean of the
cells it covers, so a 5x tile and the sixteen 20x tiles inside it are placed at the same spot rather
than sharing an arbitrary slot index. A class token is prepended.

Outputs: contextualised tile embeddings [B, L, dim] and the class token [B, dim] (the compressed
region embedding); `region_embedding` returns either that or the mean of the contextualised tiles.

For masked-embedding modelling (mem.py) the encoder sees only the visible slots; a light decoder gets
the full sequence back with a learned mask token at the masked slots and predicts the backbone
embeddings there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..heads.reference import folded_single_query_pool
from .planning import RegionLayout

MAX_SEQUENCE_LENGTH = 1024   # slots per region the encoder accepts (r = 6 with 5/10/20x is 756)
SCHEMA = "jwth-engine/region-encoder/v1"
EMBEDDINGS = ("cls", "mean")


@dataclass(frozen=True)
class EncoderConfig:
    in_dim: int
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    decoder_depth: int = 1
    max_length: int = MAX_SEQUENCE_LENGTH

    def check(self, layout: RegionLayout) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"encoder dim {self.dim} is not divisible by its {self.heads} heads")
        if layout.length > self.max_length:
            raise ConfigError(f"region layout {layout.describe()} has {layout.length} slots; the region encoder "
                              f"takes at most {self.max_length}")


def _layer(cfg: EncoderConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(cfg.dim, cfg.heads, int(cfg.dim * cfg.mlp_ratio), dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=True)


def position_pooling(layout: RegionLayout) -> np.ndarray:
    """[L, n_f^2] float32: row i averages the finest-grid cells slot i's tile covers."""
    n_f = layout.tiles_per_side[-1]
    mags, _, rows, cols = layout.slots()
    out = np.zeros((layout.length, n_f * n_f), np.float32)
    for i, (k, r, c) in enumerate(zip(mags, rows, cols)):
        f = n_f // layout.tiles_per_side[k]
        cells = [(r * f + a) * n_f + (c * f + b) for a in range(f) for b in range(f)]
        out[i, cells] = 1.0 / len(cells)
    return out


def single_query_attention(attn: nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
    """attn(y[:, :1], y, y)[0] [B, 1, d]: row 0 of y as the only query, every row as key and value,
    without projecting the rows to keys and values (heads.reference.folded_single_query_pool, the
    JWTH head's algebra). Needs the packed in-projection with biases (kdim = vdim = d) and no
    attention dropout (the encoder has none)."""
    B, _, d = y.shape
    heads = attn.num_heads
    hd = d // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, _, b_v = attn.in_proj_bias.chunk(3)
    q = (y[:, 0] @ w_q.T + b_q).view(B, heads, hd) * hd ** -0.5
    out = folded_single_query_pool(q, w_k.view(heads, hd, d), w_v.view(heads, hd, d), b_v.view(heads, hd), y)
    return attn.out_proj(out.reshape(B, 1, d))


class RegionEncoder(nn.Module):
    def __init__(self, layout: RegionLayout, cfg: EncoderConfig):
        super().__init__()
        cfg.check(layout)
        self.layout, self.cfg = layout, cfg
        n_f = layout.tiles_per_side[-1]
        self.input_norm = nn.LayerNorm(cfg.in_dim)
        self.input_proj = nn.Linear(cfg.in_dim, cfg.dim)
        self.pos_table = nn.Parameter(torch.zeros(n_f * n_f, cfg.dim))
        self.mag_table = nn.Parameter(torch.zeros(len(layout.magnifications), cfg.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.TransformerEncoder(_layer(cfg), cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.decoder = nn.TransformerEncoder(_layer(cfg), cfg.decoder_depth, enable_nested_tensor=False)
        self.decoder_norm = nn.LayerNorm(cfg.dim)
        self.predict = nn.Linear(cfg.dim, cfg.in_dim)
        self.register_buffer("pooling", torch.from_numpy(position_pooling(layout)), persistent=False)
        self.register_buffer("slot_magnification", torch.from_numpy(layout.slots()[0]), persistent=False)
        for p in (self.pos_table, self.mag_table, self.cls_token, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)

    def slot_encoding(self) -> torch.Tensor:
        """[L, dim]: position (pooled from the finest grid) + magnification, per slot."""
        return self.pooling @ self.pos_table + self.mag_table[self.slot_magnification]

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.layout.length or x.shape[2] != self.cfg.in_dim:
            raise ValueError(f"region sequences: expected [B, {self.layout.length}, {self.cfg.in_dim}], got {list(x.shape)}")

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, in_dim] -> (contextualised slots [B, L or V, dim], class token [B, dim]).

        `visible` [B, V] (slot indices, same count per region) encodes only those slots.
        """
        self._check(x)
        h = self._embed_slots(x, visible)
        h = self.norm(self.blocks(h))
        return h[:, 1:], h[:, 0]

    def _embed_slots(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + L (or V), dim]: class token, then each slot's projection + its encodings."""
        h = self.input_proj(self.input_norm(x)) + self.slot_encoding()
        if visible is not None:
            h = torch.gather(h, 1, visible[..., None].expand(-1, -1, h.shape[-1]))
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """[B, dim]: the class token only, = forward(x)[1] (tested).

        The last block's output is needed at the class token alone, so that block computes the
        query, the attention output and the MLP for one row, and attends with one query per head
        without projecting the slots to keys and values (`single_query_attention`): with the
        default encoder (2 blocks, D = 384, r = 2) 38 % fewer FLOPs than the full forward."""
        self._check(x)
        h = self._embed_slots(x)
        *first, last = self.blocks.layers
        for layer in first:
            h = layer(h)
        y = last.norm1(h)
        # The pre-norm layer's two residual branches (nn.TransformerEncoderLayer, norm_first=True),
        # written out because only the class token's row is wanted.
        c = h[:, :1] + last.dropout1(single_query_attention(last.self_attn, y))
        z = last.norm2(c)
        c = c + last.dropout2(last.linear2(last.dropout(last.activation(last.linear1(z)))))
        return self.norm(c)[:, 0]

    def region_embedding(self, x: torch.Tensor, kind: str = "cls") -> torch.Tensor:
        """[B, dim]: the class token ("cls", compressed) or the mean of the contextualised slots ("mean")."""
        if kind not in EMBEDDINGS:
            raise ValueError(f"region embedding kind must be one of {EMBEDDINGS}, got {kind!r}")
        if kind == "cls":
            return self.class_token(x)
        return self(x)[0].mean(dim=1)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted backbone embeddings [B, L, in_dim] from the unmasked slots (`mask` [B, L] bool,
        True = hidden, the same number per region)."""
        B, L = mask.shape
        visible = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, : L - int(mask[0].sum())]
        enc, cls = self(x, visible)
        full = self.mask_token.expand(B, L, -1).clone()
        full = full.scatter(1, visible[..., None].expand(-1, -1, enc.shape[-1]), enc) + self.slot_encoding()
        dec = self.decoder(torch.cat([cls[:, None], full], dim=1))
        return self.predict(self.decoder_norm(dec[:, 1:]))


# --- files -------------------------------------------------------------------------------------------

def encoder_metadata(model: RegionEncoder, extra: dict | None = None) -> dict:
    return {"schema": SCHEMA, "layout": model.layout.to_dict(), "config": asdict(model.cfg), **(extra or {})}


def save_region_encoder(model: RegionEncoder, path: str | os.PathLike, extra: dict | None = None) -> None:
    from safetensors.torch import save

    from ..outputs.atomic import atomic_write_bytes

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"jwth": json.dumps(encoder_metadata(model, extra))}
    atomic_write_bytes(path, save(state, metadata=meta))


def load_region_encoder(path: str | os.PathLike) -> tuple[RegionEncoder, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("jwth")
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"{path}: cannot read region encoder ({exc})") from exc
    if raw is None:
        raise ModelError(f"{path}: not a region encoder file (no jwth metadata)")
    meta = json.loads(raw)
    if meta.get("schema") != SCHEMA:
        raise ModelError(f"{path}: not a region encoder file (schema {meta.get('schema')!r})")
    model = RegionEncoder(RegionLayout.from_dict(meta["layout"]), EncoderConfig(**meta["config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: region encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta

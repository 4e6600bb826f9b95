"""Readable PyTorch reference of the two slide-tile heads.

These modules define the maths; the native kernels in `csrc/` (dispatched from
`jwth_engine.heads.native`) are tested against them. Both take the backbone's full token tensor
`[B, T, D]` laid out as `[class, registers (R), patches (P)]`, already through the backbone's final
norm, and return `HeadOutput(logits [B, C], pooled [B, D], attn [B, H, P] | None)`.

JWTH attention pooling (arXiv 2511.05150): the class token is the single query of a multi-head
attention over the patch tokens (registers excluded, they carry global scratch state, not tissue):

    q = W_q c + b_q,  k_i = W_k p_i + b_k,  v_i = W_v p_i + b_v        (per head h: slices of D/H)
    a_h = softmax_i(q_h . k_{h,i} / sqrt(d))                              d = D / H
    o   = concat_h(sum_i a_{h,i} v_{h,i});  pooled = W_o o + b_o;  logits = W_c pooled + b_c

The linear probe is the baseline: logits = W_c c + b_c, patches unused.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class HeadOutput(NamedTuple):
    logits: torch.Tensor
    pooled: torch.Tensor
    attn: torch.Tensor | None


class JwthPoolingHead(nn.Module):
    """Class-token-queried multi-head attention pooling + linear classifier (reference)."""

    pooling = "jwth"

    def __init__(self, dim: int, num_classes: int, num_heads: int, num_prefix_tokens: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_classes = dim, num_heads, num_classes
        self.num_prefix_tokens = num_prefix_tokens
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, need_attn: bool = False) -> HeadOutput:
        b, t, dim = tokens.shape
        h, d = self.num_heads, dim // self.num_heads
        cls = tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens :]
        p = patches.shape[1]
        q = self.q_proj(cls).view(b, h, 1, d)
        k = self.k_proj(patches).view(b, p, h, d).transpose(1, 2)  # [B, H, P, d]
        v = self.v_proj(patches).view(b, p, h, d).transpose(1, 2)
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)  # [B, H, 1, P]
        o = (attn @ v).reshape(b, dim)
        pooled = self.out_proj(o)
        logits = self.classifier(pooled)
        return HeadOutput(logits, pooled, attn[:, :, 0] if need_attn else None)


class LinearProbeHead(nn.Module):
    """Class token -> linear classifier (the baseline JWTH is compared against)."""

    pooling = "linear-probe"

    def __init__(self, dim: int, num_classes: int, num_prefix_tokens: int):
        super().__init__()
        self.dim, self.num_classes, self.num_prefix_tokens = dim, num_classes, num_prefix_tokens
        self.num_heads = 0
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, need_attn: bool = False) -> HeadOutput:
        cls = tokens[:, 0]
        return HeadOutput(self.classifier(cls), cls, None)


def folded_single_query_pool(q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor,
                             tokens: torch.Tensor) -> torch.Tensor:
    """One query per head attending over `tokens` without projecting them to keys and values: the
    algebra of the native JWTH kernel, in PyTorch.

    q [B, H, d]; w_k, w_v [H, d, D], the key and value projections' weight rows per head (q or w_k
    carries the 1/sqrt(d) scale); b_v [H, d]; tokens [B, N, D] -> [B, H, d], the per-head attention
    output Σ_j a_j (W_v t_j + b_v). Per head q·(W_k t_j + b_k) = (W_kᵀ q)·t_j + q·b_k, and the last term,
    the same for every j, cancels in the softmax; Σ_j a_j W_v t_j = W_v Σ_j a_j t_j since the
    weights sum to 1. So the N tokens are read twice as D-vectors (2·N·D multiply-adds per head)
    instead of being projected (2·N·D² for all heads). The two products over the tokens run in
    the tokens' dtype, scores, softmax and sums in at least float32."""
    acc = torch.promote_types(tokens.dtype, torch.float32)
    u = torch.einsum("bhe,hen->bhn", q, w_k).to(tokens.dtype)                   # W_kᵀ q, per head
    attn = torch.softmax(torch.bmm(u, tokens.transpose(1, 2)).to(acc), dim=-1).to(tokens.dtype)
    z = torch.bmm(attn, tokens).to(acc)                                           # Σ_j a_j t_j, per head
    return torch.einsum("bhn,hen->bhe", z, w_v) + b_v


HEAD_CLASSES = {"jwth": JwthPoolingHead, "linear-probe": LinearProbeHead}


def build_head(pooling: str, dim: int, num_classes: int, num_heads: int, num_prefix_tokens: int) -> nn.Module:
    if pooling == "jwth":
        return JwthPoolingHead(dim, num_classes, num_heads, num_prefix_tokens)
    if pooling == "linear-probe":
        return LinearProbeHead(dim, num_classes, num_prefix_tokens)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {sorted(HEAD_CLASSES)}")

"""Slide heads: readable PyTorch reference modules that reduce a bag of tile embeddings to a slide.

Every module takes one bag `[N, D]` (N tiles of one slide, any N >= 1, no padding) and returns
`SlideHeadOutput(logits [C], attention [N])`, which unpacks as `(logits, attention)` and carries the
pooled slide vector as `.embedding` [D]. `attention` is each tile's weight in the slide embedding (it sums to 1 for the
attention heads and mean pooling), so it can be shown per tile next to the tile scores.

Gated attention MIL (Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning",
ICML 2018, eq. 9):

    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) )        V, U: [hidden, D], w: [hidden]
    z   = sum_i a_i h_i;   logits = W_c z + b_c

Whole Slide Concepts reducer (the multi-head attention reducer of the Whole Slide Concepts model):
a small MLP scores each tile once per head, a softmax over the slide's tiles per head gives H
weightings, and the H weighted sums are averaged:

    s_i = MLP(h_i) in R^H;  a_{i,h} = softmax_i(s_{i,h});  z = (1/H) sum_h sum_i a_{i,h} h_i
    per-tile weight a_i = (1/H) sum_h a_{i,h}   (so z = sum_i a_i h_i exactly)

Baselines: mean pooling (z = mean_i h_i, a_i = 1/N) and max pooling (z_d = max_i h_{i,d};
a_i = share of the D dimensions whose maximum tile i holds).

Every head first standardises the tile features with the training tiles' mean and standard
deviation (buffers saved with the head; identity for a fresh module, so the formulas above hold
as written on standardised h_i).

Tiles are scored in chunks of CHUNK, so a 100k-tile bag never holds [N, hidden] activations at
once; only the [N, heads] scores are kept, and the softmax over them is the one-shot softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# Tiles per chunk of the streamed reduction: [CHUNK, hidden] activations stay a few MB.
CHUNK = 8192


class _LogitsAttention(NamedTuple):
    logits: torch.Tensor       # [C]
    attention: torch.Tensor    # [N]


class SlideHeadOutput(_LogitsAttention):
    """Unpacks as `(logits, attention)`; `.embedding` [D] is the pooled vector the classifier sees."""

    def __new__(cls, logits: torch.Tensor, attention: torch.Tensor, embedding: torch.Tensor):
        out = super().__new__(cls, logits, attention)
        out.embedding = embedding
        return out


def _check_bag(bag: torch.Tensor, dim: int) -> None:
    if bag.ndim != 2 or bag.shape[1] != dim:
        raise ValueError(f"bag must be [N, {dim}], got {list(bag.shape)}")
    if bag.shape[0] == 0:
        raise ValueError("empty bag: a slide needs at least one tile")


def _attention_pool(bag: torch.Tensor, score) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, H], pooled [H, D]) for per-tile scores `score(chunk) -> [n, H]`, softmax over N.

    One chunk: the plain softmax (what autograd sees in training, bags are rarely larger). Several:
    scores are kept ([N, H] is small) and the weighted sum accumulates chunk by chunk.
    """
    n = bag.shape[0]
    if n <= CHUNK:
        weights = torch.softmax(score(bag), dim=0)
        return weights, weights.transpose(0, 1) @ bag
    scores = torch.cat([score(bag[s:s + CHUNK]) for s in range(0, n, CHUNK)])
    weights = torch.softmax(scores, dim=0)
    pooled = sum(weights[s:s + CHUNK].transpose(0, 1) @ bag[s:s + CHUNK] for s in range(0, n, CHUNK))
    return weights, pooled


class _SlideHead(nn.Module):
    """Tile features are standardised first, (h - feature_mean) / feature_std, with statistics of the
    training tiles (identity until `set_feature_stats`): raw class tokens vary by a few percent
    between tiles, too little for a few hundred optimiser steps to separate."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def _standardise(self, bag: torch.Tensor) -> torch.Tensor:
        # One new [N, D] tensor, divided in place: a 100k-tile bag is not copied twice.
        return bag.sub(self.feature_mean.to(bag.dtype)).div_(self.feature_std.to(bag.dtype))


class GatedABMIL(_SlideHead):
    """Gated attention-based MIL (Ilse et al. 2018), one attention branch, linear classifier."""

    kind = "abmil"

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, dropout: float = 0.0):
        super().__init__(dim)
        self.dim, self.num_classes, self.hidden = dim, num_classes, hidden
        self.attn_v = nn.Linear(dim, hidden)
        self.attn_u = nn.Linear(dim, hidden)
        self.attn_w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def scores(self, bag: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.attn_v(bag)) * torch.sigmoid(self.attn_u(bag))
        return self.attn_w(self.dropout(gate))                     # [n, 1]

    def forward(self, bag: torch.Tensor) -> SlideHeadOutput:
        _check_bag(bag, self.dim)
        bag = self._standardise(bag)
        weights, pooled = _attention_pool(bag, self.scores)
        z = pooled[0]
        return SlideHeadOutput(self.classifier(self.dropout(z)), weights[:, 0], z)


class WSCReducer(_SlideHead):
    """Whole Slide Concepts multi-head attention reducer: an MLP scores tiles per head."""

    kind = "wsc"

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, num_heads: int = 4, dropout: float = 0.0):
        super().__init__(dim)
        self.dim, self.num_classes, self.hidden, self.num_heads = dim, num_classes, hidden, num_heads
        self.score_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(hidden, num_heads))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, bag: torch.Tensor) -> SlideHeadOutput:
        _check_bag(bag, self.dim)
        bag = self._standardise(bag)
        weights, pooled = _attention_pool(bag, self.score_mlp)   # [N, H], [H, D]
        z = pooled.mean(0)
        return SlideHeadOutput(self.classifier(self.dropout(z)), weights.mean(1), z)


class _PoolingBaseline(_SlideHead):
    """A parameter-free reduction of the bag followed by a linear classifier (the MIL baselines)."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__(dim)
        self.dim, self.num_classes = dim, num_classes
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)


class MeanPool(_PoolingBaseline):
    kind = "mean"

    def forward(self, bag: torch.Tensor) -> SlideHeadOutput:
        _check_bag(bag, self.dim)
        bag = self._standardise(bag)
        z = bag.mean(0)
        n = bag.shape[0]
        return SlideHeadOutput(self.classifier(self.dropout(z)), bag.new_full((n,), 1.0 / n), z)


class MaxPool(_PoolingBaseline):
    kind = "max"

    def forward(self, bag: torch.Tensor) -> SlideHeadOutput:
        _check_bag(bag, self.dim)
        bag = self._standardise(bag)
        z, winner = bag.max(0)
        share = torch.bincount(winner, minlength=bag.shape[0]).to(bag.dtype) / self.dim
        return SlideHeadOutput(self.classifier(self.dropout(z)), share, z)


SLIDE_HEADS = {"abmil": GatedABMIL, "wsc": WSCReducer, "mean": MeanPool, "max": MaxPool}


def build_slide_head(kind: str, dim: int, num_classes: int, *, hidden: int = 128, num_heads: int = 4,
                     dropout: float = 0.0) -> nn.Module:
    """The slide head `kind` (abmil | wsc | mean | max); `hidden`/`num_heads` only where they apply."""
    if kind == "abmil":
        return GatedABMIL(dim, num_classes, hidden=hidden, dropout=dropout)
    if kind == "wsc":
        return WSCReducer(dim, num_classes, hidden=hidden, num_heads=num_heads, dropout=dropout)
    if kind in ("mean", "max"):
        return SLIDE_HEADS[kind](dim, num_classes, dropout=dropout)
    raise ValueError(f"unknown slide head {kind!r}; expected one of {sorted(SLIDE_HEADS)}")

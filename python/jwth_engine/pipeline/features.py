"""Which vector stands for a tile, and the batch observers that take it out of the pipeline.

Kinds (`--features`), from the backbone tokens [B, T, D] = [class, registers, patches] of a batch:

    cls        tokens[:, 0]                                  the class token (most encoders' "embedding")
    mean       tokens[:, num_prefix_tokens:].mean(1)         mean of the patch tokens (registers excluded)
    cls+mean   concat(cls, mean), 2D                         what Virchow / Virchow2 publish as their tile embedding
    jwth       the JWTH-pooled vector of the tile head        needs a trained --head (need_pooled)

Vectors are computed on the device in float32 and copied to the CPU once per batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError

KINDS = ("cls", "mean", "cls+mean", "jwth")


def parse_kinds(value: str | Sequence[str]) -> tuple[str, ...]:
    """`cls,mean` (or a sequence) → ('cls', 'mean'), each once, order kept; unknown kinds are a ConfigError."""
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds: list[str] = []
    for item in (i.strip() for i in items):
        if item not in KINDS:
            raise ConfigError(f"--features {item!r}: expected one or several of {', '.join(KINDS)}")
        if item not in kinds:
            kinds.append(item)
    if not kinds:
        raise ConfigError("--features: name at least one of " + ", ".join(KINDS))
    return tuple(kinds)


def kind_dim(kind: str, embed_dim: int) -> int:
    return 2 * embed_dim if kind == "cls+mean" else embed_dim


def tile_vectors(kind: str, tokens: torch.Tensor, head_output, num_prefix_tokens: int) -> torch.Tensor:
    """[B, dim] float32 on the tokens' device."""
    if kind == "cls":
        return tokens[:, 0].float()
    if kind == "mean":
        return tokens[:, num_prefix_tokens:].float().mean(1)
    if kind == "cls+mean":
        return torch.cat([tokens[:, 0].float(), tokens[:, num_prefix_tokens:].float().mean(1)], dim=1)
    if kind == "jwth":
        if head_output.pooled is None:
            raise RuntimeError("the head did not return its pooled vector; run the stage with need_pooled")
        return head_output.pooled.float()
    raise ValueError(f"unknown feature kind {kind!r}")


class FeatureObserver:
    """A pipeline batch observer that hands each batch's vectors of `kinds` to `sink(kind, first_row,
    rows [B, dim] float32 numpy)` — a FeaturesH5Writer.write, or a CPU buffer."""

    def __init__(self, kinds: Sequence[str], num_prefix_tokens: int,
                 sink: Callable[[str, int, np.ndarray], None]):
        self.kinds, self.num_prefix_tokens, self.sink = tuple(kinds), num_prefix_tokens, sink

    @property
    def need_pooled(self) -> bool:
        return "jwth" in self.kinds

    def __call__(self, first_row: int, tokens: torch.Tensor, head_output, probs: torch.Tensor) -> None:
        for kind in self.kinds:
            rows = tile_vectors(kind, tokens, head_output, self.num_prefix_tokens)
            self.sink(kind, first_row, rows.cpu().numpy())


class FeatureBuffer:
    """Rows of one kind kept in memory ([N, dim] float32, filled batch by batch)."""

    def __init__(self, num_rows: int, dim: int):
        self.array = np.zeros((num_rows, dim), np.float32)
        self.filled = np.zeros(num_rows, bool)

    def __call__(self, kind: str, first_row: int, rows: np.ndarray) -> None:
        self.array[first_row:first_row + len(rows)] = rows
        self.filled[first_row:first_row + len(rows)] = True

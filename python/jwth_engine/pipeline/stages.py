"""The per-batch work shared by every pipeline: what turns decoded tiles into probabilities.

Consumers that need more than probabilities (tile embeddings, attention maps of chosen tiles, a
slide-level head) register *batch observers* on the stage instead of adding loops of their own: each
observer sees every batch once, in grid order, with the backbone's tokens and the head's output still
on the device, so nothing needs a second pass over the slide. An observer must not keep references
to `tokens` (the pipeline frees a batch's device memory as soon as the next one starts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from ..heads.reference import HeadOutput


class BatchObserver(Protocol):
    """Sees each scored batch: rows [first_row, first_row + len(tokens)) of the tile grid."""

    def __call__(self, first_row: int, tokens: torch.Tensor, head_output: HeadOutput,
                 probs: torch.Tensor) -> None: ...


@dataclass
class ModelStage:
    """Preprocess → backbone → head for one batch of decoded uint8 tiles.

    `need_attn` / `need_pooled` ask the head for its attention weights [N, H, P] and pooled vector
    [N, D] (for observers); off by default so the normal path does not write them.
    """

    backend: object                       # jwth_engine.backends.Backend
    head: Callable[..., HeadOutput]
    tile_size: int
    mean: Sequence[float]
    std: Sequence[float]
    observers: Sequence[BatchObserver] = ()
    need_attn: bool = False
    need_pooled: bool = False
    rows_seen: int = field(default=0, init=False)

    def preprocess(self, tiles) -> torch.Tensor:
        """uint8 [N, h, w, 3] (numpy or torch, CPU or on the backend's device) → model input."""
        from ..preprocess import preprocess

        if isinstance(tiles, np.ndarray):
            tiles = torch.from_numpy(tiles)
        return preprocess(tiles, self.tile_size, self.mean, self.std,
                          dtype=self.backend.input_dtype, device=self.backend.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.backend(images)

    def probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [N, C] float32, left on the tokens' device (no synchronisation)."""
        with torch.inference_mode():
            if self.need_attn or self.need_pooled:
                out = self.head(tokens, need_attn=self.need_attn, need_pooled=self.need_pooled)
            else:
                out = self.head(tokens)
            probs = torch.softmax(out.logits.float(), dim=-1)
            for observe in self.observers:
                observe(self.rows_seen, tokens, out, probs)
            self.rows_seen += tokens.shape[0]
            return probs

    def classify(self, tokens: torch.Tensor) -> np.ndarray:
        return self.probabilities(tokens).cpu().numpy()


@dataclass
class StageTimer:
    """Wall time per stage, summed over batches (stages overlap in a streaming pipeline)."""

    seconds: dict = field(default_factory=dict)

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (now - start)
        return now


def synchronize(device: torch.device) -> None:
    # Stage timings on a GPU are meaningless without a sync: kernels run asynchronously.
    if device.type == "cuda":
        torch.cuda.synchronize(device)

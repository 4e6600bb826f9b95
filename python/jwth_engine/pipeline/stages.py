"""The per-batch work shared by every pipeline: what turns decoded tiles into probabilities."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..heads.reference import HeadOutput


@dataclass
class ModelStage:
    """Preprocess → backbone → head for one batch of decoded uint8 tiles."""

    backend: object                       # jwth_engine.backends.Backend
    head: Callable[[torch.Tensor], HeadOutput]
    tile_size: int
    mean: Sequence[float]
    std: Sequence[float]

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
            logits = self.head(tokens).logits
            return torch.softmax(logits.float(), dim=-1)

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

"""The scoring model, loaded once per run: preset + weights -> backbone -> backend, plus the head
(a file or a seeded random one), with the configuration's file-dependent defaults resolved."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

from ..backends import select_backend
from ..config import DEFAULT_CLASSES, ResolvedConfig, RunConfig
from ..errors import ConfigError
from ..heads import check_head_matches_backbone, load_head, random_head
from ..heads.native import make_head_runner
from ..models import get_preset, load_backbone
from ..pipeline import ModelStage

# The backend choice (and a TensorRT engine build, which takes minutes) is announced on this logger;
# the CLI shows it at the default verbosity.
backend_log = logging.getLogger("jwth_engine.backends")


@dataclass
class ScoringModel:
    """Backbone behind its backend, plus the head that turns its tokens into class probabilities."""

    resolved: ResolvedConfig
    preset: object
    backbone: object
    head: object                     # heads.LoadedHead
    backend: object                  # backends.Backend
    head_runner: object              # native kernel runner (or the reference when unavailable)
    notes: list = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def tile_size(self) -> int:
        return self.resolved.tile_size

    @property
    def target_mpp(self) -> float:
        return self.resolved.target_mpp

    def stage(self, observers=(), *, need_attn: bool = False, need_pooled: bool = False) -> ModelStage:
        """A fresh per-slide ModelStage; `observers` see every batch (see pipeline/stages.py)."""
        return ModelStage(self.backend, self.head_runner, self.tile_size, self.preset.mean, self.preset.std,
                          observers=tuple(observers), need_attn=need_attn, need_pooled=need_pooled)


def load_scoring_model(config: RunConfig, *, announce: Callable[[str], None] | None = None) -> ScoringModel:
    """Head file (or a seeded random head), preset, weights, backend; every problem a ConfigError,
    ModelError or BackendUnavailable with one line. Warnings (random weights or head) are kept in
    `notes` for the summary and logged."""
    t = time.perf_counter()
    notes: list[str] = []
    m = config.model
    loaded_head = load_head(m.head) if m.head else None
    head_meta = loaded_head.meta if loaded_head else None
    preset = get_preset(config.model_name(head_meta))
    resolved = config.resolve(head_meta, preset)
    if resolved.tile_size != preset.input_size:
        # The backbone's position embedding (and an exported engine) is fixed to its input size.
        raise ConfigError(f"tile_size {resolved.tile_size} does not match preset {preset.name}'s input size "
                          f"{preset.input_size}; use tile_size {preset.input_size} or a preset of that size",
                          field="tile_size")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = load_backbone(preset, m.weights, seed=m.seed)
        if loaded_head is None:
            loaded_head = random_head(
                resolved.pooling, dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                classes=list(DEFAULT_CLASSES), num_heads=math.gcd(backbone.embed_dim, 8),
                backbone_preset=preset.name, backbone_weights_hash=backbone.weights_hash,
                tile_size=resolved.tile_size, target_mpp=resolved.target_mpp, seed=m.seed,
            )
    for warning in caught:
        # Kept for the summary, and passed on: API users see a Python warning, the CLI shows it
        # on stderr (logging.captureWarnings).
        notes.append(str(warning.message))
        warnings.warn(warning.message, stacklevel=2)
    notes += check_head_matches_backbone(
        loaded_head, preset=preset.name, dim=backbone.embed_dim,
        num_prefix_tokens=backbone.num_prefix_tokens, weights_hash=backbone.weights_hash,
    )
    r = config.runtime
    chosen = select_backend(backbone, backend=r.backend, device=r.device, precision=r.precision,
                            max_batch=r.batch_size, compile=r.compile, log=announce or backend_log.info)
    runner = make_head_runner(loaded_head.module).to(chosen.device)
    return ScoringModel(resolved, preset, backbone, loaded_head, chosen, runner, notes, time.perf_counter() - t)

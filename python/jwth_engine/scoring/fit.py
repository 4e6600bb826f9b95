"""`fit-head`'s orchestration: labelled tiles -> frozen backbone tokens -> trained head file."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ..backends import select_backend
from ..config import RunConfig, TrainingConfig
from ..heads import HeadMeta, save_head
from ..heads.fit import embed_tiles, load_tile_images, read_labels_csv, train_head
from ..errors import FitError
from ..models import get_preset, load_backbone
from ..pipeline import ModelStage


def fit_head(labels_csv: str | os.PathLike, out_path: str | os.PathLike, config: RunConfig,
             training: TrainingConfig, *, root: str | os.PathLike | None = None,
             where: Sequence[tuple[str, str]] = (), log: Callable[[str], None] = lambda _: None,
             warn: Callable[[str], None] = lambda _: None) -> dict:
    """Train a head on the tiles of `labels_csv` (`path`, `label` columns; `where` keeps rows whose
    COLUMN equals VALUE) with the backbone of `config`, write it to `out_path`; returns the report
    (with the file's sha256). Scoring resolves the head's preset, tile size and resolution from it."""
    data = read_labels_csv(labels_csv, root=root, where=where)
    m, runtime = config.model, config.runtime
    preset = get_preset(config.model_name())
    resolved = config.resolve(None, preset)
    backbone = load_backbone(preset, m.weights, seed=m.seed)
    if resolved.pooling == "jwth" and backbone.embed_dim % training.num_heads:
        raise FitError(f"num_heads {training.num_heads} does not divide the embedding dim {backbone.embed_dim}",
                       field="num_heads")
    # One pass over the tiles: compiling would cost more than it saves.
    chosen = select_backend(backbone, backend=runtime.backend, device=runtime.device, precision=runtime.precision,
                            max_batch=runtime.batch_size, compile=False)
    stage = ModelStage(chosen, head=None, tile_size=resolved.tile_size, mean=preset.mean, std=preset.std)
    tokens = embed_tiles(load_tile_images(data.paths), stage, runtime.batch_size)
    labels = np.array([data.classes.index(label) for label in data.labels])
    head, report = train_head(tokens, labels, pooling=resolved.pooling, num_classes=len(data.classes),
                              num_prefix_tokens=backbone.num_prefix_tokens, training=training, seed=m.seed,
                              classes=data.classes, log=log, warn=warn)
    # Listed in the returned report so that the validation score can be checked; kept out of the
    # head file, whose metadata would grow with the data set.
    val_tiles = [str(data.paths[i]) for i in report.pop("val_tiles")]
    report.update({"labels_csv": str(labels_csv), "num_tiles": len(labels), "classes": data.classes,
                   "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(data.classes)},
                   "backbone_random_init": backbone.random_init, "config": config.to_dict()})
    meta = HeadMeta(pooling=resolved.pooling, classes=data.classes,
                    num_heads=training.num_heads if resolved.pooling == "jwth" else 0,
                    dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                    backbone_preset=preset.name, backbone_weights_hash=backbone.weights_hash,
                    tile_size=resolved.tile_size, target_mpp=resolved.target_mpp, training=report)
    report["sha256"] = save_head(head, meta, out_path)
    report["val_tiles"] = val_tiles
    return report

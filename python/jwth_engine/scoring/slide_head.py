"""`score --slide-head`: the slide head runs on the tile vectors the scoring pass just produced.

A FeatureObserver fills a CPU buffer with the head's feature kind while the slide streams (no
second pass over the slide); once the last batch is in, the head reduces the bag, its prediction
goes into the summary and each tile's attention weight into the tiles table (`slide_attention`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError
from ..heads.slide_io import LoadedSlideHead, check_features_match, load_slide_head
from ..pipeline.features import FeatureBuffer, FeatureObserver, kind_dim

ATTENTION_COLUMN = "slide_attention"


class SlideHeadRunner:
    def __init__(self, head: str | LoadedSlideHead, model):
        self.head = load_slide_head(head) if isinstance(head, str) else head
        meta = self.head.meta
        if meta.feature_kind == "jwth" and model.head.meta.random_init:
            raise ModelError(f"{self.head.source}: the slide head reads JWTH-pooled vectors; pass the tile --head "
                             f"they were embedded with")
        if meta.feature_kind not in ("cls", "mean", "cls+mean", "jwth"):
            raise ModelError(f"{self.head.source}: slide head was trained on features of kind "
                             f"{meta.feature_kind!r}, which score cannot produce; embed them with jwth-engine")
        check_features_match(meta, source=self.head.source, dim=kind_dim(meta.feature_kind, model.backbone.embed_dim),
                             encoder=model.preset.name, weights_hash=model.backbone.weights_hash, feature_kind=None)
        self.num_prefix_tokens = model.backbone.num_prefix_tokens
        self.buffer: FeatureBuffer | None = None

    @property
    def need_pooled(self) -> bool:
        return self.head.meta.feature_kind == "jwth"

    def observer(self, num_rows: int) -> FeatureObserver:
        meta = self.head.meta
        self.buffer = FeatureBuffer(num_rows, meta.dim)
        return FeatureObserver([meta.feature_kind], self.num_prefix_tokens, self.buffer)

    def annotate(self, table, summary: dict):
        import pyarrow as pa

        meta, n = self.head.meta, table.num_rows
        record = {"kind": meta.kind, "feature_kind": meta.feature_kind, "classes": list(meta.classes),
                  "source": self.head.source, "sha256": self.head.sha256}
        if n == 0:
            summary["slide_head"] = {**record, "prediction": None, "probs": "no tissue"}
            return table.append_column(ATTENTION_COLUMN, pa.array(np.zeros(0, np.float32)))
        if self.buffer is None or not self.buffer.filled.all():
            raise RuntimeError("slide head: not every tile's features reached the buffer")
        with torch.no_grad():
            out = self.head.module(torch.from_numpy(self.buffer.array))
            probs = torch.softmax(out.logits.double(), -1).numpy()
        summary["slide_head"] = {**record, "prediction": meta.classes[int(probs.argmax())],
                                 "probs": {c: float(p) for c, p in zip(meta.classes, probs)}}
        return table.append_column(ATTENTION_COLUMN, pa.array(out.attention.numpy().astype(np.float32)))

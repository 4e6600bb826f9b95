"""`SlideScorer`: `score_slide` split in two for a long-lived worker — the model is loaded once,
and a slide is *prepared* (opened, tissue found, tiles planned, decoding started with the pipeline's
`TilePrefetcher`) separately from being *finished* (backbone, head, outputs). A worker prepares
the next slide while the current one is still in the backbone.

The outputs must be exactly what `score_slide` writes; `tests/test_screen.py` checks the two agree
on a real slide. (Once `score.py` offers the same split, this module becomes a thin adapter.)
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError

log = logging.getLogger("jwth_engine")


@dataclass
class PreparedSlide:
    path: str
    mpp_override: float | None
    slide: object
    slide_mpp: float
    tissue: object
    grid: object
    prefetcher: object | None          # TilePrefetcher, decoding already (None when no tiles)
    timings: dict = field(default_factory=dict)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.slide.close()


class SlideScorer:
    """Everything of `score_slide` that does not depend on the slide, built once."""

    def __init__(self, *, model=None, weights=None, head=None, pooling=None, device="auto", backend="auto",
                 precision="auto", batch_size=32, mpp=None, tile_size=None, target_mpp=None, min_tissue=0.25,
                 top_k=16, num_workers=2, reader="auto", seed=0, compile=None):
        from ..backends import select_backend
        from ..heads import check_head_matches_backbone, load_head, random_head
        from ..heads.native import make_head_runner
        from ..models import get_preset, load_backbone
        from ..score import DEFAULT_CLASSES, DEFAULT_PRESET

        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        if not 0.0 <= min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be within [0, 1], got {min_tissue}")
        t = time.perf_counter()
        self.notes: list[str] = []
        loaded_head = load_head(head) if head else None
        if loaded_head is not None and pooling and pooling != loaded_head.meta.pooling:
            raise ConfigError(
                f"{head}: head file is a {loaded_head.meta.pooling} head but --pooling {pooling} was given"
            )
        preset_name = model or (loaded_head.meta.backbone_preset if loaded_head else DEFAULT_PRESET)
        preset = get_preset(preset_name)
        tile_size = tile_size or (loaded_head.meta.tile_size if loaded_head else preset.input_size)
        target_mpp = target_mpp or (loaded_head.meta.target_mpp if loaded_head else preset.native_mpp)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone = load_backbone(preset_name, weights, seed=seed)
            if loaded_head is None:
                loaded_head = random_head(
                    pooling or "jwth", dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                    classes=list(DEFAULT_CLASSES), num_heads=math.gcd(backbone.embed_dim, 8),
                    backbone_preset=preset.name, backbone_weights_hash=backbone.weights_hash,
                    tile_size=tile_size, target_mpp=target_mpp, seed=seed,
                )
        for warning in caught:
            self.notes.append(str(warning.message))
            log.warning("%s", warning.message)
        self.notes += check_head_matches_backbone(
            loaded_head, preset=preset.name, dim=backbone.embed_dim,
            num_prefix_tokens=backbone.num_prefix_tokens, weights_hash=backbone.weights_hash,
        )
        self.chosen = select_backend(backbone, backend=backend, device=device, precision=precision,
                                     max_batch=batch_size, compile=compile, log=log.info)
        self.head_runner = make_head_runner(loaded_head.module).to(self.chosen.device)
        self.preset, self.backbone, self.head = preset, backbone, loaded_head
        self.tile_size, self.target_mpp = tile_size, target_mpp
        self.batch_size, self.min_tissue, self.top_k = batch_size, min_tissue, top_k
        self.num_workers, self.reader, self.mpp = num_workers, reader, mpp
        self.load_seconds = time.perf_counter() - t
        self._load_charged = False

    # --- per slide ------------------------------------------------------------------------------------
    def prepare(self, path: str, mpp: float | None = None) -> PreparedSlide:
        """Open the slide, find its tissue, plan its tiles and start decoding them (in a thread)."""
        from ..pipeline import TilePrefetcher
        from ..slide import open_slide, resolve_mpp
        from ..tiling import plan_tiles
        from ..tissue import detect_tissue

        mpp = self.mpp if mpp is None else mpp
        timings = {}
        t = time.perf_counter()
        slide = open_slide(path, reader=self.reader)
        try:
            slide_mpp = resolve_mpp(slide.info, mpp)
            timings["open"] = time.perf_counter() - t
            t = time.perf_counter()
            tissue = detect_tissue(slide)
            timings["tissue"] = time.perf_counter() - t
            t = time.perf_counter()
            grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=self.target_mpp, tile_size=self.tile_size,
                              tissue=tissue, min_tissue=self.min_tissue)
            timings["plan"] = time.perf_counter() - t
            prefetcher = None
            if len(grid.coords):
                prefetcher = TilePrefetcher(slide, grid, batch_size=self.batch_size, num_workers=self.num_workers,
                                            pin_memory=self.chosen.device.type == "cuda").start()
        except BaseException:
            slide.close()
            raise
        return PreparedSlide(str(path), mpp, slide, slide_mpp, tissue, grid, prefetcher, timings)

    def finish(self, prepared: PreparedSlide, *, out: str | Path, name: str,
               progress: Callable[[int, int], None] | None = None, started: float | None = None) -> dict:
        """Score the prepared slide and write `<out>/<name>.tiles.parquet` and `.summary.json`
        exactly as `score_slide` does; returns the summary."""
        from ..outputs import aggregate_scores, package_versions, remove_stale_temps, sha256_file
        from ..outputs import tiles_table, write_summary_json, write_tiles_parquet
        from ..pipeline import ModelStage, run_streaming
        from ..score import _check_out_dir, output_paths

        t_start = started or time.perf_counter()
        out_dir = _check_out_dir(out)
        timings = {"open": prepared.timings.get("open", 0.0),
                   "model_load": 0.0 if self._load_charged else self.load_seconds}
        self._load_charged = True
        timings["tissue"] = prepared.timings.get("tissue", 0.0)
        timings["plan"] = prepared.timings.get("plan", 0.0)
        grid, slide = prepared.grid, prepared.slide
        classes = list(self.head.meta.classes)
        total = len(grid.coords)
        try:
            if total:
                t = time.perf_counter()
                stage = ModelStage(self.chosen, self.head_runner, self.tile_size, self.preset.mean, self.preset.std)
                done = 0

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    if progress:
                        progress(done, total)

                probs, stage_seconds = run_streaming(slide, grid, stage, batch_size=self.batch_size,
                                                     num_workers=self.num_workers, progress=advance,
                                                     prefetcher=prepared.prefetcher)
                timings.update(stage_seconds)
                timings["scoring_wall"] = time.perf_counter() - t
            else:
                probs = np.zeros((0, len(classes)), np.float32)
            slide_info = slide.info.to_dict()
        finally:
            prepared.close()

        preset, backbone, head = self.preset, self.backbone, self.head
        provenance = {
            "slide": str(prepared.path), "model": preset.name, "weights_hash": backbone.weights_hash,
            "head_sha256": head.sha256, "pooling": head.meta.pooling,
            "tile_size": self.tile_size, "target_mpp": self.target_mpp,
        }
        table = tiles_table(grid.coords, grid.size_level0, grid.tissue_fraction, probs, classes, provenance)
        scores = aggregate_scores(probs, classes, self.top_k)
        summary = {
            "schema": "jwth-engine/slide-summary/v1",
            "status": "scored" if total else "no_tissue",
            "slide": {**slide_info, "name": name, "mpp_used": prepared.slide_mpp,
                      "mpp_overridden": prepared.mpp_override is not None},
            "classes": classes,
            "scores": scores if total else "no tissue",
            "prediction": max(classes, key=lambda c: scores[c]["mean"]) if total else None,
            "tiles": {
                "scored": total, "candidates": grid.num_candidates, "min_tissue": self.min_tissue,
                "tile_size": self.tile_size, "target_mpp": self.target_mpp, "read_level": grid.level,
                "read_size": grid.read_size, "size_level0": list(grid.size_level0),
                "tissue_fraction_of_thumbnail": float(prepared.tissue.mask.mean()),
            },
            "model": {"preset": preset.name, "timm_arch": preset.timm_arch,
                      "weights_hash": backbone.weights_hash, "weights_source": backbone.weights_source,
                      "random_init": backbone.random_init},
            "head": {"pooling": head.meta.pooling, "num_heads": head.meta.num_heads,
                     "sha256": head.sha256, "source": head.source,
                     "random_init": head.meta.random_init,
                     "kernel": getattr(self.head_runner, "kernel_name", type(self.head_runner).__name__)},
            "backend": self.chosen.describe(),
            "settings": {"batch_size": self.batch_size, "num_workers": self.num_workers, "top_k": self.top_k,
                         "device": str(self.chosen.device), "reader": slide_info.get("reader")},
            "notes": list(self.notes),
            "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        t = time.perf_counter()
        remove_stale_temps(out_dir)
        tiles_path, summary_path = output_paths(out_dir, name)
        write_tiles_parquet(table, tiles_path)
        summary["outputs"] = {"tiles_parquet": tiles_path.name, "tiles_parquet_sha256": sha256_file(tiles_path)}
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        summary["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        wall = timings.get("scoring_wall")
        summary["throughput"] = {"tiles_per_s": round(total / wall, 2) if total and wall else None}
        write_summary_json(summary, summary_path)
        return summary

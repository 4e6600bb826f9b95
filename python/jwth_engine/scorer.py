"""The scoring steps shared by `score`, `screen` and `bench`, split where a long-lived worker needs:

    load_scoring_model   preset + weights → backbone → backend, head (file or seeded random)  (once)
    SlideScorer.prepare  open → MPP → tissue → tile grid → start decoding (TilePrefetcher)    (per slide)
    SlideScorer.finish   backbone → head → aggregate → outputs                                (per slide)

A screening worker prepares the next slide while the current one is in the backbone; `score_slide`
(score.py) runs the same three steps once. Both therefore write identical files.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError

# The backend choice (and a TensorRT engine build, which takes minutes) is announced on this logger;
# the CLI shows it at the default verbosity.
backend_log = logging.getLogger("jwth_engine.backends")

DEFAULT_PRESET = "jwth_vitl14_reg4"
DEFAULT_CLASSES = ("negative", "positive")
SUMMARY_SCHEMA = "jwth-engine/slide-summary/v1"


@dataclass
class ScoreResult:
    summary: dict
    tiles: "object"                 # pyarrow.Table, one row per scored tile
    summary_path: Path | None
    tiles_path: Path | None


def output_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{name}.tiles.parquet", out / f"{name}.summary.json"


def check_out_dir(out: str | os.PathLike | None, *, create: bool = True) -> Path | None:
    """`out` as a usable output folder; with create=False it is only checked (a slide that turns
    out to be unreadable must leave nothing behind, not even the folder)."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a folder")
    if not create:
        check_creatable_dir(out)
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(out, os.W_OK):
        raise ConfigError(f"{out}: output folder is not writable")
    return out


def check_creatable_dir(out: Path) -> None:
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{out}: cannot create output folder ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: output folder is not writable" if existing == out
                          else f"{out}: cannot create output folder ({existing} is not writable)")


def check_options(*, batch_size: int, min_tissue: float, top_k: int) -> None:
    """Option checks that need nothing loaded, so a typo fails before a slide or model is touched."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"--min-tissue must be within [0, 1], got {min_tissue}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")


def open_for_scoring(path: str | os.PathLike, *, reader: str = "auto", mpp: float | None = None):
    """(slide, level-0 µm/px used): the checks that depend only on the file, cheap and first."""
    from .slide import open_slide, resolve_mpp

    slide = open_slide(path, reader=reader)
    try:
        return slide, resolve_mpp(slide.info, mpp)
    except BaseException:
        slide.close()
        raise


# --- model: loaded once --------------------------------------------------------------------------

@dataclass
class ScoringModel:
    """Backbone behind its backend, plus the head that turns its tokens into class probabilities."""

    preset: object
    backbone: object
    head: object                     # heads.LoadedHead
    backend: object                  # backends.Backend
    head_runner: object              # native kernel runner (or the reference when unavailable)
    tile_size: int
    target_mpp: float
    notes: list = field(default_factory=list)
    load_seconds: float = 0.0

    def stage(self):
        from .pipeline import ModelStage

        return ModelStage(self.backend, self.head_runner, self.tile_size, self.preset.mean, self.preset.std)


def load_scoring_model(*, model: str | None = None, weights: str | None = None, head: str | None = None,
                       pooling: str | None = None, device: str = "auto", backend: str = "auto",
                       precision: str = "auto", batch_size: int = 32, tile_size: int | None = None,
                       target_mpp: float | None = None, seed: int = 0, compile: bool | None = None,
                       announce: Callable[[str], None] | None = None) -> ScoringModel:
    """Head file (or a seeded random head), preset, weights, backend; every problem a ConfigError,
    ModelError or BackendUnavailable with one line. Warnings (random weights or head) are kept in
    `notes` for the summary and logged."""
    from .backends import select_backend
    from .heads import check_head_matches_backbone, load_head, random_head
    from .heads.native import make_head_runner
    from .models import get_preset, load_backbone

    t = time.perf_counter()
    notes: list[str] = []
    loaded_head = load_head(head) if head else None
    if loaded_head is not None and pooling and pooling != loaded_head.meta.pooling:
        raise ConfigError(f"{head}: head file is a {loaded_head.meta.pooling} head but --pooling {pooling} was given")
    preset = get_preset(model or (loaded_head.meta.backbone_preset if loaded_head else DEFAULT_PRESET))
    tile_size = tile_size or (loaded_head.meta.tile_size if loaded_head else preset.input_size)
    target_mpp = target_mpp or (loaded_head.meta.target_mpp if loaded_head else preset.native_mpp)
    if tile_size != preset.input_size:
        # The backbone's position embedding (and an exported engine) is fixed to its input size.
        raise ConfigError(f"--tile-size {tile_size} does not match preset {preset.name}'s input size "
                          f"{preset.input_size}; use --tile-size {preset.input_size} or a preset of that size")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = load_backbone(preset.name, weights, seed=seed)
        if loaded_head is None:
            loaded_head = random_head(
                pooling or "jwth", dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                classes=list(DEFAULT_CLASSES), num_heads=math.gcd(backbone.embed_dim, 8),
                backbone_preset=preset.name, backbone_weights_hash=backbone.weights_hash,
                tile_size=tile_size, target_mpp=target_mpp, seed=seed,
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
    chosen = select_backend(backbone, backend=backend, device=device, precision=precision,
                            max_batch=batch_size, compile=compile, log=announce or backend_log.info)
    runner = make_head_runner(loaded_head.module).to(chosen.device)
    return ScoringModel(preset, backbone, loaded_head, chosen, runner, tile_size, target_mpp, notes,
                        time.perf_counter() - t)


# --- slides: prepared ahead, then finished --------------------------------------------------------

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
    """`score_slide` with the model loaded once: `prepare(path)` then `finish(prepared, out, name)`."""

    def __init__(self, *, model=None, weights=None, head=None, pooling=None, device="auto", backend="auto",
                 precision="auto", batch_size=32, mpp=None, tile_size=None, target_mpp=None, min_tissue=0.25,
                 top_k=16, num_workers=2, reader="auto", seed=0, compile=None):
        check_options(batch_size=batch_size, min_tissue=min_tissue, top_k=top_k)
        self.model = load_scoring_model(model=model, weights=weights, head=head, pooling=pooling, device=device,
                                        backend=backend, precision=precision, batch_size=batch_size,
                                        tile_size=tile_size, target_mpp=target_mpp, seed=seed, compile=compile)
        self.batch_size, self.min_tissue, self.top_k = batch_size, min_tissue, top_k
        self.num_workers, self.reader, self.mpp = num_workers, reader, mpp
        self._load_charged = False

    @property
    def device(self):
        return self.model.backend.device

    def prepare(self, path: str | os.PathLike, mpp: float | None = None, *, opened=None) -> PreparedSlide:
        """Open the slide (or take `opened` = open_for_scoring's result), find its tissue, plan its
        tiles and start decoding them in a thread."""
        from .pipeline import TilePrefetcher
        from .tiling import plan_tiles
        from .tissue import detect_tissue

        mpp = self.mpp if mpp is None else mpp
        timings = {}
        t = time.perf_counter()
        slide, slide_mpp = opened or open_for_scoring(path, reader=self.reader, mpp=mpp)
        timings["open"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            tissue = detect_tissue(slide, mpp=slide_mpp)
            timings["tissue"] = time.perf_counter() - t
            t = time.perf_counter()
            grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=self.model.target_mpp,
                              tile_size=self.model.tile_size, tissue=tissue, min_tissue=self.min_tissue)
            timings["plan"] = time.perf_counter() - t
            prefetcher = None
            if len(grid.coords):
                prefetcher = TilePrefetcher(slide, grid, batch_size=self.batch_size, num_workers=self.num_workers,
                                            pin_memory=self.device.type == "cuda").start()
        except BaseException:
            slide.close()
            raise
        return PreparedSlide(str(path), mpp, slide, slide_mpp, tissue, grid, prefetcher, timings)

    def finish(self, prepared: PreparedSlide, *, out: str | os.PathLike | None, name: str,
               progress: Callable[[int, int], None] | None = None, started: float | None = None) -> ScoreResult:
        """Score the prepared slide; with `out`, commit `<name>.tiles.parquet` and `<name>.summary.json`
        there as one unit (outputs.SlideOutputWriter: a summary on disk means the slide finished)."""
        from .outputs import (SlideOutputWriter, aggregate_scores, package_versions, recover_slide_outputs,
                              remove_stale_temps, tiles_table)
        from .pipeline import PipelineStats, run_streaming

        t_start = started or time.perf_counter()
        out_dir = check_out_dir(out)
        if out_dir is not None:
            # A run of this slide killed while committing its outputs is finished first, so that a
            # failure of this one leaves a consistent pair on disk (see outputs/slide_outputs.py).
            note = recover_slide_outputs(out_dir, name)
            if note:
                logging.getLogger("jwth_engine").info("%s", note)
        timings = {"open": prepared.timings.get("open", 0.0),
                   "model_load": 0.0 if self._load_charged else self.model.load_seconds,
                   "tissue": prepared.timings.get("tissue", 0.0), "plan": prepared.timings.get("plan", 0.0)}
        self._load_charged = True
        model, grid = self.model, prepared.grid
        classes = list(model.head.meta.classes)
        total = len(grid.coords)
        stats = PipelineStats()
        try:
            if total:
                t = time.perf_counter()
                done = 0

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    if progress:
                        progress(done, total)

                probs, stage_seconds = run_streaming(prepared.slide, grid, model.stage(), batch_size=self.batch_size,
                                                     num_workers=self.num_workers, progress=advance,
                                                     prefetcher=prepared.prefetcher, stats=stats)
                timings.update(stage_seconds)
                timings["scoring_wall"] = time.perf_counter() - t
            else:
                probs = np.zeros((0, len(classes)), np.float32)
            slide_info = prepared.slide.info.to_dict()
        finally:
            prepared.close()

        preset, backbone, head = model.preset, model.backbone, model.head
        provenance = {
            "slide": prepared.path, "model": preset.name, "weights_hash": backbone.weights_hash,
            "head_sha256": head.sha256, "pooling": head.meta.pooling,
            "tile_size": model.tile_size, "target_mpp": model.target_mpp,
        }
        table = tiles_table(grid.coords, grid.size_level0, grid.tissue_fraction, probs, classes, provenance)
        scores = aggregate_scores(probs, classes, self.top_k)
        summary = {
            "schema": SUMMARY_SCHEMA,
            "status": "scored" if total else "no_tissue",
            "slide": {**slide_info, "name": name, "mpp_used": prepared.slide_mpp,
                      "mpp_overridden": prepared.mpp_override is not None},
            "classes": classes,
            "scores": scores if total else "no tissue",
            "prediction": max(classes, key=lambda c: scores[c]["mean"]) if total else None,
            "tiles": {
                "scored": total, "candidates": grid.num_candidates, "min_tissue": self.min_tissue,
                "tile_size": model.tile_size, "target_mpp": model.target_mpp, "read_level": grid.level,
                "read_size": grid.read_size, "size_level0": list(grid.size_level0),
                "tissue_fraction_of_thumbnail": float(prepared.tissue.mask.mean()),
            },
            "model": {"preset": preset.name, "timm_arch": preset.timm_arch,
                      "weights_hash": backbone.weights_hash, "weights_source": backbone.weights_source,
                      "random_init": backbone.random_init},
            "head": {"pooling": head.meta.pooling, "num_heads": head.meta.num_heads,
                     "sha256": head.sha256, "source": head.source, "random_init": head.meta.random_init,
                     "kernel": getattr(model.head_runner, "kernel_name", type(model.head_runner).__name__)},
            "backend": model.backend.describe(),
            "settings": {"batch_size": self.batch_size, "num_workers": self.num_workers, "top_k": self.top_k,
                         "device": str(self.device), "reader": slide_info.get("reader")},
            "pipeline": stats.to_dict() if total else None,
            "notes": list(model.notes),
            "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

        tiles_path = summary_path = None
        if out_dir is not None:
            t = time.perf_counter()
            remove_stale_temps(out_dir)
            writer = SlideOutputWriter(out_dir, name)
            tiles_path, summary_path = writer.tiles_path, writer.summary_path
            summary["outputs"] = writer.write_tiles(table)
            timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        summary["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        wall = timings.get("scoring_wall")
        summary["throughput"] = {"tiles_per_s": round(total / wall, 2) if total and wall else None}
        if summary_path is not None:
            writer.commit(summary)
        return ScoreResult(summary, table, summary_path, tiles_path)

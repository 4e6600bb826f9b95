"""The per-slide steps, split where a long-lived worker needs them:

    SlideScorer.prepare  open -> MPP -> tissue -> tile grid -> start decoding (TilePrefetcher)
    SlideScorer.finish   backbone -> head -> aggregate -> outputs

A screening worker prepares the next slide while the current one is in the backbone; `score_slide`
(api.py) runs the same steps once. Both therefore write identical files.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import RunConfig
from ..errors import ConfigError
from ..outputs import (SlideOutputWriter, aggregate_scores, build_summary, recover_slide_outputs,
                       remove_stale_temps, tiles_table)
from ..pipeline import PipelineStats, TilePrefetcher, run_streaming
from ..runtime import library_versions
from ..slide import open_slide, resolve_mpp
from ..slide.decoding import reader_for, resolve_decode
from ..tiling import plan_tiles
from ..tissue import detect_tissue
from .model import ScoringModel, load_scoring_model
from .visuals import VisualOptions, VisualStep

log = logging.getLogger("jwth_engine")


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
    """The output folder, created; the one check of it (`out` None: nothing is written). With
    create=False it is only checked: a slide that turns out to be unreadable must leave nothing
    behind, not even the folder."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: out exists and is not a folder", field="out")
    if not create:
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            raise ConfigError(f"{out}: cannot create output folder ({existing} is not a folder)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{out}: output folder is not writable" if existing == out
                              else f"{out}: cannot create output folder ({existing} is not writable)")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(out, os.W_OK):
        raise ConfigError(f"{out}: output folder is not writable")
    return out


def open_for_scoring(path: str | os.PathLike, config: RunConfig, mpp: float | None = None):
    """(slide, level-0 µm/px used): the checks that depend only on the file, cheap and first.
    `mpp` (a manifest's value for this slide) overrides the configuration's."""
    slide = open_slide(path, reader=reader_for(config.tiling.decode, config.tiling.reader))
    try:
        return slide, resolve_mpp(slide.info, config.tiling.mpp if mpp is None else mpp)
    except BaseException:
        slide.close()
        raise


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

    def __init__(self, config: RunConfig | None = None, *, scoring_model: ScoringModel | None = None, **kwargs):
        self.config = RunConfig.given(config, kwargs)
        config = self.config
        reader_for(config.tiling.decode, config.tiling.reader)   # a contradiction fails before the model loads
        self.model = scoring_model or load_scoring_model(config)
        self.decode_request = resolve_decode(config.tiling.decode, self.model.backend.device)
        self._load_charged = False

    @property
    def device(self):
        return self.model.backend.device

    def prepare(self, path: str | os.PathLike, mpp: float | None = None, *, opened=None, plan=None) -> PreparedSlide:
        """Open the slide (or take `opened` = open_for_scoring's result), find its tissue, plan its
        tiles and start decoding them in a thread. `mpp` overrides the configuration's;
        `plan(slide, slide_mpp=, tissue=)` replaces our tiling (embed --coords: another tool's tiles)."""
        mpp = self.config.tiling.mpp if mpp is None else mpp
        runtime = self.config.runtime
        timings = {}
        t = time.perf_counter()
        slide, slide_mpp = opened or open_for_scoring(path, self.config, mpp)
        timings["open"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            tissue = detect_tissue(slide, mpp=slide_mpp)
            timings["tissue"] = time.perf_counter() - t
            t = time.perf_counter()
            if plan is None:
                grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=self.model.target_mpp,
                                  tile_size=self.model.tile_size, tissue=tissue,
                                  min_tissue=self.config.tiling.min_tissue)
            else:
                grid = plan(slide, slide_mpp=slide_mpp, tissue=tissue)
            timings["plan"] = time.perf_counter() - t
            prefetcher = None
            if len(grid.coords):
                prefetcher = TilePrefetcher(slide, grid, batch_size=runtime.batch_size,
                                            num_workers=runtime.num_workers,
                                            pin_memory=self.device.type == "cuda", decode=self.decode_request,
                                            device=self.device).start()
        except BaseException:
            slide.close()
            raise
        return PreparedSlide(str(path), mpp, slide, slide_mpp, tissue, grid, prefetcher, timings)

    def finish(self, prepared: PreparedSlide, *, out: str | os.PathLike | None, name: str,
               progress: Callable[[int, int], None] | None = None, started: float | None = None,
               observers=(), need_attn: bool = False, need_pooled: bool = False,
               annotate: Callable[[object, dict], object] | None = None,
               visuals: VisualOptions | None = None) -> ScoreResult:
        """Score the prepared slide; with `out`, commit `<name>.tiles.parquet` and `<name>.summary.json`
        there as one unit (outputs.SlideOutputWriter: a summary on disk means the slide finished).
        `observers` see every batch's tokens and head output (embeddings, attention maps; see
        pipeline/stages.py); `annotate(table, summary) -> table` adds what they produced before
        anything is written. `visuals` adds the heat map, GeoJSON, attention and report files
        (scoring/visuals.py)."""
        t_start = started or time.perf_counter()
        try:
            step = VisualStep(visuals, self.model) if visuals is not None and visuals.wanted else None
        except BaseException:
            prepared.close()
            raise
        if step is not None:
            observers, need_attn = (*observers, *step.observers), need_attn or step.need_attn
        out_dir = check_out_dir(out)
        if out_dir is not None:
            # A run of this slide killed while committing its outputs is finished first, so that a
            # failure of this one leaves a consistent pair on disk (see outputs/slide_outputs.py).
            note = recover_slide_outputs(out_dir, name)
            if note:
                log.info("%s", note)
        timings = {"open": prepared.timings.get("open", 0.0),
                   "model_load": 0.0 if self._load_charged else self.model.load_seconds,
                   "tissue": prepared.timings.get("tissue", 0.0), "plan": prepared.timings.get("plan", 0.0)}
        self._load_charged = True
        model, grid, runtime = self.model, prepared.grid, self.config.runtime
        classes = list(model.head.meta.classes)
        total = len(grid.coords)
        stats = PipelineStats()
        try:
            if step is not None and out_dir is not None:
                step.begin(prepared, name, overlap=self.device.type == "cuda")
            if total:
                t = time.perf_counter()
                done = 0

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    if progress:
                        progress(done, total)

                probs, stage_seconds = run_streaming(prepared.slide, grid,
                                                     model.stage(observers, need_attn=need_attn, need_pooled=need_pooled),
                                                     batch_size=runtime.batch_size,
                                                     num_workers=runtime.num_workers, progress=advance,
                                                     prefetcher=prepared.prefetcher, stats=stats)
                timings.update(stage_seconds)
                timings["scoring_wall"] = time.perf_counter() - t
            else:
                probs = np.zeros((0, len(classes)), np.float32)
            slide_info = prepared.slide.info.to_dict()
            if step is not None and out_dir is not None:
                step.capture(prepared, probs, name)     # needs the slide open: thumbnail, chosen tiles
        finally:
            if step is not None:
                step.settle()                           # its thread may be reading the slide
            prepared.close()

        preset, backbone, head = model.preset, model.backbone, model.head
        provenance = {
            "slide": prepared.path, "model": preset.name, "weights_hash": backbone.weights_hash,
            "head_sha256": head.sha256, "pooling": head.meta.pooling,
            "tile_size": model.tile_size, "target_mpp": model.target_mpp,
        }
        table = tiles_table(grid.coords, grid.size_level0, grid.tissue_fraction, probs, classes, provenance)
        summary = build_summary(
            name=name, slide_info=slide_info, slide_mpp=prepared.slide_mpp,
            mpp_overridden=prepared.mpp_override is not None, classes=classes,
            scores=aggregate_scores(probs, classes, self.config.aggregation.top_k), grid=grid,
            tissue_fraction=float(prepared.tissue.mask.mean()), preset=preset, backbone=backbone, head=head,
            head_kernel=getattr(model.head_runner, "kernel_name", type(model.head_runner).__name__),
            backend=model.backend.describe(), device=str(self.device),
            pipeline=stats.to_dict() if total else None, notes=model.notes, versions=library_versions(),
            config=self.config,
        )
        # Who read the slide, who decoded the tiles the model saw, and why each.
        summary["reader"] = {"slide_reader": slide_info.get("reader"), "slide_reader_why": slide_info.get("reader_note"),
                             **(stats.decoder if total else {"decoder": None, "why": "no tiles to decode",
                                                             "test_tile": None})}

        if annotate is not None:
            table = annotate(table, summary)
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
        if step is not None and out_dir is not None:
            summary["outputs"].update(step.write(out_dir, name, summary, prepared))
        if summary_path is not None:
            writer.commit(summary)
        return ScoreResult(summary, table, summary_path, tiles_path)

"""`score_slide`: the Python API behind `jwth-engine score`.

Cheap checks that depend only on the input (settings, file readable, MPP known, output folder
usable, not yet created) run before the model is loaded, so a bad slide fails in well under a
second and leaves nothing behind. Outputs are written only after every tile is scored, committed
as one unit (outputs/slide_outputs.py): a summary on disk means the run finished.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..heads.slide_io import load_slide_head
from .slide_head import SlideHeadRunner
from .slide import ScoreResult, SlideScorer, check_out_dir, open_for_scoring
from .visuals import VisualOptions, check_against_model, check_visual_options


def score_slide(path: str | os.PathLike, *, config: RunConfig | None = None, out: str | os.PathLike | None = None,
                name: str | None = None, progress: Callable[[int, int], None] | None = None,
                slide_head: str | None = None, visuals: VisualOptions | None = None, **settings) -> ScoreResult:
    """Score a slide; returns the summary dict and the per-tile table (and writes them to `out`).

    Settings come either as `config` (a RunConfig) or as keyword arguments named like its fields
    (`model=`, `weights=`, `head=`, `batch_size=`, `min_tissue=`, ...; see jwth_engine.config).
    `out` (default: the config's `out`) is the folder written to; None writes nothing.
    `progress(done, total)` is called after every batch. Raises `JwthError` subclasses with
    one-line messages for every input problem. `slide_head` (a fit-slide-head file) reduces the
    slide's tile vectors, collected during the same pass, to a slide prediction (embed/slide_head.py).
    `visuals` asks for the heat map, GeoJSON, attention maps and HTML report (scoring/visuals.py).
    """
    started = time.perf_counter()
    config = RunConfig.given(config, settings)
    if slide_head:
        slide_head = load_slide_head(slide_head)    # a wrong file fails before the slide or model
    if visuals is not None:
        check_visual_options(visuals)
    # `out` is where this call writes, not a setting of the run: it stays out of the recorded config.
    out_dir = check_out_dir(config.output.out if out is None else out, create=False)
    t_open = time.perf_counter()
    opened = open_for_scoring(path, config)
    t_open = time.perf_counter() - t_open
    try:
        scorer = SlideScorer(config)
        runner = SlideHeadRunner(slide_head, scorer.model) if slide_head else None
        if visuals is not None:
            check_against_model(visuals, scorer.model)   # before any tile is read or file written
        prepared = scorer.prepare(path, opened=opened)
        prepared.timings["open"] = t_open    # opened before the model was loaded, to fail fast
    except BaseException:
        opened[0].close()
        raise
    extra = {"visuals": visuals}
    if runner is not None:
        extra.update(observers=[runner.observer(len(prepared.grid))], need_pooled=runner.need_pooled,
                     annotate=runner.annotate)
    return scorer.finish(prepared, out=out_dir, name=name or Path(path).name.rsplit(".", 1)[0],
                         progress=progress, started=started, **extra)

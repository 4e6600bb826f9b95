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
from ..errors import ConfigError
from .slide import ScoreResult, SlideScorer, check_out_dir, open_for_scoring


def score_slide(path: str | os.PathLike, *, config: RunConfig | None = None, out: str | os.PathLike | None = None,
                name: str | None = None, progress: Callable[[int, int], None] | None = None,
                **settings) -> ScoreResult:
    """Score a slide; returns the summary dict and the per-tile table (and writes them to `out`).

    Settings come either as `config` (a RunConfig) or as keyword arguments named like its fields
    (`model=`, `weights=`, `head=`, `batch_size=`, `min_tissue=`, ...; see jwth_engine.config).
    `out` (default: the config's `out`) is the folder written to; None writes nothing.
    `progress(done, total)` is called after every batch. Raises `JwthError` subclasses with
    one-line messages for every input problem.
    """
    started = time.perf_counter()
    if config is None:
        config = RunConfig.from_kwargs(**settings)
    elif settings:
        raise ConfigError(f"pass either config or settings, not both (got {', '.join(sorted(settings))})")
    # `out` is where this call writes, not a setting of the run: it stays out of the recorded config.
    out_dir = check_out_dir(config.output.out if out is None else out, create=False)
    t_open = time.perf_counter()
    opened = open_for_scoring(path, config)
    t_open = time.perf_counter() - t_open
    try:
        scorer = SlideScorer(config)
        prepared = scorer.prepare(path, opened=opened)
        prepared.timings["open"] = t_open    # opened before the model was loaded, to fail fast
    except BaseException:
        opened[0].close()
        raise
    return scorer.finish(prepared, out=out_dir, name=name or Path(path).name.rsplit(".", 1)[0],
                         progress=progress, started=started)

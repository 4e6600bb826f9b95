"""Score one slide end to end: slide → tissue → tiles → backbone → head → aggregate → outputs.

`score_slide` is the Python API behind `jwth-engine score`. Cheap checks that depend only on the
input (options, file readable, MPP known, output folder usable) run before the model is loaded, so
a bad slide fails in well under a second. The steps themselves live in scorer.py, shared with
`screen`; outputs are written only after every tile is scored, each atomically, Parquet first and
the summary JSON last: a summary on disk means the run finished.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from .scorer import (DEFAULT_CLASSES, DEFAULT_PRESET, ScoreResult, SlideScorer, check_options, check_out_dir,
                     open_for_scoring, output_paths)

__all__ = ["score_slide", "ScoreResult", "output_paths", "DEFAULT_PRESET", "DEFAULT_CLASSES"]


def score_slide(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    weights: str | None = None,
    head: str | None = None,
    pooling: str | None = None,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    mpp: float | None = None,
    tile_size: int | None = None,
    target_mpp: float | None = None,
    min_tissue: float = 0.25,
    top_k: int = 16,
    num_workers: int = 2,
    reader: str = "auto",
    seed: int = 0,
    compile: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Score a slide; returns the summary dict and the per-tile table (and writes them to `out`).

    `progress(done, total)` is called after every batch. Raises `JwthError` subclasses with
    one-line messages for every input problem.
    """
    started = time.perf_counter()
    check_options(batch_size=batch_size, min_tissue=min_tissue, top_k=top_k)
    out_dir = check_out_dir(out, create=False)
    t_open = time.perf_counter()
    opened = open_for_scoring(path, reader=reader, mpp=mpp)
    t_open = time.perf_counter() - t_open
    try:
        scorer = SlideScorer(model=model, weights=weights, head=head, pooling=pooling, device=device,
                             backend=backend, precision=precision, batch_size=batch_size, mpp=mpp,
                             tile_size=tile_size, target_mpp=target_mpp, min_tissue=min_tissue, top_k=top_k,
                             num_workers=num_workers, reader=reader, seed=seed, compile=compile)
        prepared = scorer.prepare(path, mpp, opened=opened)
        prepared.timings["open"] = t_open    # opened before the model was loaded, to fail fast
    except BaseException:
        opened[0].close()
        raise
    return scorer.finish(prepared, out=out_dir, name=name or Path(path).name.rsplit(".", 1)[0],
                         progress=progress, started=started)

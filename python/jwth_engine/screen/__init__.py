"""Bulk screening: many slides, one resumable ledger, crash-isolated workers, local or on Ray.

    >>> from jwth_engine.config import RunConfig
    >>> from jwth_engine.screen import run_screen
    >>> report = run_screen("slides/", "screen-out", RunConfig.from_kwargs(model="jwth_vits14_reg4"))

Modules, one job each: `sources` (folder / manifest → slide ids), `config` (the identity of a run's
configuration: what must not change within one output folder), `ledger` (SQLite state), `layout` (the output folder and its atomic
moves), `worker` + `process` (one worker process, both sides; the worker scores with
`jwth_engine.scoring.SlideScorer`, model loaded once, next slide prepared ahead), `local` (a pool of workers),
`ray_runner` (the same workers as Ray actors), `run` (the driver), `results` (summary tables),
`progress` and `status` (what the user sees), `gpus` (counting GPUs without touching CUDA here).
"""

from .run import ScreenAborted, ScreenReport, run_screen

__all__ = ["ScreenAborted", "ScreenReport", "run_screen"]

"""`embed`: the scoring pipeline with a feature observer that streams tile vectors into HDF5 files.

Output layout under `--out DIR`, one file per slide and feature kind (TRIDENT's layout, see
outputs/features_h5.py):

    DIR/features_<model>/<slide>.h5          kind `cls` (TRIDENT's own folder name for an encoder)
    DIR/features_<model>_<kind>/<slide>.h5   every other kind (`mean`, `cls+mean`, `jwth`)
    ....parquet next to each .h5 with --parquet: the same rows (x, y, width, height,
                                               tissue_fraction, features as a float32 list column)

Several kinds are one pass over the slide (one file each, so every file keeps TRIDENT's two-dataset
layout that readers index by name). The h5 files are built under temp names while the slide
streams, one slice write per batch, and renamed when the last batch is in, before the slide's
summary is written; bulk runs (`embed FOLDER|MANIFEST`) go through `screen`'s resumable ledger
with `EmbedJob` as the worker's job, so DIR also holds `ledger.sqlite`, `slides/<id>/` (the tile
table and summary `score` writes, with the features recorded in it) and `summary.csv`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import RunConfig
from ..errors import ConfigError
from ..outputs.atomic import atomic_path, remove_stale_temps, sha256_file
from ..outputs.features_h5 import FeaturesH5Writer, read_features_h5
from ..scoring import ScoreResult, SlideScorer, check_out_dir, open_for_scoring
from ..screen.protocol import Outcome, Task
from .coords import coords_file_for, grid_from_coords, read_coords_file
from ..pipeline.features import FeatureObserver, kind_dim, parse_kinds

EMBED_JOB = "jwth_engine.embed.run:EmbedJob"


def features_dir(out: str | os.PathLike, model: str, kind: str) -> Path:
    return Path(out) / (f"features_{model}" if kind == "cls" else f"features_{model}_{kind}")


def features_path(out: str | os.PathLike, model: str, kind: str, name: str) -> Path:
    return features_dir(out, model, kind) / f"{name}.h5"


@dataclass(frozen=True)
class EmbedSettings:
    """What `embed` adds to a run's configuration; part of a bulk run's identity (a folder embedded
    as `cls` is not complete for `cls,mean`)."""

    features: tuple = ("cls",)
    out: str = ""                     # DIR of the layout above
    coords: str | None = None         # a TRIDENT/CLAM coordinates file, or a folder of them
    parquet: bool = False

    def identity(self) -> dict:
        return {"features": ",".join(self.features), "coords": self.coords, "parquet": self.parquet}

    def to_dict(self) -> dict:
        return {"features": list(self.features), "out": self.out, "coords": self.coords, "parquet": self.parquet}


def check_embed_options(kinds, head: str | None) -> tuple[str, ...]:
    kinds = parse_kinds(kinds)
    if "jwth" in kinds and not head:
        raise ConfigError("--features jwth is the pooled vector of a trained tile head: pass --head "
                          "(a random head's pooled vector means nothing)")
    return kinds


def coords_plan(coords: str | None, slide_id: str, tile_size: int):
    """The `plan` for SlideScorer.prepare that tiles with `--coords`, or None for our own tiling."""
    if coords is None:
        return None
    ext = read_coords_file(coords_file_for(coords, slide_id))

    def plan(slide, *, slide_mpp, tissue):
        return grid_from_coords(ext, slide, slide_mpp=slide_mpp, tile_size=tile_size, tissue=tissue)
    return plan


def _attrs(scorer: SlideScorer, prepared, name: str, kind: str, coords_source: str | None) -> dict:
    model, grid, info = scorer.model, prepared.grid, prepared.slide.info
    w0, h0 = info.level_dimensions[0]
    # Magnification by the usual convention 10 µm / (µm/px): 0.25 µm/px is "40x".
    return {
        "patch_size": int(model.tile_size),
        "patch_size_level0": int(grid.size_level0[0]),
        "level0_magnification": round(10.0 / prepared.slide_mpp, 3),
        "target_magnification": round(10.0 / grid.target_mpp, 3),
        "overlap": 0,
        "name": name,
        "level0_width": int(w0),
        "level0_height": int(h0),
        "encoder": model.preset.name,
        "feature_kind": kind,
        "encoder_weights_hash": model.backbone.weights_hash,
        "encoder_random_init": bool(model.backbone.random_init),
        "tile_head_sha256": model.head.sha256 if kind == "jwth" else "None",
        "mpp": float(prepared.slide_mpp),
        "target_mpp": float(grid.target_mpp),
        "read_level": int(grid.level),
        "read_size": int(grid.read_size),
        "coords_source": coords_source or "jwth-engine tiling",
        "producer": "jwth-engine embed",
    }


def write_features_parquet(h5_path: Path, dest: Path, tissue_fraction: np.ndarray, size_level0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_features_h5(h5_path)
    n, dim = data.features.shape
    flat = pa.array(data.features.reshape(-1), pa.float32())
    table = pa.table({
        "x": data.coords[:, 0], "y": data.coords[:, 1],
        "width": np.full(n, size_level0[0], np.int64), "height": np.full(n, size_level0[1], np.int64),
        "tissue_fraction": np.asarray(tissue_fraction, np.float32),
        "features": pa.FixedSizeListArray.from_arrays(flat, dim),
    })
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@dataclass
class EmbedResult:
    score: ScoreResult
    features: dict = field(default_factory=dict)     # kind -> h5 path

    @property
    def num_tiles(self) -> int:
        return int(self.score.summary["tiles"]["scored"])


def embed_prepared(scorer: SlideScorer, prepared, *, out: str | os.PathLike, name: str, kinds,
                   parquet: bool = False, score_out: str | os.PathLike | None = None,
                   coords_source: str | None = None, progress: Callable[[int, int], None] | None = None,
                   started: float | None = None) -> EmbedResult:
    """Run the prepared slide through the pipeline, writing `kinds` to `out`'s layout; with
    `score_out`, also `score`'s tile table and summary there (the features recorded in it)."""
    model, grid = scorer.model, prepared.grid
    n, dim = len(grid.coords), model.backbone.embed_dim
    writers: dict[str, FeaturesH5Writer] = {}
    try:
        for kind in kinds:
            folder = features_dir(out, model.preset.name, kind)
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder)
            writers[kind] = FeaturesH5Writer(folder / f"{name}.h5", n, kind_dim(kind, dim), grid.coords,
                                             _attrs(scorer, prepared, name, kind, coords_source))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        prepared.close()
        raise
    observer = FeatureObserver(kinds, model.backbone.num_prefix_tokens,
                               sink=lambda kind, first, rows: writers[kind].write(first, rows))
    paths: dict[str, Path] = {}

    def commit(table, summary):
        # Every batch is in: the feature files become visible before the summary that lists them.
        for kind, writer in writers.items():
            paths[kind] = writer.commit()
            if parquet:
                write_features_parquet(paths[kind], paths[kind].with_suffix(".parquet"),
                                       grid.tissue_fraction, grid.size_level0)
        summary["features"] = {kind: {"path": os.path.relpath(p, out), "rows": n,
                                      "dim": kind_dim(kind, dim)} for kind, p in paths.items()}
        if coords_source:
            summary["features"]["coords_source"] = coords_source
        return table

    try:
        result = scorer.finish(prepared, out=score_out, name=name, progress=progress, started=started,
                               observers=[observer], need_pooled=observer.need_pooled, annotate=commit)
    except BaseException:
        for kind, writer in writers.items():
            if kind not in paths:
                writer.abort()
        raise
    return EmbedResult(result, paths)


class EmbedJob:
    """The screen worker's job for bulk `embed` (see screen/worker.py): SlideScorer + features.
    Its options are the run's `RunConfig.to_dict()` plus an `embed` entry (EmbedSettings.to_dict())."""

    def __init__(self, options: dict):
        import torch

        options = dict(options)
        extra = options.pop("embed")
        self.kinds = tuple(extra["features"])
        self.out, self.coords, self.parquet = extra["out"], extra["coords"], extra["parquet"]
        self.scorer = SlideScorer(RunConfig.from_dict(options))
        self.info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": str(self.scorer.device), "load_s": round(self.scorer.model.load_seconds, 2)}

    def prepare(self, task: Task):
        plan = coords_plan(self.coords, task.slide_id, self.scorer.model.tile_size)
        return self.scorer.prepare(task.path, task.mpp, plan=plan)

    def discard(self, prepared) -> None:
        prepared.close()

    def run(self, task: Task, prepared, progress) -> Outcome:
        staging = Path(task.staging)
        staging.mkdir(parents=True, exist_ok=True)
        source = str(coords_file_for(self.coords, task.slide_id)) if self.coords else None
        result = embed_prepared(self.scorer, prepared, out=self.out, name=task.slide_id, kinds=self.kinds,
                                parquet=self.parquet, score_out=staging, coords_source=source, progress=progress)
        score = result.score
        return Outcome(score.summary, tiles_sha256=sha256_file(score.tiles_path),
                       summary_sha256=sha256_file(score.summary_path))


def embed_slide(path: str | os.PathLike, *, out: str | os.PathLike, features="cls", coords: str | None = None,
                parquet: bool = False, name: str | None = None, config: RunConfig | None = None,
                progress: Callable[[int, int], None] | None = None, **settings) -> EmbedResult:
    """Embed one slide into `out` (the Python API behind `jwth-engine embed SLIDE`); the run's
    settings come as `config` or as score_slide's keyword arguments (model=, weights=, device=, ...)."""
    started = time.perf_counter()
    if config is None:
        config = RunConfig.from_kwargs(**settings)
    elif settings:
        raise ConfigError(f"pass either config or settings, not both (got {', '.join(sorted(settings))})")
    kinds = check_embed_options(features, config.model.head)
    out = check_out_dir(out)
    name = name or Path(path).name.rsplit(".", 1)[0]
    source = str(coords_file_for(coords, name)) if coords else None
    if source:
        read_coords_file(source)        # a bad coordinates file fails before the model loads
    opened = open_for_scoring(path, config)
    try:
        scorer = SlideScorer(config)
        prepared = scorer.prepare(path, opened=opened, plan=coords_plan(source, name, scorer.model.tile_size))
    except BaseException:
        opened[0].close()
        raise
    return embed_prepared(scorer, prepared, out=out, name=name, kinds=kinds, parquet=parquet,
                          coords_source=source, progress=progress, started=started)

"""Score one slide end to end: slide → tissue → tiles → backbone → head → aggregate → outputs.

`score_slide` is the Python API behind `jwth-engine score`. Cheap checks that depend only on the
input (file readable, MPP known, output folder usable) run before the model is loaded, so a bad
slide fails in well under a second. Outputs are written only after every tile is scored, each
atomically, Parquet first and the summary JSON last: a summary on disk means the run finished.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError

log = logging.getLogger("jwth_engine")

DEFAULT_PRESET = "jwth_vitl14_reg4"
DEFAULT_CLASSES = ("negative", "positive")


@dataclass
class ScoreResult:
    summary: dict
    tiles: "object"                 # pyarrow.Table, one row per scored tile
    summary_path: Path | None
    tiles_path: Path | None


def output_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{name}.tiles.parquet", out / f"{name}.summary.json"


def _check_out_dir(out: str | os.PathLike | None) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(out, os.W_OK):
        raise ConfigError(f"{out}: output folder is not writable")
    return out


def _random_head_heads(dim: int, wanted: int = 8) -> int:
    return math.gcd(dim, wanted)


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
    from .heads import check_head_matches_backbone, load_head, random_head
    from .heads.native import make_head_runner
    from .models import get_preset, load_backbone
    from .backends import select_backend
    from .outputs import aggregate_scores, package_versions, remove_stale_temps, sha256_file
    from .outputs import tiles_table, write_summary_json, write_tiles_parquet
    from .pipeline import ModelStage, run_streaming
    from .slide import open_slide, resolve_mpp
    from .tiling import plan_tiles
    from .tissue import detect_tissue

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"--min-tissue must be within [0, 1], got {min_tissue}")
    out_dir = _check_out_dir(out)
    name = name or Path(path).name.rsplit(".", 1)[0]

    # --- slide (fails fast, before any model is loaded) -----------------------------------------
    t = time.perf_counter()
    slide = open_slide(path, reader=reader)
    try:
        slide_mpp = resolve_mpp(slide.info, mpp)
        timings["open"] = time.perf_counter() - t

        # --- head and backbone -------------------------------------------------------------------
        t = time.perf_counter()
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
                    classes=list(DEFAULT_CLASSES), num_heads=_random_head_heads(backbone.embed_dim),
                    backbone_preset=preset.name, backbone_weights_hash=backbone.weights_hash,
                    tile_size=tile_size, target_mpp=target_mpp, seed=seed,
                )
        for warning in caught:
            notes.append(str(warning.message))
            log.warning("%s", warning.message)
        notes += check_head_matches_backbone(
            loaded_head, preset=preset.name, dim=backbone.embed_dim,
            num_prefix_tokens=backbone.num_prefix_tokens, weights_hash=backbone.weights_hash,
        )
        chosen = select_backend(backbone, backend=backend, device=device, precision=precision,
                                max_batch=batch_size, compile=compile, log=log.info)
        head_runner = make_head_runner(loaded_head.module).to(chosen.device)
        timings["model_load"] = time.perf_counter() - t

        # --- tissue and tiles ----------------------------------------------------------------------
        t = time.perf_counter()
        tissue = detect_tissue(slide)
        timings["tissue"] = time.perf_counter() - t
        t = time.perf_counter()
        grid = plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=target_mpp, tile_size=tile_size,
                          tissue=tissue, min_tissue=min_tissue)
        timings["plan"] = time.perf_counter() - t

        # --- model --------------------------------------------------------------------------------
        classes = list(loaded_head.meta.classes)
        total = len(grid.coords)
        if total:
            stage = ModelStage(chosen, head_runner, tile_size, preset.mean, preset.std)
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(done, total)

            probs, stage_seconds = run_streaming(slide, grid, stage, batch_size=batch_size,
                                                 num_workers=num_workers, progress=advance)
            timings.update(stage_seconds)
            timings["scoring_wall"] = time.perf_counter() - t
        else:
            probs = np.zeros((0, len(classes)), np.float32)
        slide_info = slide.info.to_dict()
    finally:
        slide.close()

    # --- aggregate ---------------------------------------------------------------------------------
    provenance = {
        "slide": str(path), "model": preset.name, "weights_hash": backbone.weights_hash,
        "head_sha256": loaded_head.sha256, "pooling": loaded_head.meta.pooling,
        "tile_size": tile_size, "target_mpp": target_mpp,
    }
    table = tiles_table(grid.coords, grid.size_level0, grid.tissue_fraction, probs, classes, provenance)
    scores = aggregate_scores(probs, classes, top_k)
    status = "scored" if total else "no_tissue"
    summary = {
        "schema": "jwth-engine/slide-summary/v1",
        "status": status,
        "slide": {**slide_info, "name": name, "mpp_used": slide_mpp,
                  "mpp_overridden": mpp is not None},
        "classes": classes,
        "scores": scores if total else "no tissue",
        "prediction": max(classes, key=lambda c: scores[c]["mean"]) if total else None,
        "tiles": {
            "scored": total, "candidates": grid.num_candidates, "min_tissue": min_tissue,
            "tile_size": tile_size, "target_mpp": target_mpp, "read_level": grid.level,
            "read_size": grid.read_size, "size_level0": list(grid.size_level0),
            "tissue_fraction_of_thumbnail": float(tissue.mask.mean()),
        },
        "model": {"preset": preset.name, "timm_arch": preset.timm_arch,
                  "weights_hash": backbone.weights_hash, "weights_source": backbone.weights_source,
                  "random_init": backbone.random_init},
        "head": {"pooling": loaded_head.meta.pooling, "num_heads": loaded_head.meta.num_heads,
                 "sha256": loaded_head.sha256, "source": loaded_head.source,
                 "random_init": loaded_head.meta.random_init,
                 "kernel": getattr(head_runner, "kernel_name", type(head_runner).__name__)},
        "backend": chosen.describe(),
        "settings": {"batch_size": batch_size, "num_workers": num_workers, "top_k": top_k,
                     "device": str(chosen.device), "reader": slide_info.get("reader")},
        "notes": notes,
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    tiles_path = summary_path = None
    if out_dir is not None:
        t = time.perf_counter()
        remove_stale_temps(out_dir)
        tiles_path, summary_path = output_paths(out_dir, name)
        write_tiles_parquet(table, tiles_path)
        summary["outputs"] = {"tiles_parquet": tiles_path.name,
                              "tiles_parquet_sha256": sha256_file(tiles_path)}
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    wall = timings.get("scoring_wall")
    summary["throughput"] = {"tiles_per_s": round(total / wall, 2) if total and wall else None}
    if summary_path is not None:
        write_summary_json(summary, summary_path)
    return ScoreResult(summary, table, summary_path, tiles_path)

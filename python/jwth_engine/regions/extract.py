"""One slide -> one region feature file: open, MPP, tissue, region plan, streaming embedding, atomic write.

Every check that can fail on the input (MPP, a magnification the slide cannot provide, a sequence
longer than the encoder takes) runs before the backbone sees a tile, and the output file appears
only complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..config import field_default
from ..errors import ConfigError
from .blocks import BlockSource
from .embed import RegionEmbedStats, embed_regions
from .encoder import MAX_SEQUENCE_LENGTH
from .io import SUFFIX, RegionFeatureWriter
from .planning import RegionLayout, RegionPlan, plan_regions


@dataclass
class ExtractResult:
    path: Path | None
    regions: int
    plan: RegionPlan
    stats: RegionEmbedStats
    timings: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)     # level -> which decoder read its blocks, and why


def check_layout(layout: RegionLayout, max_length: int = MAX_SEQUENCE_LENGTH) -> None:
    if layout.length > max_length:
        raise ConfigError(f"--region-tiles {layout.region_tiles} with {len(layout.magnifications)} magnifications makes "
                          f"{layout.length} tiles per region; the region encoder takes at most {max_length}")


def output_path(out_dir: str | os.PathLike, slide_path: str | os.PathLike) -> Path:
    return Path(out_dir) / (Path(slide_path).stem + SUFFIX)


def plan_slide(slide, slide_mpp: float, layout: RegionLayout, *, min_tissue: float) -> tuple[RegionPlan, dict]:
    from ..tissue import detect_tissue

    timings = {}
    t = time.perf_counter()
    tissue = detect_tissue(slide, mpp=slide_mpp)
    timings["tissue"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = plan_regions(slide, slide_mpp=slide_mpp, layout=layout, tissue=tissue, min_tissue=min_tissue)
    timings["plan"] = time.perf_counter() - t
    return plan, timings


@dataclass
class PreparedSlide:
    path: str
    slide: object
    slide_mpp: float
    mpp_overridden: bool
    plan: RegionPlan
    timings: dict

    def close(self) -> None:
        self.slide.close()


def prepare_slide(slide_path: str | os.PathLike, layout: RegionLayout, *, mpp: float | None = None,
                  reader: str = field_default("reader"), min_tissue: float = field_default("min_tissue")) -> PreparedSlide:
    """Open, MPP, tissue, region plan: every check on the input, before any model is loaded."""
    from ..slide import open_slide, resolve_mpp

    check_layout(layout)
    t = time.perf_counter()
    slide = open_slide(slide_path, reader=reader)
    try:
        slide_mpp = resolve_mpp(slide.info, mpp)
        timings = {"open": time.perf_counter() - t}
        plan, more = plan_slide(slide, slide_mpp, layout, min_tissue=min_tissue)
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(str(slide_path), slide, slide_mpp, mpp is not None, plan, {**timings, **more})


def extract_slide(prepared: PreparedSlide, out_dir: str | os.PathLike | None, stage, *, dim: int, provenance: dict,
                  min_tissue: float = field_default("min_tissue"), batch_size: int = field_default("batch_size"),
                  num_workers: int = field_default("num_workers"),
                  progress: Callable[[int], None] | None = None, decode=None) -> ExtractResult:
    """Embed the prepared slide's regions with `stage` (a pipeline ModelStage) and close it; write
    DIR/<stem>.h5 when `out_dir` is given. `provenance` goes into the file's attributes. `decode`
    (slide.decoding.DecodeRequest; None = the slide reader) says who decodes the level blocks."""
    t0 = time.perf_counter()
    plan, stats = prepared.plan, RegionEmbedStats()
    attrs = {**provenance, "slide": prepared.path, "mpp_overridden": prepared.mpp_overridden,
             "min_tissue": min_tissue, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = None
    blocks = None
    try:
        blocks = BlockSource.open(prepared.slide, [level for level, _ in plan.level_blocks()], decode,
                                  device=getattr(stage.backend, "device", None), plan=plan)
        attrs["decode"] = blocks.describe()
        if out_dir is None:
            embed_regions(prepared.slide, plan, stage, batch_size=batch_size, num_workers=num_workers,
                          sink=lambda i, f: None, progress=progress, stats=stats, blocks=blocks)
        else:
            path = output_path(out_dir, prepared.path)
            with RegionFeatureWriter(path, plan, dim, attrs) as writer:
                embed_regions(prepared.slide, plan, stage, batch_size=batch_size, num_workers=num_workers,
                              sink=writer.write, progress=progress, stats=stats, blocks=blocks)
    finally:
        if blocks is not None:
            blocks.close()
        prepared.close()
    timings = {**prepared.timings, "embed": time.perf_counter() - t0}
    return ExtractResult(path, len(plan), plan, stats, timings, attrs["decode"])

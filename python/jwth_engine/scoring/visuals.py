"""Pictures and exports people look at, made while a slide is scored (score --heatmap, --geojson,
--attention K, --report) or later from a results folder (`jwth-engine heatmap`).

`VisualStep` is the scorer's hook: it adds the attention observer to the scoring pass, `begin`s the
slide-only work (thumbnail base, tissue polygons; beside the stream when the model is on a GPU),
`capture`s what needs the open slide once scoring is done (a thumbnail at the picture's size, and the pixels
of only the K selected tiles: no second pass over the slide), and `write`s the files after the tile
table, each atomically, before the summary (so a summary on disk still means the slide finished).

Files, beside NAME.summary.json:
  NAME.heatmap.png        chosen class's tile probability over the thumbnail
  NAME.tiles.geojson      QuPath: tiles with measurements + tissue annotations
  NAME.attention.npz      per-head attention maps (float16) of the top-k / bottom-k tiles
  NAME.attention/         one PNG per selected tile: tile, mean and per-head overlays
  NAME.report.html        self-contained report
"""

from __future__ import annotations

import functools
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import TilingConfig
from ..errors import ConfigError
from ..outputs import atomic_write_bytes, remove_stale_temps
from ..outputs.attention import AttentionCollector, render_attention_panel, write_attention_npz
from ..outputs.figures import colormap, jpeg_bytes, png_bytes, read_png, resize_rgb, write_png
from ..outputs.geojson import feature_collection, tile_features, tissue_features, write_geojson
from ..outputs.heatmap import (DEFAULT_COLORMAP, DEFAULT_OPACITY, DEFAULT_SIZE, MIN_SIZE, HeatmapBase,
                               HeatmapLayout, heatmap_base, heatmap_layout, no_tissue_message, render_heatmap,
                               tint_tiles)
from ..outputs.report import ReportImages, write_report
from ..slide import open_slide
from ..tissue import detect_tissue


# Threads for picture work beside the main thread: the slide-only parts (VisualStep.begin) and the
# PNG encoding. Two, so that the tissue polygons and the PNG encoding can run side by side.
_PICTURE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jwth-pictures")


@dataclass(frozen=True)
class VisualOptions:
    heatmap: bool = False
    geojson: bool = False
    report: bool = False
    attention: int = 0                  # K: top-K and bottom-K tiles (0 = off)
    heatmap_class: str | None = None    # default: the slide's prediction
    heatmap_size: int = DEFAULT_SIZE    # long side of the PNG, px
    colormap: str = DEFAULT_COLORMAP
    opacity: float = DEFAULT_OPACITY
    stretch: bool = False               # colour scale over this slide's tile range instead of [0, 1]

    @property
    def wanted(self) -> bool:
        return self.heatmap or self.geojson or self.report or self.attention > 0

    @property
    def draws_heatmap(self) -> bool:
        return self.heatmap or self.report


def visual_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {"heatmap_png": out / f"{name}.heatmap.png", "geojson": out / f"{name}.tiles.geojson",
            "attention_npz": out / f"{name}.attention.npz", "attention_dir": out / f"{name}.attention",
            "report_html": out / f"{name}.report.html"}


def check_visual_options(options: VisualOptions) -> None:
    """Checks that need nothing loaded (run before the slide or model is touched)."""
    if options.attention < 0:
        raise ConfigError(f"--attention must be >= 0, got {options.attention}")
    if options.heatmap_size < MIN_SIZE:
        raise ConfigError(f"--heatmap-size must be >= {MIN_SIZE} px, got {options.heatmap_size}")
    if not 0.0 < options.opacity <= 1.0:
        raise ConfigError(f"--heatmap-opacity must be within (0, 1], got {options.opacity}")
    try:
        colormap(options.colormap)
    except ValueError as exc:
        raise ConfigError(f"--heatmap-colormap: {exc}") from None


def check_class(class_name: str | None, classes, where: str) -> None:
    if class_name is not None and class_name not in classes:
        raise ConfigError(f"{where}: the head has no class {class_name!r}; its classes are {', '.join(classes)}")


def check_against_model(options: VisualOptions, model) -> None:
    """Checks that need the loaded model: the class exists, and attention can be had."""
    head = model.head
    check_class(options.heatmap_class, list(head.meta.classes), head.source or "random head")
    if options.attention:
        if head.meta.pooling != "jwth":
            raise ConfigError(f"--attention {options.attention}: the head ({head.source or 'random head'}) is a "
                              f"{head.meta.pooling} head, which has no attention over patches; use a JWTH head")
        if not getattr(model.backend, "returns_tokens", True):
            raise ConfigError(f"--attention {options.attention}: backend {model.backend.describe().get('name')} "
                              "returns no patch tokens; use --backend torch or onnxruntime")


def _predicted_index(probs: np.ndarray) -> int:
    # Same rule as the summary's prediction: the class with the highest mean tile probability.
    return int(np.argmax(probs.mean(axis=0)))


def _tile_model_input(slide, grid, row: int, tile_size: int) -> np.ndarray:
    x, y = (int(v) for v in grid.coords[row])
    pixels = slide.read_region((x, y), grid.level, (grid.read_size, grid.read_size))
    return resize_rgb(np.ascontiguousarray(pixels[..., :3]), tile_size, tile_size)


def _heatmap_title(name: str, class_name: str, model_name: str, pooling: str, tiles: int, target_mpp: float,
                   prediction: str | None, random: list[str]) -> tuple[str, str, str | None]:
    title = f"{name} — P({class_name}) per tile"
    subtitle = (f"{model_name} · {pooling} head · {tiles} tiles at {target_mpp:g} µm/px"
                + (f" · prediction: {prediction}" if prediction else ""))
    warning = (f"RANDOM {' AND '.join(p.upper() for p in random)}: scores are not meaningful (pipeline demo)"
               if random else None)
    return title, subtitle, warning


@dataclass
class PictureBase:
    """The heat map's slide-only part (made before the scores exist)."""

    layout: HeatmapLayout
    base: HeatmapBase


def picture_base(slide, tissue, options: VisualOptions) -> PictureBase:
    """Thumbnail at the picture's size (from the tissue overview when it is fine enough, else read),
    background washed, tissue outline: everything of the heat map that does not need the scores."""
    w0, h0 = slide.info.level_dimensions[0]
    layout = heatmap_layout(w0, h0, options.heatmap_size)
    overview = tissue.overview
    if overview is None or tissue.downsample > 1.0 / layout.scale:
        # The tissue overview is coarser than the picture: read one at the picture's size.
        overview, _ = slide.thumbnail(max(layout.width, layout.height))
    # A background picture: when shrinking, the box filter suffices (and is 3x faster than Lanczos).
    shrink = overview.shape[1] >= layout.width and overview.shape[0] >= layout.height
    thumb = resize_rgb(np.ascontiguousarray(overview[..., :3]), layout.width, layout.height, area=shrink)
    return PictureBase(layout, heatmap_base(thumb, tissue.mask, tissue.downsample, layout.scale))


def draw_heatmap(slide, tissue, x, y, w, h, values: np.ndarray, *, options: VisualOptions, class_name: str,
                 name: str, model_name: str, pooling: str, target_mpp: float, prediction: str | None,
                 random: list[str], base: PictureBase | None = None) -> np.ndarray:
    """The framed heat map's pixels (uint8 RGB) of one slide (slide open; tissue = its TissueMask;
    `base` = its picture_base when already made)."""
    base = base or picture_base(slide, tissue, options)
    layout = base.layout
    values = np.asarray(values, np.float64)
    scale = (float(values.min()), float(values.max())) if options.stretch and values.size else (0.0, 1.0)
    if scale[1] - scale[0] < 1e-6:
        scale = (0.0, 1.0)              # one value: nothing to stretch
    layers = tint_tiles(base.base, layout.scale, (x, y, w, h), values, cmap=options.colormap,
                        opacity=options.opacity, scale_range=scale)
    title, subtitle, warning = _heatmap_title(name, class_name, model_name, pooling, len(values), target_mpp,
                                              prediction, random)
    return render_heatmap(layers, layout, title=title, subtitle=subtitle, class_name=class_name,
                          values=values, cmap=options.colormap, warning=warning, scale_range=scale)


class VisualStep:
    """The scorer's hook for one slide (see the module docstring)."""

    def __init__(self, options: VisualOptions, model):
        check_visual_options(options)
        check_against_model(options, model)
        self.options, self.model = options, model
        self.classes = list(model.head.meta.classes)
        self.collector = AttentionCollector(options.attention, len(self.classes)) if options.attention else None
        self._captured: dict = {}
        self._jobs: dict = {}           # slide-only picture work, see begin()
        self._futures: dict[str, Future] = {}

    def begin(self, prepared, name: str, *, overlap: bool) -> None:
        """Queue the slide-only work (picture base, tissue polygons). With `overlap` (the model runs
        on a GPU: the CPU idles while tiles stream) it starts now on the picture threads, off the
        slide's critical path. Without, it waits for `capture`: beside a CPU backbone a third busy
        thread stalls torch's OpenMP regions for longer than its own run time (two 4-pair trials on
        2 cores: +6 % and +10 % end to end for ~0.15 s of picture work), so there it runs after scoring, the
        tissue polygons then beside the heat map. `settle` before the slide closes."""
        self._jobs = {}
        if self.options.draws_heatmap and len(prepared.grid.coords):
            self._jobs["base"] = functools.partial(picture_base, prepared.slide, prepared.tissue, self.options)
        if self.options.geojson:
            self._jobs["tissue_features"] = functools.partial(tissue_features, name, prepared.tissue.mask,
                                                              prepared.tissue.downsample)
        if overlap:
            self._start(*self._jobs)

    def _start(self, *keys: str) -> None:
        for key in keys:
            if key in self._jobs and key not in self._futures:
                self._futures[key] = _PICTURE_POOL.submit(self._jobs[key])

    def _result(self, key: str):
        """The job's result (run here if it was not started); None when it was not asked for."""
        if key in self._futures:
            return self._futures[key].result()
        return self._jobs[key]() if key in self._jobs else None

    def settle(self) -> None:
        """Wait for the picture job that reads the slide (the base's thumbnail), before the slide
        closes; an error surfaces in capture/write. The others run on, into write()."""
        if "base" in self._futures:
            wait([self._futures["base"]])

    @property
    def observers(self) -> tuple:
        return (self.collector,) if self.collector is not None else ()

    @property
    def need_attn(self) -> bool:
        return self.collector is not None

    def _class_index(self, probs: np.ndarray) -> int:
        if self.options.heatmap_class is not None:
            return self.classes.index(self.options.heatmap_class)
        return _predicted_index(probs)

    def capture(self, prepared, probs: np.ndarray, name: str) -> None:
        """With the slide still open: the heat map picture and the selected tiles' pixels."""
        t = time.perf_counter()
        grid, slide = prepared.grid, prepared.slide
        self._start("tissue_features")                  # beside the heat map (a no-op if running)
        if not len(grid.coords):
            self._captured = {"seconds": time.perf_counter() - t, "probs": probs}
            return
        index = self._class_index(probs)
        captured = {"class_index": index, "probs": probs}
        if self.options.draws_heatmap:
            size0 = grid.size_level0
            model = self.model
            canvas = draw_heatmap(
                slide, prepared.tissue, grid.coords[:, 0], grid.coords[:, 1],
                np.full(len(grid.coords), size0[0]), np.full(len(grid.coords), size0[1]), probs[:, index],
                options=self.options, class_name=self.classes[index], name=name,
                model_name=model.preset.name, pooling=model.head.meta.pooling, target_mpp=model.target_mpp,
                prediction=self.classes[_predicted_index(probs)],
                random=[p for p, r in (("weights", model.backbone.random_init),
                                       ("head", model.head.meta.random_init)) if r],
                base=self._result("base"))
            captured["heatmap"] = _PICTURE_POOL.submit(png_bytes, canvas)   # encoded beside the next steps
        if self.collector is not None and not self.collector.empty:
            selection = self.collector.selection(index)
            captured["selection"] = selection
            captured["tiles"] = [_tile_model_input(slide, grid, int(r), self.model.tile_size) for r in selection.rows]
        captured["seconds"] = time.perf_counter() - t
        self._captured = captured

    def write(self, out_dir: Path, name: str, summary: dict, prepared) -> dict:
        """Write the requested files; returns {output key: file name} for the summary."""
        t = time.perf_counter()
        options, cap = self.options, self._captured
        paths = visual_paths(out_dir, name)
        written: dict = {}
        grid, tissue = prepared.grid, prepared.tissue
        scored = summary["status"] == "scored"
        index = cap.get("class_index")
        class_name = self.classes[index] if index is not None else options.heatmap_class
        heatmap_png = cap["heatmap"].result() if cap.get("heatmap") is not None else None
        if heatmap_png is not None and options.draws_heatmap:
            atomic_write_bytes(paths["heatmap_png"], heatmap_png)
            written["heatmap_png"] = paths["heatmap_png"].name
            written["heatmap_class"] = class_name
        if options.geojson:
            size0 = grid.size_level0
            n = len(grid.coords)
            probs = cap["probs"] if n else np.zeros((0, len(self.classes)))
            features = tile_features(name, grid.coords[:, 0], grid.coords[:, 1], np.full(n, size0[0]),
                                     np.full(n, size0[1]), grid.tissue_fraction, probs, self.classes)
            features += self._result("tissue_features")
            write_geojson(feature_collection(features), paths["geojson"])
            written["geojson"] = paths["geojson"].name
        panels = []
        selection = cap.get("selection")
        if selection is not None:
            preset = self.model.preset
            grid_side = preset.input_size // preset.patch_size
            write_attention_npz(paths["attention_npz"], selection, grid=grid_side, patch_size=preset.patch_size,
                                tile_size=self.model.tile_size, class_name=class_name,
                                x=grid.coords[selection.rows, 0], y=grid.coords[selection.rows, 1],
                                size_level0=grid.size_level0, level=grid.level, read_size=grid.read_size)
            folder = paths["attention_dir"]
            folder.mkdir(exist_ok=True)
            remove_stale_temps(folder)
            keep = set()
            maps = selection.grid_maps(grid_side).astype(np.float32)
            for i, tile in enumerate(cap["tiles"]):
                kind, rank = str(selection.kinds[i]), int(selection.ranks[i])
                x, y = (int(v) for v in grid.coords[selection.rows[i]])
                caption = (f"{'highest' if kind == 'top' else 'lowest'} #{rank}: P({class_name}) = "
                           f"{float(selection.scores[i]):.4f}, tile at level-0 ({x}, {y})")
                panel = render_attention_panel(tile, maps[i], preset.patch_size, title=caption)
                file = folder / f"{kind}-{rank:02d}.png"
                write_png(panel, file)
                panels.append((caption, jpeg_bytes(panel)))
                keep.add(file.name)
            for old in folder.glob("*.png"):
                if old.name not in keep:          # from an earlier run with a larger K
                    old.unlink()
            written["attention_npz"] = paths["attention_npz"].name
            written["attention_dir"] = folder.name
        seconds = cap.get("seconds", 0.0) + time.perf_counter() - t
        summary.setdefault("timings_s", {})["visuals"] = round(seconds, 4)
        if options.report:
            images = ReportImages(
                heatmap_png=jpeg_bytes(read_png(heatmap_png), quality=90) if heatmap_png else None,
                heatmap_class=class_name,
                heatmap_missing=no_tissue_message(name) if not scored else ReportImages.heatmap_missing,
                attention=panels, attention_class=class_name,
                attention_grid=self.model.preset.input_size // self.model.preset.patch_size,
                attention_top=int((selection.kinds == "top").sum()) if selection is not None else 0,
                attention_bottom=int((selection.kinds == "bottom").sum()) if selection is not None else 0)
            report_summary = {**summary, "outputs": {**summary.get("outputs", {}), **written}}
            write_report(report_summary, images, paths["report_html"])
            written["report_html"] = paths["report_html"].name
        return written


# --- from a results folder --------------------------------------------------------------------------

def read_results(prefix: str | os.PathLike) -> tuple[dict, object]:
    """(summary dict, tiles pyarrow.Table) of RESULTS_DIR/NAME; one-line JwthError when missing."""
    import pyarrow.parquet as pq

    prefix = Path(prefix)
    summary_path = prefix.with_name(prefix.name + ".summary.json")
    tiles_path = prefix.with_name(prefix.name + ".tiles.parquet")
    if prefix.is_dir():
        found = sorted(p.name[: -len(".summary.json")] for p in prefix.glob("*.summary.json"))
        hint = f"; it holds {', '.join(found)} (pass {prefix}/{found[0]})" if found else "; it holds no *.summary.json"
        raise ConfigError(f"{prefix}: give RESULTS_DIR/NAME, the prefix of NAME.summary.json, not a folder{hint}")
    if not summary_path.is_file():
        raise ConfigError(f"{summary_path}: no such results file (expected NAME.summary.json and NAME.tiles.parquet "
                          "written by `jwth-engine score`)")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{summary_path}: cannot read the summary ({exc})") from exc
    if summary.get("status") == "scored" and not tiles_path.is_file():
        raise ConfigError(f"{tiles_path}: missing; the summary says the slide was scored but its tile table is not there")
    table = None
    if tiles_path.is_file():
        try:
            table = pq.read_table(tiles_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{tiles_path}: cannot read the tile table ({exc})") from exc
    return summary, table


def heatmap_from_results(prefix: str | os.PathLike, options: VisualOptions, *, out: str | os.PathLike | None = None,
                         slide_path: str | None = None, reader: str | None = None) -> Path | None:
    """Draw NAME.heatmap.png (or `out`) from a results folder; None (nothing written) for a slide
    with no tissue tiles."""
    check_visual_options(options)
    summary, table = read_results(prefix)
    classes = list(summary.get("classes") or [])
    check_class(options.heatmap_class, classes, f"{prefix}.summary.json")
    if summary.get("status") != "scored" or table is None or table.num_rows == 0:
        return None
    columns = [f"prob_{c}" for c in classes]
    missing = [c for c in ("x", "y", "width", "height", *columns) if c not in table.column_names]
    if missing:
        raise ConfigError(f"{prefix}.tiles.parquet: missing columns {', '.join(missing)}")
    probs = np.stack([table.column(c).to_numpy() for c in columns], axis=1)
    class_name = options.heatmap_class or summary.get("prediction") or classes[_predicted_index(probs)]
    path = slide_path or summary.get("slide", {}).get("path")
    if not path or not Path(path).is_file():
        raise ConfigError(f"{path}: the scored slide is not there any more; pass --slide PATH to where it is now")
    name = summary.get("slide", {}).get("name") or Path(prefix).name
    dest = Path(out) if out else visual_paths(Path(prefix).parent, Path(prefix).name)["heatmap_png"]
    mpp = summary.get("slide", {}).get("mpp_used")
    with open_slide(path, reader=reader or TilingConfig.reader) as slide:
        tissue = detect_tissue(slide, mpp=mpp)
        png = png_bytes(draw_heatmap(slide, tissue, table.column("x").to_numpy(), table.column("y").to_numpy(),
                           table.column("width").to_numpy(), table.column("height").to_numpy(),
                           probs[:, classes.index(class_name)], options=options, class_name=class_name, name=name,
                           model_name=summary.get("model", {}).get("preset", "?"),
                           pooling=summary.get("head", {}).get("pooling", "?"),
                           target_mpp=float(summary.get("tiles", {}).get("target_mpp") or 0),
                           prediction=summary.get("prediction"),
                           random=[p for p, r in (("weights", summary.get("model", {}).get("random_init")),
                                                  ("head", summary.get("head", {}).get("random_init"))) if r]))
    atomic_write_bytes(dest, png)
    return dest


__all__ = ["VisualOptions", "VisualStep", "check_visual_options", "heatmap_from_results", "read_results",
           "visual_paths"]

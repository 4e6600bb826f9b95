"""Region feature files (HDF5, one per slide), written atomically and streamed region by region.

Layout (TRIDENT's names where they exist):

    features        (R, L, D) float32   backbone class token of every tile of every region
    coords          (R, L, 2) int64     level-0 (x, y) of each tile
    magnification   (L,) int64          index into attrs["magnifications"] of each sequence slot
    position        (L,) int64          row-major index of the slot's tile within its magnification's grid
    tile_span0      (L,) int64          level-0 px per side of each slot's tile
    region_boxes    (R, 4) int64        level-0 (x, y, width, height) of each region
    tissue_fraction (R,) float32

With one magnification and one tile per region the file is a plain tile feature file instead:
`features` (N, D) and `coords` (N, 2), as issue 13's `embed` writes them, so both kinds load here.
Root attributes carry the layout (JSON) and provenance (slide, MPP, backbone preset and weights hash).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, JwthError
from ..outputs.atomic import atomic_path, remove_stale_temps
from .planning import RegionLayout, RegionPlan

SCHEMA = "jwth-engine/region-features/v1"
SUFFIX = ".h5"


class RegionFeatureWriter:
    """`with RegionFeatureWriter(path, plan, dim, attrs) as w: w.write(i, feats)`; the file appears
    (renamed into place) only when the block exits cleanly and every region was written."""

    def __init__(self, path: str | os.PathLike, plan: RegionPlan, dim: int, attrs: dict):
        self.path, self.plan, self.dim, self.attrs = Path(path), plan, int(dim), dict(attrs)
        self._ctx = None
        self._file = None
        self._written = np.zeros(len(plan), bool)

    def __enter__(self) -> "RegionFeatureWriter":
        import h5py

        remove_stale_temps(self.path.parent)
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._file = h5py.File(tmp, "w", locking=False)   # atomic_path holds the temp's flock
            self._create(self._file)
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def _create(self, f) -> None:
        plan, layout = self.plan, self.plan.layout
        R, L = len(plan), layout.length
        mags, pos, _, _ = layout.slots()
        coords = plan.tile_coords()
        spans = plan.slot_spans0()
        if layout.is_plain_tiles:
            self._features = f.create_dataset("features", (R, self.dim), np.float32, chunks=(max(1, min(R, 1024)), self.dim) if R else None)
            c = f.create_dataset("coords", data=coords[:, 0, :])
            # TRIDENT's coords attributes, so its readers find the tile geometry.
            c.attrs["patch_size"] = layout.tile_size
            c.attrs["patch_size_level0"] = int(spans[0])
            c.attrs["target_magnification"] = float(layout.magnifications[0])
        else:
            chunk = (max(1, min(R, max(1, 4096 // L))), L, self.dim) if R else None
            self._features = f.create_dataset("features", (R, L, self.dim), np.float32, chunks=chunk)
            f.create_dataset("coords", data=coords)
            f.create_dataset("magnification", data=mags)
            f.create_dataset("position", data=pos)
            f.create_dataset("tile_span0", data=spans)
        boxes = np.concatenate([plan.boxes, np.full((R, 2), plan.span0, np.int64)], axis=1) if R else np.zeros((0, 4), np.int64)
        f.create_dataset("region_boxes", data=boxes)
        f.create_dataset("tissue_fraction", data=plan.tissue_fraction)
        f.attrs["schema"] = SCHEMA
        f.attrs["layout"] = json.dumps(layout.to_dict())
        f.attrs["magnifications"] = np.asarray(layout.magnifications, np.float64)
        f.attrs["slide_mpp"] = plan.slide_mpp
        f.attrs["reads"] = json.dumps([{"magnification": r.magnification, "level": r.level, "level_mpp": r.level_mpp,
                                        "tile_span0": r.tile_span0} for r in plan.reads])
        for key, value in self.attrs.items():
            f.attrs[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    def write(self, index: int, features: np.ndarray) -> None:
        if self.plan.layout.is_plain_tiles:
            self._features[index] = features[0]
        else:
            self._features[index] = features
        self._written[index] = True

    def _abort(self, exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._written.all():
            missing = RuntimeError(f"{self.path}: {int((~self._written).sum())} regions were never written")
            self._abort(missing)
            raise missing
        self._file.close()
        self._file = None
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(exc_type, exc, tb)   # clean: fsync + rename into place; error: temp removed


@dataclass
class RegionFeatures:
    path: Path
    layout: RegionLayout
    features: np.ndarray        # (R, L, D) float32 (plain tile files: L = 1)
    coords: np.ndarray          # (R, L, 2)
    magnification: np.ndarray   # (L,)
    position: np.ndarray        # (L,)
    attrs: dict

    @property
    def slide_id(self) -> str:
        return self.path.name[: -len(SUFFIX)] if self.path.name.endswith(SUFFIX) else self.path.stem

    def slots_at(self, magnification: float) -> np.ndarray:
        """Sequence slots of one magnification (bool [L])."""
        mags = list(self.layout.magnifications)
        if magnification not in mags:
            raise ConfigError(f"{self.path}: has no {magnification:g}x tiles (layout {self.layout.describe()})")
        return self.magnification == mags.index(magnification)


def read_region_features(path: str | os.PathLike) -> RegionFeatures:
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise ConfigError(f"{path}: not a feature file (needs 'features' and 'coords' datasets)")
            attrs = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v) for k, v in f.attrs.items()}
            feats = f["features"][()]
            coords = f["coords"][()]
            if feats.ndim == 2:   # a plain tile file: every tile is a region of one
                if "layout" in attrs:
                    layout = RegionLayout.from_dict(json.loads(attrs["layout"]))
                else:
                    mag = float(f["coords"].attrs.get("target_magnification", 20.0))
                    size = int(f["coords"].attrs.get("patch_size", 224))
                    layout = RegionLayout((mag,), 1, size)
                feats, coords = feats[:, None, :], coords[:, None, :]
                mags = np.zeros(1, np.int64)
                pos = np.zeros(1, np.int64)
            elif feats.ndim == 3 and "layout" in attrs:
                layout = RegionLayout.from_dict(json.loads(attrs["layout"]))
                mags, pos = f["magnification"][()], f["position"][()]
            else:
                raise ConfigError(f"{path}: features of shape {feats.shape} without a region layout")
    except OSError as exc:
        raise JwthError(f"{path}: cannot read feature file ({exc})") from exc
    if feats.shape[1] != layout.length:
        raise ConfigError(f"{path}: features hold {feats.shape[1]} tiles per region but the layout says {layout.length}")
    return RegionFeatures(path, layout, np.asarray(feats, np.float32), coords, mags, pos, attrs)


def load_feature_dir(folder: str | os.PathLike) -> list[RegionFeatures]:
    """Every `*.h5` in `folder` (sorted); ConfigError when there are none or their layouts differ."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder of feature files")
    files = sorted(p for p in folder.glob("*" + SUFFIX) if not p.name.startswith("."))
    if not files:
        raise ConfigError(f"{folder}: no {SUFFIX} feature files")
    out = [read_region_features(p) for p in files]
    first = out[0]
    for item in out[1:]:
        if item.layout != first.layout or item.features.shape[2] != first.features.shape[2]:
            raise ConfigError(f"{item.path}: mixed region layouts in {folder}: {item.layout.describe()} "
                              f"D={item.features.shape[2]} vs {first.path.name}'s {first.layout.describe()} "
                              f"D={first.features.shape[2]}")
    return out

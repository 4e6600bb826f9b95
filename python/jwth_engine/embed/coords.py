"""`--coords`: tile a slide with another tool's coordinates (TRIDENT or CLAM `.h5`), so that encoders
can be compared on identical tiles.

Two conventions exist for what a coordinate's box is (both with level-0 top-left x, y):
  - TRIDENT (trident/IO.py coords_to_h5, read_coords): `patch_size_level0` is the box side in
    level-0 pixels (`patch_size` is the side at the target magnification);
  - CLAM (dataset_modules/dataset_h5.py:63-66, TRIDENT's read_coords_legacy): `patch_level` and
    `patch_size`, the box side in pixels of that level.
A file with `patch_size_level0` is read the TRIDENT way (jwth-engine's own feature files are), else
it needs `patch_level` and `patch_size`. The box is read from the coarsest level at least as fine
as the box's resolution at the model's input size (CLAM: the file's level) and resized to the
model's tile size, as `plan_tiles` does for its own grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..tiling import TileGrid, choose_level


@dataclass
class ExternalCoords:
    path: Path
    coords: np.ndarray                # (N, 2) int64 level-0 top-left
    size_level0: float | None         # TRIDENT convention
    patch_level: int | None           # CLAM convention
    patch_size: int | None

    @property
    def convention(self) -> str:
        return "trident" if self.size_level0 is not None else "clam"


def read_coords_file(path: str | os.PathLike) -> ExternalCoords:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: coordinates file not found")
    try:
        with h5py.File(path, "r") as fh:
            if "coords" not in fh:
                raise ConfigError(f"{path}: no 'coords' dataset (not a TRIDENT/CLAM coordinates file)")
            ds = fh["coords"]
            if ds.ndim != 2 or ds.shape[1] != 2:
                raise ConfigError(f"{path}: 'coords' is {list(ds.shape)}, expected (N, 2)")
            coords = ds[:].astype(np.int64)
            attrs = dict(ds.attrs)
    except OSError as exc:
        raise ConfigError(f"{path}: not a readable HDF5 file ({exc})") from exc
    size0 = attrs.get("patch_size_level0")
    level, size = attrs.get("patch_level"), attrs.get("patch_size")
    if size0 is not None:
        if not float(size0) > 0:
            raise ConfigError(f"{path}: patch_size_level0 {size0} is not positive")
        return ExternalCoords(path, coords, float(size0), None, int(size) if size is not None else None)
    if level is None or size is None:
        raise ConfigError(f"{path}: 'coords' needs the attribute patch_size_level0 (TRIDENT) or patch_level "
                          f"and patch_size (CLAM); found {sorted(attrs)}")
    if int(size) < 1 or int(level) < 0:
        raise ConfigError(f"{path}: patch_level {level} / patch_size {size} are not valid")
    return ExternalCoords(path, coords, None, int(level), int(size))


def grid_from_coords(ext: ExternalCoords, slide, *, slide_mpp: float, tile_size: int, tissue=None) -> TileGrid:
    """The TileGrid that reads exactly `ext`'s boxes from `slide`."""
    info = slide.info
    downsamples = [float(d) for d in info.level_downsamples]
    if ext.convention == "clam":
        if ext.patch_level >= len(downsamples):
            raise ConfigError(f"{ext.path}: patch_level {ext.patch_level} but the slide has "
                              f"{len(downsamples)} levels")
        level, read_size = ext.patch_level, ext.patch_size
        span0 = read_size * downsamples[level]
    else:
        span0 = ext.size_level0
        box_mpp = slide_mpp * span0 / tile_size          # µm/px once resized to the model's input
        level = choose_level(downsamples, slide_mpp, box_mpp)
        read_size = max(1, round(span0 / downsamples[level]))
    w0, h0 = info.level_dimensions[0]
    c = ext.coords
    outside = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= w0) | (c[:, 1] >= h0) if len(c) else np.zeros(0, bool)
    if outside.any():
        x, y = c[np.argmax(outside)]
        raise ConfigError(f"{ext.path}: coordinate ({x}, {y}) lies outside the slide ({w0} x {h0}); "
                          f"coordinates of another slide?")
    if tissue is not None and len(c):
        fraction = np.asarray(tissue.fraction(c[:, 0], c[:, 1], span0, span0), np.float32)
    else:
        fraction = np.ones(len(c), np.float32)
    size0 = int(round(span0))
    return TileGrid(level=level, read_size=int(read_size), tile_size=tile_size, size_level0=(size0, size0),
                    coords=np.ascontiguousarray(c), tissue_fraction=fraction, num_candidates=len(c),
                    slide_mpp=float(slide_mpp), target_mpp=float(slide_mpp * span0 / tile_size),
                    level_mpp=float(slide_mpp * downsamples[level]))


def coords_file_for(coords: str | os.PathLike, slide_id: str) -> Path:
    """`--coords` given as a folder: `<slide_id>.h5`, or TRIDENT's `<slide_id>_patches.h5`."""
    folder = Path(coords)
    if not folder.is_dir():
        return folder
    for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{folder}: no coordinates file for slide {slide_id} ({slide_id}.h5 or {slide_id}_patches.h5)")

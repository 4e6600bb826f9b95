"""Tile-embedding files in TRIDENT's HDF5 layout, readable by TRIDENT's and CLAM's loaders unchanged.

Layout (one file per slide and feature kind):

    features   (N, D) float32   one row per tile
    coords     (N, 2) int64     level-0 top-left (x, y) of the same tile, same row order
    attributes on `coords`:   patch_size (px at the target magnification), patch_size_level0,
                              level0_magnification, target_magnification, overlap, name,
                              level0_width, level0_height, encoder, plus jwth-engine provenance
    attributes on `features`: name, encoder (and the same provenance)

What the readers we matched do (mahmoodlab/TRIDENT @ a91fa84, mahmoodlab/CLAM @ 53e2409):
  - TRIDENT trident/wsi_objects/WSI.py:1103-1105 (slide encoders read patch features):
        coords = f['coords'][:]; patch_features = f['features'][:]; coords_attrs = dict(f['coords'].attrs)
    and trident/slide_encoder_models/load.py:477 uses coords_attrs['patch_size_level0'];
  - TRIDENT trident/IO.py:602-604 `read_coords`: dict(f['coords'].attrs), f['coords'][:];
    the attribute names are those coords_to_h5 writes (trident/IO.py:670-681), and WSI.py:1026-1036
    writes `name` and `encoder` on `features`;
  - CLAM dataset_modules/dataset_generic.py:347-349 (MIL training):
        features = hdf5_file['features'][:]; coords = hdf5_file['coords'][:]
CLAM's *coordinate* files carry `patch_level` and `patch_size` at that level
(dataset_modules/dataset_h5.py:63-66); feature files need neither, and we do not write them because
`patch_size` would then mean two different things. `read_coords_file` accepts both conventions.

Writing: datasets are created at their final size (the tile grid is known before the first
batch), batches fill chunk-sized buffers (no filters, about 1 MiB of rows each) that are written
whole, one direct chunk write each, and the file is built under a temp name and renamed only when
every row has been written (nothing half-written is ever visible).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .atomic import atomic_path

# Rows per HDF5 chunk: about 1 MiB of float32 at D = 1024. One chunk per row (TRIDENT's choice) makes
# whole-file reads and writes slow; very large chunks cost memory when a reader takes a few rows.
CHUNK_BYTES = 1 << 20
# h5py's default 1 MiB chunk cache would flush partial chunks on every batch write.
CACHE_BYTES = 32 << 20


def _attr_value(key: str, value):
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    if value is None:
        return "None"          # TRIDENT's convention for missing values (IO.py save_h5)
    if isinstance(value, bool | int | float | str | np.integer | np.floating):
        return value
    raise TypeError(f"attribute {key!r}: cannot store {type(value).__name__} in HDF5")


class FeaturesH5Writer:
    """Writes one features file batch by batch: `write(first_row, rows)`, then `commit()` (or
    `abort()`); usable as a context manager that commits on success and aborts on an exception."""

    def __init__(self, path: str | os.PathLike, num_rows: int, dim: int, coords: np.ndarray, attrs: dict):
        import h5py

        coords = np.asarray(coords)
        if coords.shape != (num_rows, 2):
            raise ValueError(f"coords must be [{num_rows}, 2], got {list(coords.shape)}")
        self.path, self.num_rows, self.dim = Path(path), int(num_rows), int(dim)
        self._written = np.zeros(self.num_rows, bool)
        self._pending: dict[int, np.ndarray] = {}      # chunk index -> rows not yet on disk
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            # HDF5's own file lock would collide with the flock atomic_path holds on its temp file
            # (that lock marks the temp as owned by a live writer; nobody else opens it).
            self._file = h5py.File(tmp, "w", rdcc_nbytes=CACHE_BYTES, locking=False)
            rows = max(1, min(self.num_rows, CHUNK_BYTES // (4 * max(self.dim, 1))))
            self._chunk_rows = rows
            chunks = (rows, self.dim) if self.num_rows and self.dim else None
            self._features = self._file.create_dataset("features", (self.num_rows, self.dim), np.float32,
                                                       chunks=chunks)
            coords_ds = self._file.create_dataset("coords", data=coords.astype(np.int64))
            values = {k: _attr_value(k, v) for k, v in attrs.items()}
            for key, value in values.items():
                coords_ds.attrs[key] = value
                self._features.attrs[key] = value
        except BaseException:
            self.abort()
            raise

    def write(self, first_row: int, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float32)
        stop = first_row + rows.shape[0]
        if rows.ndim != 2 or rows.shape[1] != self.dim or first_row < 0 or stop > self.num_rows:
            raise ValueError(f"rows [{first_row}, {stop}) x {list(rows.shape[1:])} do not fit "
                             f"[{self.num_rows}, {self.dim}]")
        self._written[first_row:stop] = True
        # Rows gather in chunk-sized buffers; a chunk goes to disk in one direct write when its last
        # row arrives. Writing each 32-row batch through h5py's slicing and chunk cache costs about
        # as much per call as the copy itself (~0.8 ms for 128 KiB).
        c = self._chunk_rows
        for index in range(first_row // c, (stop - 1) // c + 1):
            lo, hi = max(first_row, index * c), min(stop, (index + 1) * c)
            buf = self._pending.get(index)
            if buf is None:
                buf = self._pending[index] = np.zeros((c, self.dim), np.float32)
            buf[lo - index * c:hi - index * c] = rows[lo - first_row:hi - first_row]
            if self._written[index * c:min((index + 1) * c, self.num_rows)].all():
                self._features.id.write_direct_chunk((index * c, 0), self._pending.pop(index).tobytes())

    def commit(self) -> Path:
        if not self._written.all():
            missing = int((~self._written).sum())
            self.abort()
            raise RuntimeError(f"{self.path}: {missing} of {self.num_rows} feature rows were never written")
        self._file.close()
        self._stack.close()                 # fsync + rename
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(AttributeError):
            self._file.close()
        try:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass                            # atomic_path re-raises what it was told; the temp is gone

    def __enter__(self) -> "FeaturesH5Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_features_h5(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, attrs: dict) -> Path:
    """Write features (N, D) float32 and coords (N, 2) int64 with `attrs` atomically (one write)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got {list(features.shape)}")
    with FeaturesH5Writer(path, features.shape[0], features.shape[1], coords, attrs) as writer:
        if features.shape[0]:
            writer.write(0, features)
    return Path(path)


@dataclass
class FeaturesFile:
    features: np.ndarray     # (N, D) float32
    coords: np.ndarray       # (N, 2) int64
    attrs: dict              # of the `coords` dataset (TRIDENT's convention), plus `features`' own


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_features_h5(path: str | os.PathLike, *, load: bool = True) -> FeaturesFile:
    """Read a features file (ours, TRIDENT's or CLAM's); problems are one ConfigError line naming it.
    With `load=False` the feature matrix is not read (shape checks and attributes only)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: features file not found")
    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh or "coords" not in fh:
                raise ConfigError(f"{path}: not a features file (needs 'features' and 'coords' datasets, "
                                  f"found {sorted(fh.keys())})")
            feats, coords = fh["features"], fh["coords"]
            if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or feats.shape[0] != coords.shape[0]:
                raise ConfigError(f"{path}: features {list(feats.shape)} and coords {list(coords.shape)} "
                                  f"do not describe the same N tiles")
            attrs = {k: _plain(v) for k, v in feats.attrs.items()}
            attrs.update({k: _plain(v) for k, v in coords.attrs.items()})
            features = feats[:].astype(np.float32, copy=False) if load else np.empty((feats.shape[0], 0), np.float32)
            attrs.setdefault("feature_dim", int(feats.shape[1]))
            return FeaturesFile(features, coords[:].astype(np.int64, copy=False), attrs)
    except OSError as exc:
        raise ConfigError(f"{path}: not a readable HDF5 file ({exc})") from exc

"""Per-tile table: one row per scored tile, written as Parquet."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path


def prob_column(class_name: str) -> str:
    return f"prob_{class_name}"


def tiles_table(
    coords: np.ndarray,
    size_level0: tuple[int, int],
    tissue_fraction: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    provenance: dict | None = None,
) -> pa.Table:
    """Columns: x, y, width, height (level-0 px), tissue_fraction, prob_<class> per class."""
    n = len(coords)
    if probs.shape != (n, len(classes)):
        raise ValueError(f"probs has shape {probs.shape}, expected {(n, len(classes))}")
    columns = {
        "x": pa.array(coords[:, 0].astype(np.int64) if n else np.zeros(0, np.int64)),
        "y": pa.array(coords[:, 1].astype(np.int64) if n else np.zeros(0, np.int64)),
        "width": pa.array(np.full(n, size_level0[0], np.int64)),
        "height": pa.array(np.full(n, size_level0[1], np.int64)),
        "tissue_fraction": pa.array(np.asarray(tissue_fraction, np.float32)),
    }
    for i, name in enumerate(classes):
        columns[prob_column(name)] = pa.array(np.asarray(probs[:, i], np.float32))
    table = pa.table(columns)
    if provenance:
        table = table.replace_schema_metadata({b"jwth_engine": json.dumps(provenance).encode()})
    return table


def write_tiles_parquet(table: pa.Table, dest: str | os.PathLike) -> None:
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")

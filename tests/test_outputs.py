"""Atomic writers: a failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from jwth_engine.outputs import (aggregate_scores, atomic_path, atomic_write_bytes, remove_stale_temps,
                                 tiles_table, write_tiles_parquet)


def test_atomic_write_replaces_whole_file(tmp_path):
    dest = tmp_path / "a.json"
    atomic_write_bytes(dest, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("writer died")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_gives_the_permissions_of_a_normal_file(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644   # not mkstemp's 0600


def test_remove_stale_temps(tmp_path):
    (tmp_path / ".jwth-tmp-x.parquet.123").write_bytes(b"junk")
    (tmp_path / "keep.parquet").write_bytes(b"ok")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


def test_tiles_table_round_trip(tmp_path):
    coords = np.array([[0, 0], [448, 0], [0, 448]])
    probs = np.array([[0.1, 0.9], [0.5, 0.5], [0.8, 0.2]], np.float32)
    table = tiles_table(coords, (448, 448), np.array([1.0, 0.5, 0.3]), probs, ["neg", "pos"], {"model": "m"})
    write_tiles_parquet(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.column_names == ["x", "y", "width", "height", "tissue_fraction", "prob_neg", "prob_pos"]
    assert back.column("x").to_pylist() == [0, 448, 0]
    assert b"jwth_engine" in back.schema.metadata


def test_aggregate_scores_mean_and_topk():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]], np.float32)
    scores = aggregate_scores(probs, ["a", "b"], top_k=2)
    assert scores["a"]["mean"] == pytest.approx(0.5)
    assert scores["a"]["topk_mean"] == pytest.approx(0.7)
    assert scores["b"]["topk_mean"] == pytest.approx(0.7)
    assert aggregate_scores(probs, ["a", "b"], top_k=100)["a"]["k"] == 4
    assert aggregate_scores(np.zeros((0, 2)), ["a", "b"], 3) == {}

"""The HDF5 feature writer: TRIDENT/CLAM layout, atomicity, batch writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from jwth_engine.errors import ConfigError
from jwth_engine.outputs.atomic import TMP_PREFIX
from jwth_engine.outputs.features_h5 import FeaturesH5Writer, read_features_h5, write_features_h5

from _peer_readers import clam_read, trident_read

ATTRS = {"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40.0,
         "target_magnification": 20.0, "overlap": 0, "name": "slide-a", "level0_width": 2220,
         "level0_height": 2967, "encoder": "test_tiny_patch14_reg4", "provenance": {"a": 1}, "missing": None}


def _data(n=1000, d=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 10**6, size=(n, 2)).astype(np.int64)


def test_layout_reads_with_trident_and_clam(tmp_path):
    feats, coords = _data()
    path = write_features_h5(tmp_path / "a.h5", feats, coords, ATTRS)
    c, f, attrs = trident_read(path)
    np.testing.assert_array_equal(f, feats)
    np.testing.assert_array_equal(c, coords)
    assert f.dtype == np.float32 and c.dtype == np.int64
    assert attrs["patch_size_level0"] == 448 and attrs["name"] == "slide-a"
    assert attrs["encoder"] == "test_tiny_patch14_reg4" and attrs["missing"] == "None"
    f2, c2 = clam_read(path)
    np.testing.assert_array_equal(f2.numpy(), feats)
    np.testing.assert_array_equal(c2, coords)
    with h5py.File(path, "r") as fh:  # TRIDENT puts name/encoder on `features` as well (WSI.py:1033)
        assert fh["features"].attrs["encoder"] == "test_tiny_patch14_reg4"
        assert fh["features"].chunks[0] > 1   # chunked by many rows, not one row per chunk
    back = read_features_h5(path)
    np.testing.assert_array_equal(back.features, feats)
    assert back.attrs["target_magnification"] == 20.0


def test_batched_writes_in_any_order(tmp_path):
    feats, coords = _data(100, 8)
    with FeaturesH5Writer(tmp_path / "b.h5", 100, 8, coords, {"name": "b"}) as writer:
        for start in (64, 0, 32, 96):
            writer.write(start, feats[start:start + 32])
    np.testing.assert_array_equal(read_features_h5(tmp_path / "b.h5").features, feats)


def test_nothing_half_written(tmp_path):
    feats, coords = _data(100, 8)
    dest = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="40 of 100 feature rows were never written"):
        with FeaturesH5Writer(dest, 100, 8, coords, {}) as writer:
            writer.write(0, feats[:60])
    with pytest.raises(KeyError):
        with FeaturesH5Writer(dest, 100, 8, coords, {}) as writer:
            writer.write(0, feats)
            raise KeyError("killed mid-slide")
    assert not dest.exists()
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_empty_bag_file(tmp_path):
    path = write_features_h5(tmp_path / "e.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64), {})
    c, f, _ = trident_read(path)
    assert f.shape == (0, 8) and c.shape == (0, 2)


def test_bad_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="missing.h5: features file not found"):
        read_features_h5(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ConfigError, match="junk.h5: not a readable HDF5 file"):
        read_features_h5(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "coords_only.h5", "w") as fh:
        fh["coords"] = np.zeros((3, 2), np.int64)
    with pytest.raises(ConfigError, match="coords_only.h5: not a features file"):
        read_features_h5(tmp_path / "coords_only.h5")


def test_partial_edge_chunk_and_chunk_straddling_batches(tmp_path):
    # D = 96 -> 2730 rows per chunk: 3000 rows leave an edge chunk of 270; batches of 37 straddle chunks.
    feats, coords = _data(3000, 96, seed=4)
    with FeaturesH5Writer(tmp_path / "s.h5", 3000, 96, coords, {}) as writer:
        for start in range(0, 3000, 37):
            writer.write(start, feats[start:start + 37])
    with h5py.File(tmp_path / "s.h5", "r") as fh:
        assert fh["features"].chunks == (2730, 96)
    f2, c2 = clam_read(tmp_path / "s.h5")
    np.testing.assert_array_equal(f2.numpy(), feats)
    np.testing.assert_array_equal(c2, coords)

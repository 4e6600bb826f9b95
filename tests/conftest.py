"""Shared fixtures. All real test data comes from one folder: $JWTH_TEST_DATA, default ../shared/data.

A missing data folder is an error, never a skip: a test suite that silently skips its real-data tests
would pass on a machine that tests nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from _gpu import pytest_runtest_makereport  # noqa: F401  (JWTH_REQUIRE_GPU=1 turns GPU skips into failures)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("JWTH_TEST_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def pytest_configure(config):
    if not (DATA_DIR / "wsi").is_dir():
        raise pytest.UsageError(
            f"test data folder {DATA_DIR} is missing (set JWTH_TEST_DATA to the shared data folder)"
        )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def cmu_small(data_dir) -> Path:
    return data_dir / "wsi" / "aperio_svs" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tcga_jp2k(data_dir) -> Path:
    return data_dir / "wsi" / "aperio_svs" / "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def tiny_svs(data_dir) -> Path:
    return data_dir / "wsi" / "aperio_svs" / "openslide-python-small.svs"


@pytest.fixture(scope="session")
def ndpi(data_dir) -> Path:
    return data_dir / "wsi" / "hamamatsu_ndpi" / "test3-DAPI-2-387.ndpi"


@pytest.fixture(scope="session")
def fixtures_dir(data_dir) -> Path:
    return data_dir / "fixtures_synthetic"


@pytest.fixture(scope="session")
def cli_cmd() -> list[str]:
    """The installed CLI, run as a subprocess of this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "jwth_engine.cli"]


@pytest.fixture()
def tiffs(tmp_path):
    """Generic tiled JPEG TIFFs written by tifffile: YCbCr 4:2:0 and 4:4:4, two levels."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    base = np.full((600, 700, 3), 245, np.uint8)
    base[100:500, 150:600] = (200, 90, 170)
    base += rng.integers(0, 40, base.shape, dtype=np.uint8)
    paths = []
    for sub in ((2, 2), (1, 1)):
        path = tmp_path / f"ycbcr{sub[0]}.tif"
        with tifffile.TiffWriter(path) as tw:
            for level, image in enumerate((base, np.ascontiguousarray(base[::2, ::2]))):
                tw.write(image, tile=(128, 128), compression="jpeg", photometric="ycbcr", subsampling=sub,
                         subfiletype=level, resolution=(20000 / 2 ** level,) * 2, resolutionunit="CENTIMETER")
        paths.append(path)
    return paths

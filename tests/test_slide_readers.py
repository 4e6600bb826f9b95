"""Slide readers on real slides: metadata, pixels against OpenSlide, reader choice, bad input.

Anything that may crash natively (cuCIM segfaults on boxes.tiff) runs in a subprocess, so a bug in
the crash-isolating probe fails a test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from jwth_engine.errors import MppError, SlideError
from jwth_engine.slide import (
    SlideInfo,
    level0_to_level,
    level_to_level0,
    open_slide,
    probe_slide,
    resolve_mpp,
)

REPO_PYTHON = Path(__file__).resolve().parents[1] / "python"


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_PYTHON), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# --- CMU-1: cuCIM, and the same pixels as OpenSlide ------------------------------------------------

@pytest.fixture(scope="module")
def cmu_pair(cmu_small):
    with open_slide(cmu_small) as auto, open_slide(cmu_small, reader="openslide") as reference:
        yield auto, reference


def test_cmu_metadata(cmu_pair):
    slide, reference = cmu_pair
    info = slide.info
    assert info.reader == "cucim" and info.reader_note
    assert info.vendor == "aperio"
    assert info.level_count == 1 and info.level_dimensions == ((2220, 2967),)
    assert info.level_downsamples == (1.0,) and info.level_tile_sizes == ((240, 240),)
    assert info.mpp == pytest.approx((0.499, 0.499)) and info.mpp_source == "aperio.MPP"
    assert info.objective == 20 and info.compression == "JPEG"
    assert set(info.associated_images) == {"label", "macro", "thumbnail"}
    assert resolve_mpp(info, None) == pytest.approx(0.499)
    # OpenSlide sees the same slide
    ref = reference.info
    assert ref.reader == "openslide" and ref.vendor == "aperio"
    assert ref.level_dimensions == info.level_dimensions and ref.level_tile_sizes == info.level_tile_sizes
    assert ref.mpp == pytest.approx(info.mpp) and ref.mpp_source == "openslide.mpp-x"
    json.dumps(info.to_dict())
    assert info.to_dict()["level_tile_sizes"] == [[240, 240]]


@pytest.mark.parametrize("location,size", [
    ((0, 0), (64, 64)),
    ((1000, 1500), (300, 200)),
    ((2100, 2900), (224, 224)),   # overhangs the right and bottom edges: padded
    ((-10, -20), (50, 40)),       # overhangs the top-left corner
    ((5000, 5000), (16, 16)),     # entirely outside
])
def test_cmu_pixels_equal_openslide(cmu_pair, location, size):
    slide, reference = cmu_pair
    ours, theirs = slide.read_region(location, 0, size), reference.read_region(location, 0, size)
    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)


def test_edge_padding_is_white(cmu_pair):
    slide, _ = cmu_pair
    region = slide.read_region((2100, 2900), 0, (224, 224))
    # 2220 - 2100 = 120 columns and 2967 - 2900 = 67 rows are inside
    assert (region[:, 120:] == 255).all() and (region[67:, :] == 255).all()
    assert region[:67, :120].std() > 0  # real image content inside


def test_read_regions_equals_read_region(cmu_pair):
    slide, reference = cmu_pair
    locations = [(0, 0), (240, 240), (1000, 1500), (2100, 2900), (17, 2950), (1999, 3)]
    expected = [slide.read_region(loc, 0, (224, 224)) for loc in locations]
    for handle in (slide, reference):
        for workers in (0, 1, 3):
            got = list(handle.read_regions(locations, 0, (224, 224), num_workers=workers))
            assert len(got) == len(locations)
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(a, b)


def test_read_regions_many_batches_and_early_stop(cmu_pair):
    slide, _ = cmu_pair
    locations = [(x, y) for y in range(0, 2967, 224) for x in range(0, 2220, 224)]
    batched = np.stack(list(slide.read_regions(locations, 0, (224, 224), num_workers=2)))
    single = np.stack([slide.read_region(loc, 0, (224, 224)) for loc in locations])
    np.testing.assert_array_equal(batched, single)
    iterator = slide.read_regions(locations, 0, (224, 224), num_workers=2)
    first = next(iterator)
    iterator.close()  # a consumer that stops early must not leave anything broken
    np.testing.assert_array_equal(first, single[0])


def test_reads_from_threads_use_their_own_handles(cmu_pair):
    slide, _ = cmu_pair
    locations = [(x, 1000) for x in range(0, 2000, 100)]
    expected = [slide.read_region(loc, 0, (128, 128)) for loc in locations]
    results: dict[int, list] = {}

    def work(k):
        results[k] = [slide.read_region(loc, 0, (128, 128)) for loc in locations]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for a, b in zip(results[k], expected):
            np.testing.assert_array_equal(a, b)


def test_thumbnail(cmu_pair):
    slide, reference = cmu_pair
    thumb, ds = slide.thumbnail(512)
    assert thumb.dtype == np.uint8 and thumb.ndim == 3 and max(thumb.shape[:2]) <= 512
    assert ds == 6.0  # ceil(2967 / 512): integer block averaging of level 0
    assert thumb.shape[:2] == (495, 370)
    ref_thumb, ref_ds = reference.thumbnail(512)
    assert ref_ds == ds
    np.testing.assert_array_equal(thumb, ref_thumb)  # same pixels in, same blocks out
    full, ds_full = slide.thumbnail(4096)  # larger than the slide: level 0 itself
    assert ds_full == 1.0 and full.shape == (2967, 2220, 3)


def test_bad_arguments(cmu_pair):
    slide, _ = cmu_pair
    with pytest.raises(ValueError, match="level 1 out of range"):
        slide.read_region((0, 0), 1, (10, 10))
    with pytest.raises(ValueError, match="positive"):
        slide.read_region((0, 0), 0, (0, 10))
    with pytest.raises(ValueError, match="level"):
        slide.read_regions([(0, 0)], 3, (10, 10))  # checked eagerly, not on first next()
    with pytest.raises(ValueError, match="reader must be one of"):
        open_slide(slide.path, reader="tifffile")


def test_closed_slide_refuses_reads(cmu_small):
    slide = open_slide(cmu_small)
    slide.close()
    with pytest.raises(ValueError, match="closed"):
        slide.read_region((0, 0), 0, (8, 8))


def test_probe_is_cheap(cmu_small):
    probe_slide(cmu_small, method="forkserver")  # warm: the first call starts the server (imports cuCIM)
    result = probe_slide(cmu_small, method="forkserver")
    assert result.ok and result.reason == "" and result.signal is None and result.method == "forkserver"
    assert result.seconds < 0.5, result  # ~10 ms here; generous for a loaded CI machine


def test_probe_method_choice(monkeypatch, cmu_small):
    from jwth_engine.slide.probe import PROBE_ENV, default_method

    monkeypatch.setenv(PROBE_ENV, "spawn")
    assert default_method() == "spawn"
    monkeypatch.setenv(PROBE_ENV, "fork")      # no longer offered: forking the caller is unsafe
    assert default_method() == "forkserver"
    monkeypatch.delenv(PROBE_ENV)
    assert default_method() == "forkserver"
    with pytest.raises(ValueError, match="forkserver"):
        probe_slide(cmu_small, method="fork")


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_probe_methods_agree(method, cmu_small, fixtures_dir):
    assert probe_slide(cmu_small, method=method).ok
    bad = probe_slide(fixtures_dir / "unreadable.svs", method=method)
    assert not bad.ok and "decode error" in bad.reason and "Bogus marker length" in bad.reason
    missing_plugin = probe_slide(fixtures_dir / "unopenable.tiff", method=method)
    assert not missing_plugin.ok and "52479" in missing_plugin.reason


# --- TCGA JPEG 2000 without MPP ----------------------------------------------------------------------

def test_tcga_jp2k_needs_mpp(tcga_jp2k):
    with open_slide(tcga_jp2k) as slide:
        info = slide.info
        assert info.reader == "cucim" and info.vendor == "aperio"
        assert info.level_count == 2 and info.level_dimensions == ((4443, 3567), (2221, 1783))
        assert info.level_tile_sizes == ((256, 256), (256, 256))
        assert "JPEG 2000" in info.compression
        assert info.mpp is None and info.mpp_source == "none" and info.objective is None
        with pytest.raises(MppError) as err:
            resolve_mpp(info, None)
        line = one_line(err.value)
        # The API names the setting (`mpp`); the CLI names its flag.
        assert "pass mpp" in line and "--mpp" not in line and str(tcga_jp2k) in line
        assert err.value.field == "mpp" and "pass --mpp (e.g. --mpp 0.25" in err.value.cli_message("--mpp")
        assert resolve_mpp(info, 0.25) == 0.25
        for bad in (0.0, -1.0, 100.0, float("nan")):
            with pytest.raises(MppError, match=r"\bmpp .* outside the plausible range"):
                resolve_mpp(info, bad)


def test_tcga_jp2k_decodes_like_openslide(tcga_jp2k):
    with open_slide(tcga_jp2k) as slide, open_slide(tcga_jp2k, reader="openslide") as reference:
        for location, level, size in [((1000, 1000), 0, (300, 300)), ((0, 0), 0, (4443, 3567)),
                                      ((0, 0), 1, (2221, 1783))]:
            ours = slide.read_region(location, level, size).astype(np.int16)
            theirs = reference.read_region(location, level, size).astype(np.int16)
            # Two JPEG 2000 decoders: identical but for a handful of pixels one level apart.
            assert np.abs(ours - theirs).max() <= 1
            assert (ours != theirs).mean() < 1e-5


def test_level_coordinates_round_trip(tcga_jp2k):
    ds = 2.0005054473876953  # the TCGA slide's level-1 downsample in cuCIM
    for d in (1.0, 2.0, 4.0, ds, 4.000202, 16.0008, 3.0):
        for v in (0, 1, 2, 447, 448, 449, 2220, 100_000):
            x0 = level_to_level0(v, d)
            assert level0_to_level(x0, d) == v
            assert x0 == 0 or level0_to_level(x0 - 1, d) == v - 1  # smallest such x0
    # and the reader agrees: a level-1 block read through level-0 coordinates is that block
    with open_slide(tcga_jp2k) as slide:
        ds1 = slide.info.level_downsamples[1]
        level1 = slide.read_region((0, 0), 1, slide.info.level_dimensions[1])
        for xl, yl in [(448, 448), (1344, 896), (500, 400)]:
            region = slide.read_region((level_to_level0(xl, ds1), level_to_level0(yl, ds1)), 1, (64, 64))
            np.testing.assert_array_equal(region, level1[yl:yl + 64, xl:xl + 64])


# --- NDPI: OpenSlide ----------------------------------------------------------------------------------

def test_ndpi_opens_with_openslide(ndpi):
    with open_slide(ndpi) as slide:
        info = slide.info
        assert info.reader == "openslide" and "NDPI" in info.reader_note
        assert info.vendor == "hamamatsu" and info.compression == "JPEG"
        assert info.mpp == pytest.approx((0.228, 0.228), abs=1e-3)
        assert info.level_dimensions[0] == (3968, 4864) and info.objective == 40
        region = slide.read_region((1000, 1000), 0, (256, 256))
        assert region.shape == (256, 256, 3)
        got = list(slide.read_regions([(0, 0), (3900, 4800)], 2, (128, 128), num_workers=2))
        np.testing.assert_array_equal(got[1], slide.read_region((3900, 4800), 2, (128, 128)))
    with pytest.raises(SlideError, match="cuCIM cannot read Hamamatsu NDPI"):
        open_slide(ndpi, reader="cucim")


# --- a tiny pyramidal tiled JPEG TIFF written here: generic TIFF with resolution tags ---------------

@pytest.fixture()
def pyramid_tiff(tmp_path) -> Path:
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    base = np.full((600, 700, 3), 245, np.uint8)
    base[100:500, 150:600] = (200, 90, 170)
    base += rng.integers(0, 8, base.shape, dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    # 0.5 µm/px = 20000 px/cm
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(128, 128), compression="jpeg", photometric="rgb",
                 resolution=(20000, 20000), resolutionunit="CENTIMETER")
        tw.write(np.ascontiguousarray(base[::2, ::2]), tile=(128, 128), compression="jpeg", photometric="rgb",
                 subfiletype=1, resolution=(10000, 10000), resolutionunit="CENTIMETER")
    return path


def test_generic_tiff_mpp_from_resolution_tags(pyramid_tiff):
    with open_slide(pyramid_tiff) as slide, open_slide(pyramid_tiff, reader="openslide") as reference:
        info = slide.info
        assert info.reader == "cucim" and info.vendor == "generic-tiff"
        assert info.mpp_source == "tiff.XResolution" and info.mpp == pytest.approx((0.5, 0.5))
        assert info.level_dimensions == ((700, 600), (350, 300)) and info.level_tile_sizes[0] == (128, 128)
        assert info.compression == "JPEG" and info.objective is None and info.associated_images == ()
        assert resolve_mpp(info, None) == pytest.approx(0.5)
        assert reference.info.mpp == pytest.approx((0.5, 0.5))
        for location, level, size in [((0, 0), 0, (700, 600)), ((600, 500), 0, (200, 200)),
                                      ((0, 0), 1, (350, 300)), ((300, 200), 1, (128, 128))]:
            np.testing.assert_array_equal(slide.read_region(location, level, size),
                                          reference.read_region(location, level, size))
        # a region larger than the whole level (cuCIM refuses those; we clip and pad)
        big = slide.read_region((-100, -100), 1, (600, 500))
        np.testing.assert_array_equal(big, reference.read_region((-100, -100), 1, (600, 500)))
        assert (big[:50] == 255).all() and (big[:, :50] == 255).all()


def test_tiny_slide_smaller_than_a_tile(tiny_svs):
    with open_slide(tiny_svs) as slide, open_slide(tiny_svs, reader="openslide") as reference:
        assert slide.info.level_dimensions == ((16, 16),) and slide.info.level_tile_sizes == ((64, 64),)
        region = slide.read_region((0, 0), 0, (224, 224))
        np.testing.assert_array_equal(region, reference.read_region((0, 0), 0, (224, 224)))
        assert (region[16:] == 255).all() and (region[:, 16:] == 255).all()
        tiles = list(slide.read_regions([(0, 0), (8, 8)], 0, (224, 224), num_workers=2))
        np.testing.assert_array_equal(tiles[0], region)
        thumb, ds = slide.thumbnail()
        assert thumb.shape == (16, 16, 3) and ds == 1.0


# --- crash isolation and broken files (subprocesses: a native crash must not take pytest down) -----

def test_boxes_tiff_cucim_crash_falls_back_to_openslide(fixtures_dir):
    path = fixtures_dir / "boxes.tiff"
    proc = run_python(f"""
import json
from jwth_engine.errors import MppError
from jwth_engine.slide import open_slide, probe_slide, resolve_mpp
probe = probe_slide({str(path)!r})
spawned = probe_slide({str(path)!r}, method="spawn")
with open_slide({str(path)!r}) as slide:
    info = slide.info.to_dict()
    region = slide.read_region((0, 0), 0, (64, 64))
try:
    resolve_mpp(slide.info, None)
    mpp_error = None
except MppError as exc:
    mpp_error = str(exc)
print(json.dumps({{"probe_ok": probe.ok, "signal": probe.signal, "spawned": [spawned.ok, spawned.signal],
                  "info": info, "mpp_error": mpp_error,
                  "region": list(region.shape), "override": resolve_mpp(slide.info, 0.5)}}))
""")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["probe_ok"] is False and out["signal"] == "SIGSEGV"
    assert out["spawned"] == [False, "SIGSEGV"]
    info = out["info"]
    assert info["reader"] == "openslide" and info["vendor"] == "generic-tiff"
    assert "crashed" in info["reader_note"] and "SIGSEGV" in info["reader_note"]
    assert info["compression"] == "deflate" and info["level_count"] == 4
    assert out["region"] == [64, 64, 3] and out["override"] == 0.5
    line = out["mpp_error"]
    assert line and "pass mpp" in line and "boxes.tiff" in line and "352" in line and "\n" not in line


def test_boxes_tiff_forced_cucim_is_a_clean_error(fixtures_dir):
    path = fixtures_dir / "boxes.tiff"
    proc = run_python(f"""
from jwth_engine.errors import SlideError
from jwth_engine.slide import open_slide
try:
    open_slide({str(path)!r}, reader="cucim")
except SlideError as exc:
    print("ERR", exc)
""")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERR ") and "boxes.tiff" in line and "SIGSEGV" in line and "--reader auto" in line


def _broken_inputs(fixtures_dir, cmu_small, tmp_path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(cmu_small.read_bytes()[:100_000])
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    garbage = tmp_path / "garbage.ndpi"
    garbage.write_bytes(b"\x00" * 4096)
    return {
        "missing": (tmp_path / "nope.svs", "file not found"),
        "text": (text, "not a slide file"),
        "truncated": (truncated, "truncated"),
        "empty": (empty, "empty"),
        "folder": (folder, "folder"),
        "garbage_ndpi": (garbage, "not a slide format"),
        "unopenable": (fixtures_dir / "unopenable.tiff", "52479"),
        "unreadable_region": (fixtures_dir / "unreadable.svs", "cannot decode region at \\(0, 0\\) level 0"),
    }


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "empty", "folder", "garbage_ndpi",
                                  "unopenable", "unreadable_region"])
@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_broken_inputs_one_line_errors(case, reader, fixtures_dir, cmu_small, tmp_path):
    path, pattern = _broken_inputs(fixtures_dir, cmu_small, tmp_path)[case]
    proc = run_python(f"""
from jwth_engine.errors import SlideError
from jwth_engine.slide import open_slide
try:
    with open_slide({str(path)!r}, reader={reader!r}) as slide:
        slide.read_region((0, 0), 0, (16, 16))
        print("NO ERROR", slide.info.reader)
except SlideError as exc:
    print("ERR", exc)
""")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERR ") and path.name in line, line
    if reader == "auto" or case not in ("text", "garbage_ndpi", "unopenable", "unreadable_region"):
        import re

        assert re.search(pattern, line, re.I), line


def test_unreadable_region_in_process(fixtures_dir):
    # cuCIM prints (not raises) this JPEG error; the probe sees it and hands the file to OpenSlide.
    path = fixtures_dir / "unreadable.svs"
    with open_slide(path) as slide:
        assert slide.info.reader == "openslide" and "decode error" in slide.info.reader_note
        with pytest.raises(SlideError) as err:
            slide.read_region((0, 0), 0, (16, 16))
        line = one_line(err.value)
        assert "unreadable.svs" in line and "Bogus marker length" in line
        with pytest.raises(SlideError, match="unreadable.svs"):
            list(slide.read_regions([(0, 0), (8, 8)], 0, (8, 8), num_workers=2))


def test_slide_info_is_frozen(cmu_small):
    with open_slide(cmu_small) as slide:
        assert isinstance(slide.info, SlideInfo)
        with pytest.raises(AttributeError):
            slide.info.mpp = (1.0, 1.0)

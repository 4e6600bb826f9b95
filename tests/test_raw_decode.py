"""The raw-tile decode path (slide/raw_tiles.py, slide/nvimgcodec_decoder.py, slide/decoding.py).

Every stored tile decoded from its raw bytes is compared with an independent decoder's pixels:
OpenSlide's (libjpeg-turbo / OpenJPEG inside OpenSlide), and for levels OpenSlide renders at
sub-pixel offsets, OpenJPEG through imagecodecs on the same bytes. Measured tolerances, stated:
JPEG on nvImageCodec's CPU backend is bit-exact; JPEG 2000 on it is bit-exact against OpenSlide
and imagecodecs and within 1 level of cuCIM.

GPU tests run wherever torch sees a CUDA device and skip, at run time, elsewhere.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import sys
import warnings

from collections import Counter

import numpy as np
import pytest
import torch
from _gpu import gpu_skip

from jwth_engine.errors import BackendUnavailable, ConfigError, SlideError
from jwth_engine.pipeline import TilePrefetcher
from jwth_engine.pipeline.locality import GridReader, iter_batches
from jwth_engine.slide import open_slide
from jwth_engine.slide.base import level_to_level0
from jwth_engine.slide.decoding import DecodeRequest, choose_decoder, reader_for, resolve_decode
from jwth_engine.slide.nvimgcodec_check import codec_checks, gpu_decode_available
from jwth_engine.slide.nvimgcodec_decoder import TileDecoder, ycbcr_to_rgb
from jwth_engine.slide.raw_tiles import RawLevelUnavailable, RawTileSource
from jwth_engine.tiling import plan_tiles
from jwth_engine.tissue import detect_tissue

openslide = pytest.importorskip("openslide")
CPU = DecodeRequest("cpu", "test")


def _gpu() -> bool:
    return torch.cuda.is_available()


def _openslide_tile(reference, raw, index):
    """OpenSlide's pixels of a stored tile's area, cut to the level (edge tiles are smaller)."""
    col, row = raw.position(index)
    w = min(raw.tile_w, raw.width - col * raw.tile_w)
    h = min(raw.tile_h, raw.height - row * raw.tile_h)
    ds = reference.level_downsamples[raw.level]
    region = np.asarray(reference.read_region((round(col * raw.tile_w * ds), round(row * raw.tile_h * ds)),
                                              raw.level, (w, h)))
    return region[..., :3], w, h


def _all_tiles(path, level):
    reference = openslide.OpenSlide(str(path))
    source = RawTileSource(str(path), reference.level_dimensions)
    raw = source.level(level)
    decoder = TileDecoder(source, raw, backend="cpu")
    tiles = decoder.decode(range(raw.tiles_across * raw.tiles_down))
    return reference, raw, decoder, tiles


@pytest.mark.parametrize("name", ["cmu_small", "tiny_svs"])
def test_jpeg_tiles_equal_openslide_exactly(request, name):
    """Aperio JPEG (RGB components): every stored tile, edges included, bit-exact; outside the level white."""
    reference, raw, decoder, tiles = _all_tiles(request.getfixturevalue(name), 0)
    try:
        assert raw.codec == "jpeg" and raw.colour == "rgb" and len(tiles) == raw.tiles_across * raw.tiles_down
        for index, tile in enumerate(tiles):
            theirs, w, h = _openslide_tile(reference, raw, index)
            assert tile.shape == (raw.tile_h, raw.tile_w, 3)
            np.testing.assert_array_equal(tile[:h, :w], theirs, err_msg=f"tile {raw.position(index)}")
            assert (tile[h:] == 255).all() and (tile[:, w:] == 255).all()
    finally:
        decoder.close()
        reference.close()


def test_jpeg2000_tiles_within_measured_tolerance(tcga_jp2k):
    """Aperio JPEG 2000, both levels. Level 0 against OpenSlide; level 1 (downsample 2.0005,
    which OpenSlide renders at sub-pixel offsets) against OpenJPEG on the same bytes."""
    imagecodecs = pytest.importorskip("imagecodecs")
    reference, raw, decoder, tiles = _all_tiles(tcga_jp2k, 0)
    try:
        assert raw.codec == "jpeg2000"
        worst = max(int(np.abs(tile[:h, :w].astype(int) - theirs.astype(int)).max())
                    for index, tile in enumerate(tiles)
                    for theirs, w, h in [_openslide_tile(reference, raw, index)])
        assert worst <= 1, worst          # measured: 0
    finally:
        decoder.close()
    reference, raw, decoder, tiles = _all_tiles(tcga_jp2k, 1)
    try:
        data = decoder.source.read(raw, range(len(tiles)))
        for index, (tile, stream) in enumerate(zip(tiles, data)):
            col, row = raw.position(index)
            w = min(raw.tile_w, raw.width - col * raw.tile_w)
            h = min(raw.tile_h, raw.height - row * raw.tile_h)
            np.testing.assert_array_equal(tile[:h, :w], imagecodecs.jpeg2k_decode(stream)[:h, :w])
    finally:
        decoder.close()
        reference.close()


def _grids(slide, mpp, target):
    return plan_tiles(slide, slide_mpp=mpp, target_mpp=target, tile_size=224, tissue=detect_tissue(slide, mpp=mpp),
                      min_tissue=0.0)


@pytest.mark.parametrize("name,mpp,target,level", [
    ("cmu_small", 0.499, 0.5, 0),          # 224 of 240 px stored tiles: every tile spans up to four
    ("cmu_small", 0.499, 0.83, 0),         # read size 372 > stored tile: stored tiles shared by more
    ("tcga_jp2k", 0.25, 1.0, 1),           # level 1, non-integer downsample, JPEG 2000
    ("philips_tiff", 0.25, 0.5, 1),        # Philips: level 1's page padded past the level, sparse level 0
])
def test_model_tiles_equal_reader_path(request, name, mpp, target, level):
    """Model tiles cut from raw-decoded stored tiles equal the reader's, edge tiles included; each
    stored tile is decoded once however many model tiles share it."""
    path = request.getfixturevalue(name)
    with open_slide(path) as slide:
        grid = _grids(slide, mpp, target)
        assert grid.level == level
        choice = choose_decoder(slide, grid.level, CPU, num_threads=2)
        assert choice.decoder is not None and choice.name == "nvimgcodec-cpu", choice.note
        assert choice.test_tile["max_abs_diff"] <= 1
        raw_reader = GridReader(slide, grid, decode=choice)
        ref_reader = GridReader(slide, grid, locality="off")
        try:
            ours = np.concatenate(list(iter_batches(raw_reader, 16)))
            theirs = np.concatenate(list(iter_batches(ref_reader, 16)))
            tolerance = 0 if name == "cmu_small" else 1    # cuCIM vs OpenJPEG-in-nvImageCodec: ±1
            assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= tolerance
            # Edges: the grid reaches past the level's right and bottom; the reader pads white.
            ds = slide.info.level_downsamples[level]
            width, height = slide.info.level_dimensions[level]
            xl = np.floor(np.asarray(grid.coords)[:, 0] / ds).astype(int)
            assert (xl + grid.read_size > width).any()
            raw = choice.decoder.raw
            touched = set()
            for i in range(len(grid.coords)):
                touched.update(raw_reader._tile_units(i))
            assert raw_reader.counters.regions == len(touched) == choice.decoder.tiles_decoded - 1  # + test tile
            # JPEG on the CPU: each stored tile decoded only over what the grid needs of it.
            whole = len(touched) * raw.tile_w * raw.tile_h
            if raw.codec == "jpeg":
                assert choice.decoder.decodes_regions
                assert raw_reader.counters.needed_px <= raw_reader.counters.decoded_px < whole
            else:
                assert not choice.decoder.decodes_regions and raw_reader.counters.decoded_px == whole
            assert raw_reader.plan.mode == "raw-tiles"
        finally:
            raw_reader.close()
            ref_reader.close()


def test_generic_ycbcr_jpeg_tiff_equals_openslide(tiffs):
    for path in tiffs:
        for level in (0, 1):
            reference, raw, decoder, tiles = _all_tiles(path, level)
            try:
                assert raw.colour == "ycbcr"
                for index, tile in enumerate(tiles):
                    theirs, w, h = _openslide_tile(reference, raw, index)
                    np.testing.assert_array_equal(tile[:h, :w], theirs)
            finally:
                decoder.close()
                reference.close()


def _stored_tile(path, col: int, row: int) -> tuple[int, int, int, int]:
    """Stored tile (col, row) of a file's first directory: (byte offset, byte count, file offset of
    its TileByteCounts entry, that entry's size)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = row * math.ceil(page.imagewidth / page.tilewidth) + col
        tag = page.tags["TileByteCounts"]
        assert tag.dtype in (4, 16)         # LONG or LONG8 entries
        size = 4 if tag.dtype == 4 else 8
        return int(page.dataoffsets[index]), int(page.databytecounts[index]), tag.valueoffset + index * size, size


def _philips_xml(spacings_mm) -> str:
    """The ImageDescription OpenSlide's Philips detector and level-size fix-up read: a DPUfsImport
    DataObject with one WSI image and a DICOM_PIXEL_SPACING (mm, row then column) per level."""
    def spacing(mm):
        return (f'<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
                f'&quot;{mm:.6f}&quot; &quot;{mm:.6f}&quot;</Attribute>')
    levels = "".join(f'<DataObject ObjectType="PixelDataRepresentation">{spacing(mm)}</DataObject>'
                     for mm in spacings_mm)
    return ('<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
            '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray">'
            '<Array><DataObject ObjectType="DPScannedImage">'
            '<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">WSI</Attribute>'
            + spacing(spacings_mm[0]) +
            '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" '
            f'PMSVR="IDataObjectArray"><Array>{levels}</Array></Attribute>'
            '</DataObject></Array></Attribute></DataObject>')


PHILIPS_SPARSE = ((0, 0), (7, 5))   # level-0 tiles left unstored, as Philips writes around scanned areas


@pytest.fixture()
def philips_tiff(tmp_path):
    """A Philips-layout TIFF: tiled YCbCr JPEG, Software "Philips", the XML description, levels
    below the first padded to whole tiles with non-background pixels (readers clip them off),
    and two level-0 tiles not stored (byte count 0)."""
    tifffile = pytest.importorskip("tifffile")
    tile = 128
    rng = np.random.default_rng(1)
    base = np.full((896, 1152, 3), 240, np.uint8)        # 9 x 7 tiles
    base[100:700, 150:1000] = (190, 80, 160)
    base += rng.integers(0, 40, base.shape, dtype=np.uint8)
    path = tmp_path / "philips.tiff"
    with tifffile.TiffWriter(path) as tw:
        for level in range(3):
            image = base[::2 ** level, ::2 ** level]
            h, w = image.shape[:2]
            page = np.empty((-(-h // tile) * tile, -(-w // tile) * tile, 3), np.uint8)
            page[...] = (20, 200, 20)
            page[:h, :w] = image
            first = dict(description=_philips_xml([0.00025 * 2 ** k for k in range(3)]),
                         software="Philips DP v1.0", metadata=None) if level == 0 else {}
            tw.write(page, tile=(tile, tile), compression="jpeg", photometric="ycbcr", subsampling=(2, 2),
                     subfiletype=1 if level else 0, **first)
    for col, row in PHILIPS_SPARSE:
        _, _, entry, size = _stored_tile(path, col, row)
        with open(path, "r+b") as fh:
            fh.seek(entry)
            fh.write(bytes(size))
    return path


@pytest.mark.parametrize("reader", ["openslide", "cucim"])
def test_philips_tiff_every_level_raw_and_equal_to_reader(philips_tiff, reader):
    """Philips TIFF: the padded pages of the lower levels are found (tifffile's Philips series
    gives their level sizes, as OpenSlide and cuCIM clip them) and decoded raw; each level equals the reader's whole-level read exactly, the padding is
    white like the reader's clip, and unstored tiles are white background."""
    with open_slide(philips_tiff, reader=reader) as slide:
        assert slide.info.vendor == "philips" and slide.info.reader == reader
        assert slide.info.level_dimensions == ((1152, 896), (576, 448), (288, 224))
        for level, (width, height) in enumerate(slide.info.level_dimensions):
            choice = choose_decoder(slide, level, CPU)
            try:
                assert choice.name == "nvimgcodec-cpu", choice.note
                raw = choice.decoder.raw
                assert (raw.width, raw.height) == (width, height)
                tiles = choice.decoder.decode(range(raw.tiles_across * raw.tiles_down))
            finally:
                if choice.decoder is not None:
                    choice.decoder.close()
            mosaic = np.zeros((raw.tiles_down * raw.tile_h, raw.tiles_across * raw.tile_w, 3), np.uint8)
            for index, tile in enumerate(tiles):
                col, row = raw.position(index)
                mosaic[row * raw.tile_h:(row + 1) * raw.tile_h, col * raw.tile_w:(col + 1) * raw.tile_w] = tile
            np.testing.assert_array_equal(mosaic[:height, :width], slide.read_region((0, 0), level, (width, height)))
            assert (mosaic[height:] == 255).all() and (mosaic[:, width:] == 255).all()   # padding clipped
            if level == 0:
                for col, row in PHILIPS_SPARSE:
                    assert (tiles[raw.index(col, row)] == 255).all()
    # The fixture does pad: the stored pages of levels 1 and 2 are larger than the levels.
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffFile(philips_tiff) as tif:
        assert [(int(p.imagewidth), int(p.imagelength)) for p in tif.pages] == [(1152, 896), (640, 512), (384, 256)]


def _unsort_first_directory(path) -> None:
    """Swap the first two tag entries of the first TIFF directory: still readable, but libtiff
    warns "tags are not sorted in ascending order"."""
    with open(path, "r+b") as fh:
        head = fh.read(8)
        assert head[:2] == b"II"
        (offset,) = struct.unpack("<I", head[4:8])
        fh.seek(offset)
        (count,) = struct.unpack("<H", fh.read(2))
        entries = [fh.read(12) for _ in range(count)]
        entries[0], entries[1] = entries[1], entries[0]
        fh.seek(offset + 2)
        fh.write(b"".join(entries))


def test_probe_decides_on_pixels_not_printed_warnings(tiffs, tmp_path):
    """A valid tiled JPEG TIFF whose tags are out of order makes libtiff print a warning with
    "Invalid" in it; the probe compares pixels and keeps cuCIM (it used to grep and fall back)."""
    from jwth_engine.slide import probe_slide

    path = tmp_path / "unsorted.tif"
    shutil.copy(tiffs[0], path)
    _unsort_first_directory(path)
    result = probe_slide(path)
    assert result.ok, result
    assert "not sorted" in result.output      # the warning is still printed, and ignored
    with open_slide(path) as slide:
        assert slide.info.reader == "cucim"


def _truncate_tile(src, dst, col: int, row: int) -> None:
    """Copy `src` and cut stored tile (col, row) of level 0 to half its bytes (TileByteCounts)."""
    shutil.copy(src, dst)
    _, count, entry, size = _stored_tile(dst, col, row)
    with open(dst, "r+b") as fh:
        fh.seek(entry)
        fh.write((count // 2).to_bytes(size, "little"))


def test_truncated_stored_tile_fails_with_one_line(cmu_small, tmp_path):
    bad = tmp_path / "truncated.svs"
    _truncate_tile(cmu_small, bad, 2, 3)
    with open_slide(bad) as slide:
        grid = _grids(slide, 0.499, 0.5)
        prefetcher = TilePrefetcher(slide, grid, batch_size=16, decode=CPU)
        assert prefetcher.plan.mode == "raw-tiles"
        with pytest.raises(SlideError) as err, prefetcher:
            for batch in prefetcher:
                batch.release()
    line = str(err.value)
    assert "\n" not in line and "truncated.svs" in line
    assert "stored tile (col 2, row 3) of level 0" in line and "truncated" in line


def test_corrupt_stored_tile_fails_with_one_line(cmu_small, tmp_path):
    """A stored tile whose middle quarter is overwritten with random bytes (seeded: the stream then
    holds a marker libjpeg cannot take) is not decoded into garbage: one line names the tile."""
    bad = tmp_path / "corrupt.svs"
    shutil.copy(cmu_small, bad)
    offset, count, _, _ = _stored_tile(bad, 2, 3)
    with open(bad, "r+b") as fh:
        fh.seek(offset + count // 4)
        fh.write(np.random.default_rng(0).integers(0, 256, count // 4, dtype=np.uint8).tobytes())
    with open_slide(bad, reader="openslide") as slide:
        source = RawTileSource(str(bad), slide.info.level_dimensions)
        raw = source.level(0)
        decoder = TileDecoder(source, raw, backend="cpu")
        index = raw.index(2, 3)
        try:
            with pytest.raises(SlideError) as err:
                decoder.decode([index - 1, index, index + 1])
        finally:
            decoder.close()
    line = str(err.value)
    assert "\n" not in line and "corrupt.svs" in line
    assert "stored tile (col 2, row 3) of level 0" in line and "cannot be decoded" in line


def test_truncated_tile_score_cli(cli_cmd, cmu_small, tmp_path):
    bad = tmp_path / "truncated.svs"
    _truncate_tile(cmu_small, bad, 2, 3)
    out = tmp_path / "out"
    proc = subprocess.run(cli_cmd + ["score", str(bad), "--model", "test_tiny_patch14_reg4", "--out", str(out),
                                     "--min-tissue", "0", "--decode", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stored tile (col 2, row 3) of level 0" in errors[0], proc.stderr
    assert not list(out.glob("*.json")) and not list(out.glob("*.parquet"))


@pytest.mark.parametrize("name,why", [("ndpi", "strips"), ("boxes", "compression 8")])
def test_formats_without_raw_path_fall_back_and_say_so(request, fixtures_dir, name, why):
    path = fixtures_dir / "boxes.tiff" if name == "boxes" else request.getfixturevalue(name)
    with open_slide(path) as slide:
        choice = choose_decoder(slide, 0, CPU)
        assert choice.decoder is None and choice.name == slide.info.reader
        assert why in choice.note or "NDPI" in choice.note, choice.note
        assert choice.to_dict()["why"] == choice.note


def test_raw_level_reasons(ndpi, fixtures_dir):
    with pytest.raises(RawLevelUnavailable, match="strips"):
        RawTileSource(str(ndpi), [(3968, 4864)]).level(0)
    with pytest.raises(RawLevelUnavailable, match="no tiled TIFF directory"):
        RawTileSource(str(fixtures_dir / "boxes.tiff"), [(123, 45)]).level(0)


def test_decode_option_resolution(monkeypatch):
    assert reader_for("cucim", "auto") == "cucim" and reader_for("cpu", "openslide") == "openslide"
    with pytest.raises(ConfigError, match="contradicts"):
        reader_for("cucim", "openslide")
    assert resolve_decode("openslide", torch.device("cpu")).backend is None
    assert resolve_decode("cpu", torch.device("cpu")).backend == "cpu"
    assert resolve_decode("auto", torch.device("cpu")).backend == "cpu"
    # The region path keeps the reader for `auto` without a GPU model, and says why; explicit
    # `cpu` is still honoured there.
    region = resolve_decode("auto", torch.device("cpu"), auto_cpu="blocks read by the reader")
    assert region.backend is None and region.why == "auto: no GPU in use; blocks read by the reader"
    assert resolve_decode("cpu", torch.device("cpu"), auto_cpu="x").backend == "cpu"
    if not _gpu():
        with pytest.raises(BackendUnavailable, match="--decode gpu: no CUDA GPU"):
            resolve_decode("gpu", torch.device("cpu"))


def test_ycbcr_conversion_matches_jfif_reference():
    rng = np.random.default_rng(1)
    ycc = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    expected = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], -1)
    expected = np.clip(np.rint(expected), 0, 255)
    assert np.abs(ycbcr_to_rgb(ycc).astype(float) - expected).max() <= 1
    np.testing.assert_array_equal(ycbcr_to_rgb(torch.from_numpy(ycc)).numpy(), ycbcr_to_rgb(ycc))


def test_score_summary_records_decoder(cmu_small, tmp_path):
    from jwth_engine import score_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = score_slide(cmu_small, model="test_tiny_patch14_reg4", out=tmp_path / "a", decode="cpu")
        ref = score_slide(cmu_small, model="test_tiny_patch14_reg4", out=tmp_path / "b", decode="cucim")
    assert raw.summary["reader"]["decoder"] == "nvimgcodec-cpu"
    assert "test tile matches cucim" in raw.summary["reader"]["why"]
    assert ref.summary["reader"]["decoder"] == "cucim" and "--decode cucim" in ref.summary["reader"]["why"]
    assert raw.summary["pipeline"]["read_plan"]["mode"] == "raw-tiles"
    # JPEG decoded bit-exactly: the same pixels, the same scores.
    assert raw.summary["scores"] == ref.summary["scores"]
    # Both decode each stored tile once; the raw path only the part of it the model tiles need
    # (224-px tiles on 240-px stored tiles: whole stored tiles are 1.63x the needed pixels here).
    assert ref.summary["pipeline"]["decode_ratio"] > 1.5
    assert 1.0 <= raw.summary["pipeline"]["decode_ratio"] <= 1.15


# --- the region path (embed-regions, embed --magnifications): level blocks from raw tiles ------------

REGION_MAGS = (5.0, 10.0, 20.0)


@pytest.mark.parametrize("name,mpp,tile_size,levels,tolerance", [
    ("cmu_small", None, 224, [0], 0),            # one level, 240 px JPEG tiles, blocks of 897 px
    ("tcga_jp2k", 0.25, 224, [1], 1),            # JPEG 2000, level 1 (non-integer downsample)
    ("philips_tiff", 0.25, 64, [1, 2], 0),       # two levels read; blocks reach past padded pages
])
def test_region_blocks_from_raw_tiles_equal_reader(request, name, mpp, tile_size, levels, tolerance):
    """Every region's tiles at every magnification, from blocks pasted out of raw-decoded stored
    tiles, equal the slide reader's (edge regions, whose blocks reach past the level, included);
    each stored tile is decoded once however many region blocks overlap it, by one thread or by
    four at once, and none is held after the last block that needs it."""
    from concurrent.futures import ThreadPoolExecutor

    from jwth_engine.regions.blocks import BlockSource
    from jwth_engine.regions.planning import RegionLayout, plan_regions, read_region_tiles
    from jwth_engine.slide import resolve_mpp

    path = request.getfixturevalue(name)
    with open_slide(path) as slide:
        plan = plan_regions(slide, slide_mpp=resolve_mpp(slide.info, mpp), layout=RegionLayout(REGION_MAGS, 1, tile_size),
                            min_tissue=0.0)
        assert [level for level, _ in plan.level_blocks()] == levels
        # Stored tiles the blocks touch, counted here from the geometry alone.
        touched, distinct = 0, set()
        for level in levels:
            (tw, th), ds = slide.info.level_tile_sizes[level], plan.level_downsamples[level]
            (width, height), size = slide.info.level_dimensions[level], math.ceil(plan.span0 / ds) + 1
            for x0, y0 in plan.boxes:
                lx, ly = math.floor(x0 / ds), math.floor(y0 / ds)
                cols = range(lx // tw, (min(lx + size, width) - 1) // tw + 1)
                rows = range(ly // th, (min(ly + size, height) - 1) // th + 1)
                touched += len(cols) * len(rows)
                distinct.update((level, c, r) for c in cols for r in rows)
        assert touched > len(distinct)           # blocks do share stored tiles
        blocks = BlockSource.open(slide, levels, CPU, plan=plan)
        try:
            assert set(blocks.decoder_names().values()) == {"nvimgcodec-cpu"}, blocks.describe()
            first = blocks.tiles_decoded          # the test tile of each level
            widths = [slide.info.level_dimensions[level][0] for level in levels]
            ours, reaches_past = [], False
            for index in range(len(plan)):
                ours.append(read_region_tiles(slide, plan, index, blocks=blocks))
                theirs = read_region_tiles(slide, plan, index)
                assert np.abs(ours[-1].astype(int) - theirs.astype(int)).max() <= tolerance, index
                x0 = int(plan.boxes[index][0])
                reaches_past |= any((x0 + plan.span0) / slide.info.level_downsamples[lv] > w
                                    for lv, w in zip(levels, widths))
            assert reaches_past          # the white outside the level is tested too
            assert blocks.tiles_decoded - first == len(distinct)
            assert 0 < blocks.tiles_held_max < len(distinct)
            assert all(shared.held == 0 for shared in blocks._shared.values())
            # Again, four threads at once: the same pixels, still one decode per stored tile.
            blocks.expect(plan)
            before = blocks.tiles_decoded
            with ThreadPoolExecutor(4) as pool:
                again = list(pool.map(lambda i: read_region_tiles(slide, plan, i, blocks=blocks), range(len(plan))))
            for a, b in zip(ours, again):
                np.testing.assert_array_equal(a, b)
            assert blocks.tiles_decoded - before == len(distinct)
            assert all(shared.held == 0 for shared in blocks._shared.values())
            # JPEG on the CPU: stored tiles decoded over what the plan's blocks need of them (here,
            # with every region planned, that falls short of the tile only at the level's edges).
            for level, shared in blocks._shared.items():
                raw = blocks._choices[level].decoder.raw
                if raw.codec == "jpeg":
                    assert any((x1 - x0) * (y1 - y0) < raw.tile_w * raw.tile_h for x0, y0, x1, y1 in shared.boxes.values())
                    # A window the expected boxes do not cover (every box shrunk to a pixel): its
                    # stored tiles are decoded whole, and the block is still right.
                    shared.expect(Counter(), {i: (0, 0, 1, 1) for i in shared.boxes})
                    lx, ly, size = plan.block_window(len(plan) // 2, level)
                    block = blocks.read(level, lx, ly, size)
                    ds = slide.info.level_downsamples[level]
                    theirs = slide.read_region((level_to_level0(lx, ds), level_to_level0(ly, ds)), level, (size, size))
                    assert np.abs(block.astype(int) - np.asarray(theirs).astype(int)).max() <= tolerance
                else:
                    assert not shared.boxes
        finally:
            blocks.close()


def test_embed_regions_decode_cpu_equals_reader_and_is_recorded(cli_cmd, cmu_small, tmp_path):
    """`embed-regions --decode cpu` (two reader threads, each with its own decoder) writes the same
    features as `--decode cucim` and records, per level, which decoder read the blocks; bad
    combinations and a damaged stored tile fail with one line and leave no file."""
    import h5py
    import json

    def run(*args):
        return subprocess.run(cli_cmd + ["embed-regions", *map(str, args), "--model", "test_tiny_patch14_reg4",
                                         "--device", "cpu", "--workers", "2"],
                              capture_output=True, text=True, timeout=600)

    feats = {}
    for decode in ("cpu", "cucim"):
        proc = run(cmu_small, "--out", tmp_path / decode, "--decode", decode, "--json")
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        expected = "nvimgcodec-cpu" if decode == "cpu" else "cucim"
        assert record["decode"]["0"]["decoder"] == expected, record["decode"]
        with h5py.File(tmp_path / decode / "CMU-1-Small-Region.h5") as f:
            assert json.loads(f.attrs["decode"])["0"]["decoder"] == expected
            feats[decode] = f["features"][()]
    np.testing.assert_array_equal(feats["cpu"], feats["cucim"])
    proc = run(cmu_small, "--out", tmp_path / "auto", "--json")      # --decode auto, no GPU model
    assert proc.returncode == 0, proc.stderr
    chosen = json.loads(proc.stdout.strip().splitlines()[-1])["decode"]["0"]
    if not torch.cuda.is_available():
        assert chosen["decoder"] == "cucim" and "slide reader" in chosen["why"], chosen

    proc = run(cmu_small, "--out", tmp_path / "x", "--decode", "openslide", "--reader", "cucim")
    assert proc.returncode == 2 and "contradicts" in proc.stderr and not (tmp_path / "x").exists(), proc.stderr
    if not torch.cuda.is_available():     # fails before a slide is opened or the model loaded
        proc = run(cmu_small, "--out", tmp_path / "x", "--decode", "gpu")
        assert proc.returncode == 2 and "--decode gpu: no CUDA GPU" in proc.stderr, proc.stderr
        assert "backbone" not in proc.stderr and not (tmp_path / "x").exists(), proc.stderr
    bad = tmp_path / "truncated.svs"
    _truncate_tile(cmu_small, bad, 2, 3)
    proc = run(bad, "--out", tmp_path / "bad", "--decode", "cpu", "--min-tissue", "0")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "stored tile (col 2, row 3) of level 0" in errors[0]
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())   # no file, not even a partial one


# --- GPU: run wherever a GPU is present ----------------------------------------------------------

def _need_gpu():
    """Skips without a GPU or a working GPU decoder; with JWTH_REQUIRE_GPU=1 (the GPU check) that
    skip is a failure, so a GPU machine missing nvJPEG cannot pass these tests by skipping them."""
    if not _gpu():
        gpu_skip("no CUDA GPU visible to torch: the GPU decode path cannot run here")
    ok, why = gpu_decode_available()
    if not ok:
        gpu_skip(f"GPU decode unavailable: {why}")


@pytest.mark.parametrize("name", ["cmu_small", "tcga_jp2k"])
def test_gpu_decode_on_device_matches_cpu(request, name):
    """The GPU decoder as the product takes it (choose_decoder: codec check, test tile, colour
    spec) decodes into device tensors that equal the CPU backend's within the IDCT's tolerance."""
    _need_gpu()
    path = request.getfixturevalue(name)
    stream = torch.cuda.Stream()
    with open_slide(path) as slide:
        with torch.cuda.stream(stream):
            gpu = choose_decoder(slide, 0, DecodeRequest("gpu", "test"), stream=stream)
            assert gpu.name == "nvimgcodec-gpu", gpu.note
            print(f"{name}: {gpu.note}; test tile {gpu.test_tile}")      # which colour spec nvJPEG needed
            raw = gpu.decoder.raw
            indices = list(range(min(24, raw.tiles_across * raw.tiles_down)))
            tiles = gpu.decoder.decode(indices)
            assert all(t.is_cuda and t.dtype == torch.uint8 for t in tiles)
            host = [t.cpu().numpy() for t in tiles]
        cpu = choose_decoder(slide, 0, CPU)
        try:
            for a, b in zip(host, cpu.decoder.decode(indices)):
                diff = np.abs(a.astype(int) - b.astype(int))
                # nvJPEG's / nvJPEG2000's IDCT/IDWT vs libjpeg-turbo's / OpenJPEG's
                assert diff.mean() <= 1.0 and diff.max() <= 24, (diff.mean(), diff.max())
        finally:
            gpu.decoder.close()
            cpu.decoder.close()


def test_gpu_pipeline_preprocesses_from_device_buffers(cmu_small):
    """Decoded tiles stay on the GPU: the prefetcher's batches are device tensors cut from the
    decoder's buffers (no pinned host buffer exists), preprocessing reads them in place, and the
    probabilities match the CPU-decoded path's."""
    _need_gpu()
    from jwth_engine import _native
    from jwth_engine.backends import select_backend
    from jwth_engine.heads import random_head
    from jwth_engine.heads.native import make_head_runner
    from jwth_engine.models import load_backbone
    from jwth_engine.pipeline import ModelStage, PipelineStats, run_streaming

    if not _native.cuda_compiled():
        gpu_skip("jwth_engine._C built without CUDA kernels")
    tiny = "test_tiny_patch14_reg4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(tiny, seed=0)
        head = random_head("jwth", dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                           classes=["a", "b"], num_heads=4, backbone_preset=tiny,
                           backbone_weights_hash=backbone.weights_hash, tile_size=224, target_mpp=0.5, seed=0)
    backend = select_backend(backbone, device="cuda", precision="fp32", max_batch=16, compile=False,
                             log=lambda _: None)
    stage = ModelStage(backend, make_head_runner(head.module).to(backend.device), 224,
                       backbone.preset.mean, backbone.preset.std)
    gpu_request = DecodeRequest("gpu", "test")
    with open_slide(cmu_small) as slide:
        grid = _grids(slide, 0.499, 0.5)
        prefetcher = TilePrefetcher(slide, grid, batch_size=16, decode=gpu_request, device=backend.device)
        with prefetcher:
            assert prefetcher.plan.mode == "raw-tiles" and prefetcher.decode.name == "nvimgcodec-gpu"
            assert prefetcher._pool.device is not None and not prefetcher._pool.pin_memory
            for batch in prefetcher:
                assert batch.tiles.is_cuda and batch.ready is not None
                batch.release()
        stats = PipelineStats()
        gpu_probs, _ = run_streaming(slide, grid, stage, batch_size=16, decode=gpu_request, stats=stats)
        assert stats.decoder["decoder"] == "nvimgcodec-gpu"
        cpu_probs, _ = run_streaming(slide, grid, stage, batch_size=16, decode=CPU)
        assert np.abs(gpu_probs - cpu_probs).max() < 1e-2


def test_gpu_region_blocks_match_cpu(cmu_small):
    """The region path's `--decode gpu`: stored tiles decoded and pasted on the device, and the
    block stays there: the area filter and the tile cut run on it (no device-to-host copy, checked
    with the profiler), and the tiles equal the CPU backend's within the GPU IDCT's tolerance."""
    _need_gpu()
    from torch.profiler import ProfilerActivity, profile

    from jwth_engine.regions.blocks import BlockSource
    from jwth_engine.regions.planning import RegionLayout, plan_regions, read_region_tiles
    from jwth_engine.regions.resample import box_resample, cut_tiles
    from jwth_engine.slide import resolve_mpp

    with open_slide(cmu_small) as slide:
        plan = plan_regions(slide, slide_mpp=resolve_mpp(slide.info, None), layout=RegionLayout(REGION_MAGS, 1, 224),
                            min_tissue=0.0)
        gpu = BlockSource.open(slide, [0], DecodeRequest("gpu", "test"), device=torch.device("cuda"))
        cpu = BlockSource.open(slide, [0], CPU)
        try:
            assert gpu.decoder_names() == {"0": "nvimgcodec-gpu"}, gpu.describe()
            assert gpu.device is not None and gpu.device.type == "cuda"
            for index in range(len(plan)):
                ours = read_region_tiles(slide, plan, index, blocks=gpu)
                assert isinstance(ours, torch.Tensor) and ours.is_cuda
                theirs = read_region_tiles(slide, plan, index, blocks=cpu)
                diff = np.abs(ours.cpu().numpy().astype(int) - theirs.astype(int))
                assert diff.mean() <= 1.0 and diff.max() <= 24, (index, diff.mean(), diff.max())
            # The filter and cut of a device block, profiled: kernels ran, nothing came back to the host.
            lx, ly, size = plan.block_window(0, 0)
            block = gpu.read(0, lx, ly, size)
            out = torch.empty((16, 224, 224, 3), dtype=torch.uint8, device=block.device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                cut_tiles(box_resample(block, (0.5, 0.25, 896.5, 896.25), 4 * 224), 4, 224, out)   # sub-pixel
                cut_tiles(box_resample(block, (0, 0, 896, 896), 224), 1, 224, out[:1])             # reduce by 4
                torch.cuda.synchronize()
            names = [e.name for e in prof.events()]
            assert any("index_select" in n or "sum" in n for n in names), names[:20]
            assert not [n for n in names if "DtoH" in n or "Device -> Pageable" in n], names
        finally:
            gpu.close()
            cpu.close()


def test_colour_spec_that_misreads_the_test_tile_gives_way_to_the_next(cmu_small, tcga_jp2k):
    """A decoder that reads an RGB JPEG's colour differently (SRGB here: libjpeg converts the R, G,
    B components as if YCbCr) fails the test tile; the next colour spec is tried and recorded, and
    with none left the slide reader decodes, with every spec's figures in the note."""
    with open_slide(cmu_small) as slide:
        choice = choose_decoder(slide, 0, CPU)
        assert choice.test_tile["colour_spec"] == choice.decoder.colour_spec == "SYCC"
        choice.decoder.close()
        choice = choose_decoder(slide, 0, CPU, specs=("SRGB", "SYCC"))
        try:
            assert choice.name == "nvimgcodec-cpu" and choice.decoder.colour_spec == "SYCC"
            assert choice.test_tile["max_abs_diff"] == 0 and choice.test_tile["colour_spec"] == "SYCC"
            assert re.search(r"; colour spec SYCC \(SRGB: mean \|Δ\| \d+\.\d\d, max \d+ did not match\)$", choice.note), \
                choice.note
            tiles = choice.decoder.decode([0, 1])
        finally:
            choice.decoder.close()
        reference = choose_decoder(slide, 0, CPU)
        try:
            assert all(np.array_equal(a, b) for a, b in zip(tiles, reference.decoder.decode([0, 1])))
        finally:
            reference.decoder.close()
        choice = choose_decoder(slide, 0, CPU, specs=("SRGB",))
        assert choice.decoder is None and choice.name == "cucim"
        assert choice.test_tile["colour_spec"] == "SRGB" and choice.test_tile["mean_abs_diff"] > 20
        assert re.fullmatch(r"raw decode of the test tile differs from cucim's \(SRGB: mean \|Δ\| \d+\.\d\d, "
                            r"max \d+\); cucim decodes", choice.note), choice.note
    # The region path's per-thread decoders decode with the colour spec the check chose.
    from jwth_engine.regions.blocks import BlockSource

    with open_slide(tcga_jp2k) as slide:
        choice = choose_decoder(slide, 0, CPU, specs=("UNCHANGED",))
        assert choice.decoder.colour_spec == "UNCHANGED"
        blocks = BlockSource(slide, {0: choice})
        try:
            assert blocks.read(0, 0, 0, 300).shape == (300, 300, 3)
            assert [d.colour_spec for d in blocks._made] == ["UNCHANGED"]
        finally:
            blocks.close()


def test_codec_checks_decode_both_codecs_on_the_cpu():
    checks = codec_checks("cpu")
    assert {codec: check.ok for codec, check in checks.items()} == {"jpeg": True, "jpeg2000": True}, checks
    assert checks["jpeg"].detail == "max |Δ| vs Pillow's decode 0"


_MISSING_CODEC_SCRIPT = """
import json, sys
from jwth_engine.slide import open_slide
from jwth_engine.slide.decoding import DecodeRequest, choose_decoder, resolve_decode
from jwth_engine.slide.nvimgcodec_check import codec_checks
out = {"checks": {codec: [check.ok, check.detail] for codec, check in codec_checks("cpu").items()},
       "resolve": resolve_decode("cpu", None).backend}
for name, path in (("jpeg2000", sys.argv[1]), ("jpeg", sys.argv[2])):
    with open_slide(path) as slide:
        choice = choose_decoder(slide, 0, DecodeRequest("cpu", "requested"))
        out[name] = [choice.name, choice.note]
        if choice.decoder is not None:
            choice.decoder.close()
print(json.dumps(out))
"""


def test_a_codec_whose_extension_is_missing_sends_its_slides_to_the_reader(tmp_path, tcga_jp2k, cmu_small, cli_cmd):
    """nvImageCodec with its libjpeg-turbo extension alone (NVIMGCODEC_EXTENSIONS_PATH) has no JPEG
    2000 decoder, as a GPU image without nvJPEG2000 has none on the GPU: decodes of that codec give
    no image, which the tile decoder could only call corrupt. The check finds it up front: a JPEG
    2000 level goes to the slide reader with the reason, JPEG keeps the raw path, doctor names it."""
    import json
    import os
    from pathlib import Path

    from nvidia import nvimgcodec

    only = tmp_path / "extensions"
    only.mkdir()
    for lib in (Path(nvimgcodec.__file__).parent / "extensions").glob("libjpeg_turbo_ext.so*"):
        (only / lib.name).symlink_to(lib)
    env = dict(os.environ, NVIMGCODEC_EXTENSIONS_PATH=str(only))
    proc = subprocess.run([sys.executable, "-c", _MISSING_CODEC_SCRIPT, str(tcga_jp2k), str(cmu_small)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["checks"]["jpeg"][0] is True and out["checks"]["jpeg2000"] == [False, "no CPU JPEG 2000 decoder loaded"]
    assert out["resolve"] == "cpu"                     # one codec works: --decode cpu stands
    name, note = out["jpeg2000"]
    assert name == "cucim" and note == ("nvImageCodec's CPU backend cannot decode JPEG 2000 here (no CPU JPEG 2000 "
                                        "decoder loaded); cucim decodes"), note
    assert out["jpeg"][0] == "nvimgcodec-cpu", out["jpeg"]
    proc = subprocess.run(cli_cmd + ["doctor", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["decode_cpu"].startswith("available")
    assert report["decode_cpu_check"]["JPEG 2000"] == "FAILED: no CPU JPEG 2000 decoder loaded"


def test_doctor_reports_decoders(cli_cmd):
    import json

    proc = subprocess.run(cli_cmd + ["doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["nvimgcodec"] != "not installed"
    assert report["decode_cpu"].startswith("available")
    assert report["decode_cpu_check"] == {"JPEG": "ok (max |Δ| vs Pillow's decode 0)",
                                          "JPEG 2000": "ok (max |Δ| vs Pillow's decode 0)"}
    assert report["decode_gpu"].startswith("available") == _gpu() or "nvImageCodec" in report["decode_gpu"]

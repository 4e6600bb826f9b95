"""The two nvImageCodec decode engines (slide/nvimgcodec_engines.py): the C API batch decoder in
jwth_engine._C (csrc/decode/nvimgcodec_batch.cpp) against the Python API it replaces, which stays
as the reference. Equal pixels on the shared SVS slides and generated YCbCr TIFFs, every colour spec, one status per bad stream,
and the binding's argument checks. (What the C API path is for, decoding beside a thread that
runs Python, is measured in benchmarks/bench_decode.py, not timed here.)"""

from __future__ import annotations

import io

import numpy as np
import pytest

from jwth_engine._native import array_arg
from jwth_engine.slide import open_slide
from jwth_engine.slide.decoding import DecodeRequest, choose_decoder
from jwth_engine.slide.nvimgcodec_decoder import TileDecoder, colour_specs
from jwth_engine.slide.nvimgcodec_engines import TileStatus, c_api_unavailable, make_engine
from jwth_engine.slide.raw_tiles import RawTileSource, tile_stream

pytest.importorskip("nvidia.nvimgcodec")


def test_the_c_api_engine_is_built_and_chosen(cmu_small):
    """CI builds _C with nvImageCodec's header (a build requirement): the raw path runs on the C API."""
    assert c_api_unavailable() is None
    with open_slide(cmu_small) as slide:
        choice = choose_decoder(slide, 0, DecodeRequest("cpu", "test"), num_threads=2)
        try:
            assert choice.decoder.engine == "c-api" and "C API" in choice.note, choice.note
        finally:
            choice.decoder.close()


def test_auto_falls_back_to_the_python_api_and_says_why(cmu_small, monkeypatch):
    """Where the C API decoder cannot be made (an nvImageCodec of another version, say), `auto`
    decodes through the Python API and the reader's note gives the reason; asking for the C API
    by name fails instead."""
    from jwth_engine.errors import BackendUnavailable
    from jwth_engine.slide import nvimgcodec_engines

    def refuse(key):
        raise BackendUnavailable("nvImageCodec 0.10.0 is installed but jwth_engine._C was built against 0.9")

    monkeypatch.setattr(nvimgcodec_engines.BATCH_DECODERS, "_make", refuse)
    monkeypatch.setattr(nvimgcodec_engines.BATCH_DECODERS, "_free", {})
    with pytest.raises(BackendUnavailable, match="built against 0.9"):
        make_engine("cpu", 0, 1, "c-api")
    with open_slide(cmu_small) as slide:
        choice = choose_decoder(slide, 0, DecodeRequest("cpu", "test"), num_threads=2)
        try:
            assert choice.decoder.engine == "python-api"
            assert "Python API (the C API is unavailable: nvImageCodec 0.10.0 is installed" in choice.note, choice.note
            assert choice.test_tile["max_abs_diff"] == 0
        finally:
            choice.decoder.close()


CASES = [("cmu_small", None, 0), ("tiny_svs", None, 0), ("tcga_jp2k", None, 0), ("tcga_jp2k", None, 1),
         ("tiffs", 0, 0), ("tiffs", 0, 1), ("tiffs", 1, 0)]      # tiffs: YCbCr 4:2:0, then 4:4:4 (conftest.py)


@pytest.mark.parametrize("name,which,level", CASES)
def test_c_api_equals_python_api_on_every_stored_tile(request, name, which, level):
    """Every stored tile of the level, every colour spec the level may be decoded with: the same
    pixels from both engines (both on the CPU backend; bit-exact)."""
    path = request.getfixturevalue(name)
    path = str(path if which is None else path[which])
    with open_slide(path) as slide:
        dims = slide.info.level_dimensions
    source = RawTileSource(path, dims)
    try:
        raw = source.level(level)
        indices = range(raw.tiles_across * raw.tiles_down)
        for spec in colour_specs(raw):
            tiles = {}
            for engine in ("c-api", "python-api"):
                decoder = TileDecoder(source, raw, backend="cpu", num_threads=2, colour_spec=spec, engine=engine)
                try:
                    assert decoder.engine == engine
                    tiles[engine] = decoder.decode(indices)
                finally:
                    decoder.close(keep_source=True)
            for index, (ours, ref) in enumerate(zip(tiles["c-api"], tiles["python-api"])):
                np.testing.assert_array_equal(ours, ref, err_msg=f"{name} level {level} {spec} tile {index}")
    finally:
        source.close()


def _cmu_streams(cmu_small, count):
    with open_slide(cmu_small) as slide:
        dims = slide.info.level_dimensions
    source = RawTileSource(str(cmu_small), dims)
    raw = source.level(0)
    streams = [tile_stream(raw, data) for data in source.read(raw, range(count))]
    source.close()
    return raw, streams


def _small_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # 4:4:4, as SYCC output (the stored components) needs; Pillow would subsample by default.
    Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(buffer, format="JPEG", subsampling=0)
    return buffer.getvalue()


def test_each_bad_stream_gets_its_status_and_the_rest_decode(cmu_small):
    raw, streams = _cmu_streams(cmu_small, 4)
    # Stream 2: its middle quarter overwritten with seeded random bytes (a marker libjpeg cannot
    # take, as tests/test_raw_decode.py's corrupt tile); stream 3: a whole JPEG of another size.
    corrupt = bytearray(streams[2])
    quarter = len(corrupt) // 4
    corrupt[quarter:2 * quarter] = np.random.default_rng(0).integers(0, 256, quarter, dtype=np.uint8).tobytes()
    batch = [streams[0], b"not an image at all", bytes(corrupt), _small_jpeg(), streams[3]]
    outputs = {}
    for engine_name in ("c-api", "python-api"):
        engine = make_engine("cpu", 0, 2, engine_name)
        try:
            out = [np.zeros((raw.tile_h, raw.tile_w, 3), np.uint8) for _ in batch]
            status = [TileStatus(s) for s in engine.decode(batch, out, colour="SYCC")]
        finally:
            engine.close()
        outputs[engine_name] = out
        assert status[0] == status[4] == TileStatus.OK, (engine_name, status)
        assert status[1] in (TileStatus.UNPARSABLE, TileStatus.DECODE_FAILED), (engine_name, status)
        assert status[2] == TileStatus.DECODE_FAILED and status[3] == TileStatus.WRONG_SIZE, (engine_name, status)
    for k in (0, 4):
        np.testing.assert_array_equal(outputs["c-api"][k], outputs["python-api"][k])
    assert outputs["c-api"][0].std() > 0       # real pixels, not the zeros it started as


def test_the_binding_checks_its_arguments(cmu_small):
    raw, streams = _cmu_streams(cmu_small, 2)
    engine = make_engine("cpu", 0, 1, "c-api")
    shape = (raw.tile_h, raw.tile_w, 3)
    try:
        with pytest.raises(TypeError, match="outputs.*dtype float32"):
            engine.decode(streams, [np.zeros(shape, np.float32)] * 2, colour="SYCC")
        with pytest.raises(ValueError, match=r"outputs.*expected shape \[240, 240, 3\]"):
            engine._batch.decode(streams, [array_arg(np.zeros((240, 200, 3), np.uint8))] * 2, tile_h=240,
                                 tile_w=240, colour="SYCC")
        with pytest.raises(ValueError, match="outputs.*has 1 buffers for 2 streams"):
            engine.decode(streams, [np.zeros(shape, np.uint8)], colour="SYCC")
        with pytest.raises(ValueError, match=r"outputs.*packed RGB rows.*got strides \[1440, 6, 1\]"):
            wide = np.zeros((raw.tile_h, raw.tile_w * 2, 3), np.uint8)
            engine.decode(streams, [wide[:, ::2]] * 2, colour="SYCC")
        tile = np.zeros(shape, np.uint8)
        with pytest.raises(ValueError, match=r"regions.*item 1 is not \(x0, y0, x1, y1\) inside a 240 x 240 tile"):
            engine.decode(streams, [tile[:10, :10], tile[:10, :10]], colour="SYCC", tile=(240, 240),
                          regions=[(0, 0, 10, 10), (0, 0, 10, 241)])
        with pytest.raises(ValueError, match="regions.*has 1 items for 2 streams"):
            engine.decode(streams, [tile, tile], colour="SYCC", regions=[None], tile=(240, 240))
        with pytest.raises(ValueError, match="needs the tile size"):
            engine.decode(streams, [tile, tile], colour="SYCC", regions=[None, None])
        with pytest.raises(ValueError, match=r"outputs.*expected shape \[10, 20, 3\] \(the stored tile's region"):
            engine.decode(streams, [tile, tile[:20, :10]], colour="SYCC", regions=[None, (0, 0, 20, 10)],
                          tile=(240, 240))
        with pytest.raises(TypeError, match="streams.*item 1 is not bytes"):
            engine.decode([streams[0], bytearray(streams[1])], [np.zeros(shape, np.uint8)] * 2, colour="SYCC")
        with pytest.raises(ValueError, match="colour.*'RGB' is not one of"):
            engine.decode(streams, [np.zeros(shape, np.uint8)] * 2, colour="RGB")
    finally:
        engine.close()


def _pillow_jpegs(subsampling: int, count: int, rng) -> list[bytes]:
    """Textured 240 x 240 JPEGs (Pillow; subsampling 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0): chroma that
    varies from pixel to pixel, so upsampling at a region's edge shows if it differs."""
    from PIL import Image

    yy, xx = np.mgrid[0:240, 0:240]
    out = []
    for k in range(count):
        image = np.stack([128 + 100 * np.sin(xx / (3 + k) + k), 128 + 100 * np.cos(yy / (4 + k)),
                          128 + 60 * np.sin((xx + yy) / 5.0)], -1) + rng.normal(0, 30, (240, 240, 3))
        buffer = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85,
                                                                   subsampling=subsampling)
        out.append(buffer.getvalue())
    return out


def _regions(rng, count: int, size: int) -> list[tuple[int, int, int, int]]:
    """Random regions of a size x size tile, plus the shapes a grid asks for: strips along each
    edge, one pixel, one row, one column, the last pixel."""
    fixed = [(0, 0, size, 17), (0, size - 17, size, size), (0, 0, 17, size), (size - 17, 0, size, size),
             (5, 7, 6, 8), (0, 100, size, 101), (100, 0, 101, size), (size - 1, size - 1, size, size)]
    out = []
    while len(out) < count:
        x0, x1 = sorted(int(v) for v in rng.integers(0, size + 1, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, size + 1, 2))
        if x0 < x1 and y0 < y1:
            out.append((x0, y0, x1, y1))
    return fixed + out


@pytest.mark.parametrize("engine_name", ["c-api", "python-api"])
def test_regions_equal_the_whole_tiles_decode_and_write_only_their_part(cmu_small, tiffs, engine_name):
    """A region of a stored tile, decoded into its part of a tile-sized array, equals the whole
    tile's decode there, bit for bit; nothing outside it is written. JPEG 4:4:4, 4:2:2 and 4:2:0
    (fancy upsampling reads the neighbours' chroma, so a region's edge is where it could differ),
    Aperio RGB JPEG (SYCC) and tifffile's YCbCr 4:2:0 tiles; random regions and edge strips."""
    rng = np.random.default_rng(0)
    sets = [(f"pillow subsampling {sub}", _pillow_jpegs(sub, 4, rng), "SRGB", (240, 240)) for sub in (0, 1, 2)]
    raw, streams = _cmu_streams(cmu_small, 8)
    sets.append(("CMU-1 stored tiles", streams, "SYCC", (raw.tile_h, raw.tile_w)))
    with open_slide(tiffs[0]) as slide:
        source = RawTileSource(str(tiffs[0]), slide.info.level_dimensions)
    ycbcr = source.level(0)
    sets.append(("tifffile YCbCr 4:2:0", [tile_stream(ycbcr, d) for d in source.read(ycbcr, range(4))], "SRGB",
                 (ycbcr.tile_h, ycbcr.tile_w)))
    source.close()
    engine = make_engine("cpu", 0, 2, engine_name)
    try:
        for what, tiles, colour, (h, w) in sets:
            whole = [np.zeros((h, w, 3), np.uint8) for _ in tiles]
            assert set(engine.decode(tiles, whole, colour=colour)) == {TileStatus.OK}
            regions = _regions(rng, 24, min(h, w))
            jobs = [(k, box) for k in range(len(tiles)) for box in regions]
            out = [np.full((h, w, 3), 7, np.uint8) for _ in jobs]       # 7: "not written"
            status = engine.decode([tiles[k] for k, _ in jobs], [o[y0:y1, x0:x1] for o, (_, (x0, y0, x1, y1))
                                                                 in zip(out, jobs)],
                                   colour=colour, regions=[box for _, box in jobs], tile=(h, w))
            assert set(status) == {TileStatus.OK}, what
            for o, (k, (x0, y0, x1, y1)) in zip(out, jobs):
                np.testing.assert_array_equal(o[y0:y1, x0:x1], whole[k][y0:y1, x0:x1],
                                              err_msg=f"{what} tile {k} region {(x0, y0, x1, y1)}")
                outside = np.ones((h, w), bool)
                outside[y0:y1, x0:x1] = False
                assert (o[outside] == 7).all(), f"{what}: region {(x0, y0, x1, y1)} wrote outside itself"
    finally:
        engine.close()


# --- GPU: run wherever a GPU is present (benchmarks/gpu_check.sh runs them with JWTH_REQUIRE_GPU=1) --

@pytest.mark.parametrize("name", ["cmu_small", "tcga_jp2k"])
def test_gpu_c_api_equals_python_api(request, name):
    """On the GPU both engines drive the same nvImageCodec decoders (hardware JPEG engine first)
    with the same parameters: for every colour spec the level may use, the same pixels, or the same
    failure; the C API's tiles are device tensors torch allocated, written on the given stream."""
    import torch
    from _gpu import gpu_skip

    from jwth_engine.errors import SlideError
    from jwth_engine.slide.nvimgcodec_check import gpu_decode_available

    if not torch.cuda.is_available():
        gpu_skip("no CUDA GPU visible to torch")
    ok, why = gpu_decode_available()
    if not ok:
        gpu_skip(f"GPU decode unavailable: {why}")
    path = str(request.getfixturevalue(name))
    with open_slide(path) as slide:
        dims = slide.info.level_dimensions
    source = RawTileSource(path, dims)
    stream = torch.cuda.Stream()
    try:
        raw = source.level(0)
        indices = list(range(min(32, raw.tiles_across * raw.tiles_down)))
        for spec in colour_specs(raw):
            outcome = {}
            for engine in ("c-api", "python-api"):
                decoder = TileDecoder(source, raw, backend="gpu", stream=stream, colour_spec=spec, engine=engine)
                try:
                    with torch.cuda.stream(stream):
                        tiles = decoder.decode(indices)
                        assert all(t.is_cuda and t.dtype == torch.uint8 for t in tiles)
                        outcome[engine] = [t.cpu().numpy() for t in tiles]
                except SlideError as exc:
                    outcome[engine] = f"failed: {exc.problem}"
                finally:
                    decoder.close(keep_source=True)
            print(f"{name} {spec}: " + ", ".join(f"{k} {'ok' if isinstance(v, list) else v}" for k, v in outcome.items()))
            if isinstance(outcome["python-api"], str) or isinstance(outcome["c-api"], str):
                assert isinstance(outcome["python-api"], str) and isinstance(outcome["c-api"], str), outcome
                continue
            for k, (ours, ref) in enumerate(zip(outcome["c-api"], outcome["python-api"])):
                np.testing.assert_array_equal(ours, ref, err_msg=f"{name} {spec} tile {k}")
    finally:
        source.close()

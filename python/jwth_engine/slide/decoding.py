"""`--decode auto|gpu|cpu|cucim|openslide`: who decodes the tiles the model sees, and why.

    gpu        stored tiles' compressed bytes → nvImageCodec on the GPU (nvJPEG / nvJPEG2000)
    cpu        the same path on nvImageCodec's CPU backend (libjpeg-turbo / OpenJPEG)
    cucim      regions read and decoded by cuCIM (the slide reader), as before this option existed
    openslide  regions read by OpenSlide
    auto       gpu when the model runs on a GPU and nvImageCodec is installed; else cpu when
               nvImageCodec is installed (the GPU path's code on the CPU backend, one code path
               everywhere; benchmarks/results/decode_cpu.json: 1.14x cuCIM's batch read on Aperio
               JPEG and 1.18x on JPEG 2000 in every pass, 1.03x on 4:2:0 JPEG, not resolved; a
               few % of a CPU backbone's time either way); else the slide reader.
               The region path (embed-regions) keeps the slide reader for `auto` without a GPU
               model (`resolve_decode(auto_cpu=...)`): its per-region block reads measured faster
               with cuCIM on JPEG.

The raw path needs a tiled TIFF-family level with JPEG or JPEG 2000 tiles (raw_tiles.py). Where it
cannot be used (NDPI strips, MRXS, deflate tiles, odd photometrics) or where its test tile does
not match the slide reader's decode of the same pixels, tiles come from the slide reader and
`RawDecodeChoice.note` says why; the summary records it under `reader`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable, ConfigError, SlideError
from .base import level_to_level0
from .factory import OPENSLIDE_ONLY
from .tiff import sniff

DECODES = ("auto", "gpu", "cpu", "cucim", "openslide")

# Raw decode vs the slide reader on the test tile. JPEG on the CPU backend is bit-exact and JPEG
# 2000 within 1 (tests/test_raw_decode.py); a GPU IDCT may differ by a few levels. A colour-space
# mistake moves the mean by tens of levels, a corrupt tile by more: those are what this catches.
TEST_TILE_MEAN_TOL = 1.0
TEST_TILE_MAX_TOL = 24


def reader_for(decode: str, reader: str) -> str:
    """The slide reader `--decode` implies: cucim/openslide decode with that reader."""
    if decode not in DECODES:
        raise ConfigError(f"--decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode in ("cucim", "openslide"):
        if reader not in ("auto", decode):
            raise ConfigError(f"--decode {decode} contradicts --reader {reader}")
        return decode
    return reader


@dataclass(frozen=True)
class DecodeRequest:
    """The resolved `--decode`: the raw path's backend ("gpu" | "cpu") or None, and why."""

    backend: str | None
    why: str


def resolve_decode(decode: str, device, *, auto_cpu: str | None = None) -> DecodeRequest:
    """Resolve `--decode` for a model on `device`; raises BackendUnavailable when an explicit
    `--decode gpu|cpu` cannot be honoured at all. `auto_cpu`: where `auto` on a machine without a
    GPU model should keep the slide reader instead of the raw CPU path, the reason why."""
    from .nvimgcodec_check import cpu_decode_available, gpu_decode_available

    if decode not in DECODES:
        raise ConfigError(f"--decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode in ("cucim", "openslide"):
        return DecodeRequest(None, f"requested (--decode {decode})")
    if decode == "gpu":
        ok, why = gpu_decode_available()
        if not ok:
            raise BackendUnavailable(f"--decode gpu: {why}")
        return DecodeRequest("gpu", "requested (--decode gpu)")
    if decode == "cpu":
        ok, why = cpu_decode_available()
        if not ok:
            raise BackendUnavailable(f"--decode cpu: {why}")
        return DecodeRequest("cpu", "requested (--decode cpu)")
    on_gpu = device is not None and getattr(device, "type", str(device)) == "cuda"
    if on_gpu:
        ok, why = gpu_decode_available()
        if ok:
            return DecodeRequest("gpu", "auto: the model runs on a GPU, so tiles are decoded there")
    if auto_cpu is not None:
        return DecodeRequest(None, f"auto: no GPU in use; {auto_cpu}")
    ok, why_cpu = cpu_decode_available()
    if ok:
        return DecodeRequest("cpu", "auto: no GPU in use; stored tiles decoded by nvImageCodec's CPU backend")
    return DecodeRequest(None, f"auto: nvImageCodec unavailable ({why_cpu})")


API_NAMES = {"c-api": "C API (jwth_engine._C)", "python-api": "Python API"}


@dataclass
class RawDecodeChoice:
    """What decodes a grid's tiles: `decoder` (a TileDecoder) or None = the slide reader."""

    decoder: object | None
    name: str                 # "nvimgcodec-gpu" | "nvimgcodec-cpu" | "cucim" | "openslide"
    note: str
    test_tile: dict | None = None   # the open-time comparison: mean/max |Δ| vs the slide reader

    def to_dict(self) -> dict:
        return {"decoder": self.name, "why": self.note, "test_tile": self.test_tile}


def choose_decoder(slide, level: int, request: DecodeRequest, *, device=None, stream=None,
                   num_threads: int = 0, specs: tuple[str, ...] | None = None,
                   engine: str = "auto") -> RawDecodeChoice:
    """A TileDecoder for `level` of `slide` on the requested backend, checked on one tile against
    the slide reader, or the slide reader with the reason the raw path was not taken. `specs`: the
    colour specs to try, in order (default nvimgcodec_decoder.colour_specs of the level); `engine`:
    nvimgcodec_engines.make_engine's."""
    reader_name = slide.info.reader
    backend, why = request.backend, request.why
    if backend is None:
        return RawDecodeChoice(None, reader_name, f"{why}; {reader_name} decodes")
    from .nvimgcodec_check import codec_unavailable
    from .nvimgcodec_decoder import TileDecoder, colour_specs, cuda_device
    from .raw_tiles import RawLevelUnavailable, RawTileSource

    path = slide.path
    ext = os.path.splitext(path)[1].lower()
    fallback = f"; {reader_name} decodes"
    if ext in OPENSLIDE_ONLY:
        return RawDecodeChoice(None, reader_name, f"{OPENSLIDE_ONLY[ext]} files have no raw-tile path{fallback}")
    with open(path, "rb") as fh:
        if sniff(fh.read(16)) is None:
            return RawDecodeChoice(None, reader_name, f"not a TIFF file: no raw-tile path{fallback}")
    try:
        source = RawTileSource(path, slide.info.level_dimensions)
        raw = source.level(level)
    except RawLevelUnavailable as exc:
        return RawDecodeChoice(None, reader_name, f"raw tiles unusable: {exc}{fallback}")
    # A codec whose extension did not load (a GPU image without nvJPEG2000) would make every tile
    # look corrupt: the slide reader takes such a level, and the note says why.
    device_id = cuda_device(device)[1] if backend == "gpu" else 0
    missing = codec_unavailable(backend, device_id, raw.codec)
    if missing is not None:
        source.close()
        return RawDecodeChoice(None, reader_name, f"{missing}{fallback}")
    # The expected colour spec first; the others only when the test tile does not match with it.
    first: dict | None = None
    tried: list[str] = []
    for spec in specs or colour_specs(raw):
        decoder = TileDecoder(source, raw, backend=backend, device=device, stream=stream, num_threads=num_threads,
                              colour_spec=spec, engine=engine)
        try:
            stats = compare_test_tile(slide, _test_decoder(slide, source, decoder))
        except SlideError as exc:     # a corrupt or undecodable test tile: no colour spec mends that
            decoder.close()
            return RawDecodeChoice(None, reader_name, f"raw decode of the test tile failed ({exc.problem}){fallback}")
        stats["colour_spec"] = spec
        if stats["mean_abs_diff"] <= TEST_TILE_MEAN_TOL and stats["max_abs_diff"] <= TEST_TILE_MAX_TOL:
            codec = f"{raw.codec} tiles {raw.tile_w}x{raw.tile_h}"
            colour = f"; colour spec {spec} ({'; '.join(tried)} did not match)" if tried else ""
            api = API_NAMES[decoder.engine] + (f" ({decoder.engine_why})" if decoder.engine_why else "")
            return RawDecodeChoice(decoder, decoder.name, f"{why}; {codec}; nvImageCodec's {api}; "
                                                          f"test tile matches {reader_name}{colour}", stats)
        decoder.close(keep_source=True)
        first = first or stats
        tried.append(f"{spec}: mean |Δ| {stats['mean_abs_diff']:.2f}, max {stats['max_abs_diff']}")
    source.close()
    return RawDecodeChoice(None, reader_name, f"raw decode of the test tile differs from {reader_name}'s "
                                              f"({'; '.join(tried)}){fallback}", first)


def _test_decoder(slide, source, decoder):
    """The decoder to test with: OpenSlide renders a level whose downsample is not an integer at
    sub-pixel offsets (see pipeline/locality.py), so on such a level the test runs on level 0."""
    ds = float(slide.info.level_downsamples[decoder.raw.level])
    if slide.info.reader != "openslide" or ds == int(ds):
        return decoder
    from .nvimgcodec_decoder import TileDecoder, colour_specs
    from .raw_tiles import RawLevelUnavailable

    try:
        raw0 = source.level(0)
    except RawLevelUnavailable:
        return decoder
    spec = decoder.colour_spec if decoder.colour_spec in colour_specs(raw0) else None
    return _Borrowed(TileDecoder(source, raw0, backend=decoder.backend, device=decoder.device,
                                 stream=decoder.stream, colour_spec=spec, engine=decoder.engine))


class _Borrowed:
    """A test decoder sharing the slide's RawTileSource: closing it keeps the file open."""

    def __init__(self, decoder):
        self._decoder = decoder
        self.raw = decoder.raw

    def decode(self, indices):
        try:
            return self._decoder.decode(indices)
        finally:
            self._decoder.close(keep_source=True)


def compare_test_tile(slide, decoder) -> dict:
    """Decode the stored tile nearest the level's centre and compare it with the slide reader's
    read of the same pixels (an independent decoder: cuCIM or OpenSlide)."""
    raw = decoder.raw
    col, row = raw.tiles_across // 2, raw.tiles_down // 2
    index = raw.index(col, row)
    if raw.counts[index] == 0:   # sparse slide: take the first stored tile instead
        stored = np.flatnonzero(raw.counts)
        if not len(stored):
            return {"tile": None, "mean_abs_diff": 0.0, "max_abs_diff": 0}
        index = int(stored[0])
        col, row = raw.position(index)
    tile = decoder.decode([index])[0]
    ours = tile.cpu().numpy() if hasattr(tile, "cpu") else np.asarray(tile)
    w = min(raw.tile_w, raw.width - col * raw.tile_w)
    h = min(raw.tile_h, raw.height - row * raw.tile_h)
    ds = float(slide.info.level_downsamples[raw.level])
    location = (level_to_level0(col * raw.tile_w, ds), level_to_level0(row * raw.tile_h, ds))
    theirs = slide.read_region(location, raw.level, (w, h))
    diff = np.abs(ours[:h, :w].astype(np.int16) - theirs.astype(np.int16))
    return {"tile": [col, row], "level": raw.level, "mean_abs_diff": round(float(diff.mean()), 4),
            "max_abs_diff": int(diff.max())}

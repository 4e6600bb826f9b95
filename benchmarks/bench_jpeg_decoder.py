"""Where nvImageCodec's CPU JPEG decode spends more than libjpeg-turbo itself: the same stored tiles
decoded on one thread by the raw path's engine and by libjpeg-turbo called directly, three ways.

Why: the region path's blocks, each decoded on one thread, read more slowly through the raw path
than through cuCIM on JPEG slides (`region_blocks` in results/decode_cpu.json), and both end in
libjpeg-turbo. Arms, interleaved in every pass (each arm takes each place in the order in turn),
each decoding the tissue grid's stored tiles (whole) enough rounds for about 1 s:

  nvimgcodec    the raw path's engine (nvImageCodec's C API through jwth_engine._C, CPU backend,
                one thread), calls of 40 tiles, streams built beforehand (no file reads)
  ext_pattern   libjpeg-turbo as nvImageCodec's libjpeg-turbo extension calls it (its repository's
                jpeg_mem.cpp and libjpeg_turbo_decoder.cpp): a buffer of its own per tile, one row
                per jpeg_read_scanlines call into it, then the tile copied into the output image
  rows1         one row per call, straight into the output
  all_rows      every remaining row per call, straight into the output (TurboJPEG's pattern; cuCIM)

The libjpeg-turbo arms are benchmarks/libjpeg_direct.c, compiled here against the system's
libjpeg-turbo (headers needed: libjpeg-turbo's -dev package); nvImageCodec bundles its own build,
so `nvimgcodec / ext_pattern` also holds the difference between the two builds. Per pass, time
ratios (> 1: slower): rows1 / all_rows (the call pattern), ext_pattern / rows1 (the extension's own
buffer and copy), nvimgcodec / ext_pattern (nvImageCodec's framework, the binding and the build).
Pixels: every arm's output is compared with nvImageCodec's, tile by tile (max |delta|). Minor page
faults per tile are recorded per arm (a per-tile buffer that came fresh from the kernel would show).

    PYTHONPATH=python python benchmarks/bench_jpeg_decoder.py --repeats 15   # -> results/jpeg_decoder_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from _provenance import add_dry_run, dry_run_exit, finish, log, provenance, rotation, spread, write_result  # noqa: E402

MODES = {"rows1": 0, "all_rows": 1, "ext_pattern": 2}     # libjpeg_direct.c's modes
CALL = 40              # stored tiles per nvImageCodec call: what the grid reader asks for at a time
MIN_PASS_S = 1.0


def build_libjpeg_direct(folder: Path) -> ctypes.CDLL:
    """Compile libjpeg_direct.c against the system's libjpeg-turbo; RuntimeError (one line) if not."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) to build libjpeg_direct.c")
    lib = folder / "libjpeg_direct.so"
    proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(HERE / "libjpeg_direct.c"), "-ljpeg"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
        raise RuntimeError(f"cannot build libjpeg_direct.c against libjpeg-turbo (its -dev package?): {first}")
    handle = ctypes.CDLL(str(lib))
    handle.libjpeg_turbo_version.restype = ctypes.c_char_p
    handle.decode_tiles.restype = ctypes.c_int
    handle.decode_tiles.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return handle


class DirectDecoder:
    """libjpeg_direct.c over a fixed list of streams (one contiguous blob)."""

    def __init__(self, lib: ctypes.CDLL, streams: list[bytes], tile: tuple[int, int], rgb_stored: bool):
        self.lib, self.n, self.tile, self.rgb_stored = lib, len(streams), tile, int(rgb_stored)
        self.blob = np.frombuffer(b"".join(streams), np.uint8)
        self.lengths = np.array([len(s) for s in streams], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def decode(self, mode: str, out: np.ndarray, first: int = 0, count: int | None = None) -> None:
        count = self.n - first if count is None else count
        status = self.lib.decode_tiles(self.blob.ctypes.data, self.offsets[first:].ctypes.data,
                                       self.lengths[first:].ctypes.data, count, out.ctypes.data,
                                       self.tile[0], self.tile[1], MODES[mode], self.rgb_stored)
        if status != 0:
            raise RuntimeError(f"libjpeg-turbo failed on stored tile {first - status - 1} of the set")


def tissue_streams(path: str):
    """(slide, decoder, streams, tile (h, w), RGB-photometric?) for the stored tiles the tissue grid
    touches (what `score` decodes): the slide (the caller closes it), a one-thread TileDecoder on
    nvImageCodec's CPU backend (C API; the caller closes it) and each tile's complete JPEG stream."""
    from bench_decode import grid_stored_tiles, tissue_grid
    from jwth_engine.slide import open_slide
    from jwth_engine.slide.decoding import DecodeRequest, choose_decoder
    from jwth_engine.slide.raw_tiles import tile_stream

    slide = open_slide(path, reader="cucim")
    _, _, grid = tissue_grid(slide, None)
    choice = choose_decoder(slide, grid.level, DecodeRequest("cpu", "benchmark"), num_threads=1, engine="c-api")
    if choice.decoder is None:
        raise RuntimeError(f"{path}: no raw CPU path ({choice.note})")
    decoder = choice.decoder
    raw = decoder.raw
    if raw.codec != "jpeg":
        raise RuntimeError(f"{path}: level {grid.level} is {raw.codec}, not JPEG")
    indices = [i for i in grid_stored_tiles(slide, grid, choice) if raw.counts[i] > 0]
    streams = [tile_stream(raw, data) for data in decoder.source.read(raw, indices)]
    return slide, decoder, streams, (raw.tile_h, raw.tile_w), raw.colour == "rgb"


def max_deltas(engine, colour: str, direct: DirectDecoder, streams: list[bytes], tile: tuple[int, int]) -> dict:
    """Each libjpeg-turbo arm's pixels against nvImageCodec's, tile by tile: {mode: max |delta|}."""
    ours, theirs = np.empty((*tile, 3), np.uint8), np.empty((*tile, 3), np.uint8)
    out = {mode: 0 for mode in MODES}
    for k, stream in enumerate(streams):
        if any(engine.decode([stream], [ours], colour=colour)):
            raise RuntimeError(f"nvImageCodec failed on stored tile {k} of the set")
        for mode in MODES:
            direct.decode(mode, theirs, first=k, count=1)
            out[mode] = max(out[mode], int(np.abs(theirs.astype(np.int16) - ours).max()))
    return out


def bench_slide(lib: ctypes.CDLL, path: str, repeats: int) -> dict:
    slide, decoder, streams, tile, rgb_stored = tissue_streams(path)
    try:
        engine, colour = decoder._engine, decoder.colour_spec
        direct = DirectDecoder(lib, streams, tile, rgb_stored)
        outs = [np.empty((*tile, 3), np.uint8) for _ in range(CALL)]
        scratch = np.empty((*tile, 3), np.uint8)

        def nvimgcodec_once() -> None:
            for start in range(0, len(streams), CALL):
                chunk = streams[start:start + CALL]
                statuses = engine.decode(chunk, outs[:len(chunk)], colour=colour)
                if any(statuses):
                    raise RuntimeError(f"{path}: nvImageCodec failed on stored tiles {start}..{start + len(chunk)}")

        arms = {"nvimgcodec": nvimgcodec_once, **{mode: (lambda m=mode: direct.decode(m, scratch)) for mode in MODES}}

        max_delta = max_deltas(engine, colour, direct, streams, tile)
        rounds = max(1, math.ceil(MIN_PASS_S / max(_timed(arms["nvimgcodec"], 1), 1e-3)))
        seconds: dict[str, list[float]] = {name: [] for name in arms}
        faults: dict[str, list[float]] = {name: [] for name in arms}
        names = list(arms)
        for p in range(repeats):
            for name in rotation(names, p):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds[name].append(_timed(arms[name], rounds))
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        def ratio(a: str, b: str) -> dict:
            return spread([x / y for x, y in zip(seconds[a], seconds[b])])

        tiles = len(streams) * rounds
        return {"slide": path, "stored_tile": [tile[1], tile[0]], "stored_tiles": len(streams),
                "rounds_per_pass": rounds, "rgb_photometric": rgb_stored, "colour_spec": colour,
                "us_per_tile": {name: spread([1e6 * s / tiles for s in v], 1) for name, v in seconds.items()},
                "minor_page_faults_per_tile": {name: spread([f / tiles for f in v], 2) for name, v in faults.items()},
                "time_ratios": {"rows1_over_all_rows": ratio("rows1", "all_rows"),
                                "ext_pattern_over_rows1": ratio("ext_pattern", "rows1"),
                                "nvimgcodec_over_ext_pattern": ratio("nvimgcodec", "ext_pattern"),
                                "nvimgcodec_over_all_rows": ratio("nvimgcodec", "all_rows")},
                "max_abs_delta_vs_nvimgcodec": max_delta}
    finally:
        decoder.close()
        slide.close()


def _timed(fn, rounds: int) -> float:
    t = time.perf_counter()
    for _ in range(rounds):
        fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved passes per arm")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic 4:2:0 slide")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "jpeg_decoder_cpu.json")
    add_dry_run(parser)
    args = parser.parse_args(argv)
    dry_run_exit(args)
    from bench_decode import DATA
    from jwth_engine.slide.nvimgcodec_engines import nvimgcodec_version
    from synthetic_slide import write_slide

    prov = provenance(argv if argv is None else [sys.argv[0], *argv], nvimgcodec=nvimgcodec_version())
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_libjpeg_direct(Path(tmp))
        prov["libjpeg_turbo_system"] = lib.libjpeg_turbo_version().decode()
        slides = [str(DATA / "wsi" / "aperio_svs" / "CMU-1-Small-Region.svs")]
        if not args.no_synthetic:
            slides.append(str(Path(tmp) / "synthetic_12k.tiff"))
            write_slide(slides[-1], width=12000, height=9000)
        results = []
        for path in slides:
            results.append(bench_slide(lib, path, args.repeats))
            r = results[-1]["time_ratios"]
            log(f"{Path(path).name}: nvimgcodec / all_rows {r['nvimgcodec_over_all_rows']['median']}, rows1 / all_rows "
                f"{r['rows1_over_all_rows']['median']}, ext_pattern / rows1 {r['ext_pattern_over_rows1']['median']}, "
                f"nvimgcodec / ext_pattern {r['nvimgcodec_over_ext_pattern']['median']}")
    report = {"benchmark": "jpeg_decoder", "provenance": finish(prov),
              "settings": {"threads": 1, "repeats": args.repeats, "call": CALL, "min_pass_s": MIN_PASS_S,
                           "statistic": "median of per-pass values (min, max given)",
                           "tiles": "stored tiles the tissue grid touches (target 0.5 um/px, 224 px, min tissue 0.25)"},
              "slides": results}
    write_result(args.out, report)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

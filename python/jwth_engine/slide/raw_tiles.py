"""The stored tiles of a tiled TIFF-family slide: where each tile's compressed bytes are, and reading them.

This is the input side of the raw-tile decode path (decode/): no pixel is decoded here. A level is
raw-decodable when its TIFF directory is tiled, chunky (one tile holds all samples), 8-bit, and
compressed with a codec the batch decoder takes: JPEG (7) or JPEG 2000 (Aperio 33003/33005, TIFF
34712). Everything else (NDPI strips, deflate/LZW tiles, planar storage, odd photometrics) gets a
`RawLevelUnavailable` whose message says why, and the pipeline reads that level through the
slide's reader as before.

JPEG tiles in TIFF are usually abbreviated streams: the quantisation and Huffman tables sit once in
the directory's JPEGTables tag, not in each tile. `tile_stream` splices them in (tables without
their EOI + tile without its SOI), which is what libtiff does before handing a tile to libjpeg.

Reads: the wanted tiles are sorted by file offset and adjacent ones (gaps up to `MAX_GAP` bytes)
are read with one `os.pread` per run; a pyramid is written level by level in row-major tile order,
so a batch of neighbouring model tiles is one or two sequential reads. `os.pread` on a shared
descriptor is safe from several threads.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import SlideError

# TIFF codes (TIFF 6.0; Aperio's are documented by OpenSlide's aperio format notes).
JPEG = 7
APERIO_J2K_YCBCR = 33003
APERIO_J2K_RGB = 33005
JPEG2000 = 34712
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6

MAX_GAP = 64 << 10   # read through gaps this small rather than issue another read


class RawLevelUnavailable(Exception):
    """The level cannot be decoded from its raw tiles; the message is the reason (for `reader`)."""


@dataclass(frozen=True)
class RawLevel:
    """One pyramid level as stored: a grid of compressed tiles."""

    level: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    tiles_down: int
    codec: str                      # "jpeg" | "jpeg2000"
    colour: str                     # "rgb": components are R, G, B; "ycbcr": decoder converts (JPEG)
                                    # "ycbcr-raw": JPEG 2000 components are Y, Cb, Cr, converted by us
    compression: int
    photometric: int
    offsets: np.ndarray             # int64 [tiles_down * tiles_across], row-major
    counts: np.ndarray              # int64, 0 = tile not stored (sparse slides: background)
    jpeg_tables: bytes | None

    def index(self, col: int, row: int) -> int:
        return row * self.tiles_across + col

    def position(self, index: int) -> tuple[int, int]:
        """(col, row) of a tile index."""
        return index % self.tiles_across, index // self.tiles_across


def _describe(page) -> str:
    return f"TIFF directory {page.index}"


def raw_level_from_page(level: int, page) -> RawLevel:
    """Check one tifffile page and describe its tile grid; RawLevelUnavailable says why not."""
    where = _describe(page)
    # tifffile presents an NDPI level's JPEG restart intervals as "tiles"; they are not
    # standalone streams. Only directories with a real TileWidth tag (322) are tiled.
    if not page.is_tiled or page.tags.get(322) is None:
        raise RawLevelUnavailable(f"{where} is stored in strips, not tiles")
    compression = int(page.compression)
    photometric = int(page.photometric)
    if compression == JPEG:
        codec = "jpeg"
        if photometric == PHOTOMETRIC_RGB:
            colour = "rgb"         # RGB components in the JPEG stream (Aperio): no colour transform
        elif photometric == PHOTOMETRIC_YCBCR:
            colour = "ycbcr"
        else:
            raise RawLevelUnavailable(f"{where}: JPEG tiles with photometric {photometric} "
                                      "(only RGB and YCbCr are decoded raw)")
    elif compression in (APERIO_J2K_YCBCR, APERIO_J2K_RGB, JPEG2000):
        codec = "jpeg2000"
        colour = "ycbcr-raw" if compression == APERIO_J2K_YCBCR else "rgb"
    else:
        raise RawLevelUnavailable(f"{where}: TIFF compression {compression} is not JPEG or JPEG 2000")
    if int(page.planarconfig) != 1:
        raise RawLevelUnavailable(f"{where}: planar (separate) sample storage")
    if int(page.samplesperpixel) != 3:
        raise RawLevelUnavailable(f"{where}: {page.samplesperpixel} samples per pixel (raw path decodes RGB)")
    bits = page.bitspersample
    if (bits if isinstance(bits, int) else max(bits)) != 8:
        raise RawLevelUnavailable(f"{where}: {bits} bits per sample")
    if page.imagedepth and int(page.imagedepth) > 1:
        raise RawLevelUnavailable(f"{where}: a 3-D (tile depth) image")
    width, height = int(page.imagewidth), int(page.imagelength)
    tw, th = int(page.tilewidth), int(page.tilelength)
    across, down = -(-width // tw), -(-height // th)
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if len(offsets) != across * down or len(counts) != across * down:
        raise RawLevelUnavailable(f"{where}: {len(offsets)} tile offsets for a {across}x{down} tile grid")
    tables = page.jpegtables if codec == "jpeg" else None
    if tables is not None:
        tables = bytes(tables)
    return RawLevel(level, width, height, tw, th, across, down, codec, colour, compression, photometric,
                    offsets, counts, tables)


def _candidate_pages(tif) -> list:
    """Tiled directories that may hold pyramid levels: series levels (SubIFD pyramids) first, then
    every top-level directory. Series levels also carry tifffile's reading of vendor layouts: for
    Philips TIFF it sizes the levels below the first from the XML, cutting off the padding to
    whole tiles that OpenSlide and cuCIM clip too, so those pages match the reader's levels
    (tests/test_raw_decode.py::test_philips_tiff_every_level_raw_and_equal_to_reader)."""
    pages, seen = [], set()
    for series in tif.series:
        for lvl in getattr(series, "levels", [series]):
            page = lvl.keyframe
            if page is not None and page.offset not in seen:
                seen.add(page.offset)
                pages.append(page)
    for page in tif.pages:
        if page.offset not in seen:
            seen.add(page.offset)
            pages.append(page)
    return pages


class RawTileSource:
    """Open handle to a slide's raw tiles, levels matched to the slide reader's levels by size.

    `level(i)` returns the RawLevel or raises RawLevelUnavailable; `read(level, indices)` returns the
    compressed bytes of those tiles (b"" for tiles not stored).
    """

    def __init__(self, path: str, level_dimensions, vendor: str = ""):
        import tifffile

        self.path = path
        self._levels: dict[int, RawLevel] = {}
        self._why_not: dict[int, str] = {}
        try:
            with tifffile.TiffFile(path) as tif:
                pages = _candidate_pages(tif)
                for level, (w, h) in enumerate(level_dimensions):
                    match = [p for p in pages if int(p.imagewidth) == int(w) and int(p.imagelength) == int(h)]
                    if not match:
                        self._why_not[level] = (f"no tiled TIFF directory of {w}x{h} px for level {level} "
                                                "(the reader synthesises it)")
                        continue
                    try:
                        self._levels[level] = raw_level_from_page(level, match[0])
                    except RawLevelUnavailable as exc:
                        self._why_not[level] = str(exc)
        except (tifffile.TiffFileError, ValueError, OSError, KeyError) as exc:
            raise RawLevelUnavailable(f"tifffile cannot index the file ({type(exc).__name__}: {exc})") from exc
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()

    def level(self, level: int) -> RawLevel:
        if level in self._levels:
            return self._levels[level]
        raise RawLevelUnavailable(self._why_not.get(level, f"level {level} does not exist"))

    def read(self, raw: RawLevel, indices) -> list[bytes]:
        """Compressed bytes of tiles `indices` (any order), one pread per run of adjacent tiles."""
        indices = [int(i) for i in indices]
        out: list[bytes] = [b""] * len(indices)
        order = sorted((k for k in range(len(indices)) if raw.counts[indices[k]] > 0),
                       key=lambda k: raw.offsets[indices[k]])
        run: list[int] = []
        run_end = 0
        for k in order:
            start = int(raw.offsets[indices[k]])
            end = start + int(raw.counts[indices[k]])
            if run and start - run_end > MAX_GAP:
                self._read_run(raw, indices, run, out)
                run = []
            run_end = end if not run else max(run_end, end)
            run.append(k)
        if run:
            self._read_run(raw, indices, run, out)
        return out

    def _read_run(self, raw: RawLevel, indices: list[int], run: list[int], out: list[bytes]) -> None:
        first = int(raw.offsets[indices[run[0]]])
        end = max(int(raw.offsets[indices[k]] + raw.counts[indices[k]]) for k in run)
        if end > self._size:
            bad = next(k for k in run if int(raw.offsets[indices[k]] + raw.counts[indices[k]]) > self._size)
            col, row = raw.position(indices[bad])
            raise SlideError(self.path, f"stored tile (col {col}, row {row}) of level {raw.level} runs past the "
                                        f"end of the file (truncated)")
        data = os.pread(self._fd, end - first, first)
        if len(data) != end - first:
            raise SlideError(self.path, f"short read at byte {first:,} of level {raw.level} (file changed?)")
        view = memoryview(data)
        for k in run:
            start = int(raw.offsets[indices[k]]) - first
            out[k] = bytes(view[start:start + int(raw.counts[indices[k]])])

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def tile_stream(raw: RawLevel, data: bytes) -> bytes:
    """A tile's bytes as a complete codestream the decoder accepts."""
    if raw.codec == "jpeg" and raw.jpeg_tables and len(raw.jpeg_tables) > 4:
        # tables: SOI ... EOI; tile: SOI ... EOI. Keep the tables' SOI, drop its EOI and the tile's SOI.
        return raw.jpeg_tables[:-2] + data[2:]
    return data

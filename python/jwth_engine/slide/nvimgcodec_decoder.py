"""Batch decoding of stored slide tiles with nvImageCodec, on the GPU or on its CPU backend.

`TileDecoder.decode(indices)` reads the compressed tiles (raw_tiles.py) and decodes them in one
batch through a decode engine (nvimgcodec_engines.py: nvImageCodec's C API through
jwth_engine._C by default, its Python API as the reference). On the CPU backend (libjpeg-turbo for
JPEG, OpenJPEG through OpenCV for JPEG 2000) each tile is a numpy array; on the GPU (nvJPEG's
hardware decoder where the GPU has one, its CUDA decoder otherwise; nvJPEG2000 for JPEG 2000) a
torch tensor that torch allocated on the decoder's device and the decoder wrote, ordered on the
caller's CUDA stream (the decode is issued on it). Either way one tile is [tile_h, tile_w, 3] uint8
RGB with the part outside the level painted white, as `Slide.read_region` pads.

Regions (`decode(indices, regions)`, JPEG on the CPU backend): of a stored tile only the part the
model tiles need is decoded, into that part of the tile's array (nvImageCodec's code stream views:
its libjpeg-turbo extension, extensions/libjpeg_turbo/jpeg_mem.cpp in its repository, calls jpeg_crop_scanline for
the columns, one pixel wider on each side and widened to whole MCUs, and jpeg_skip_scanlines for
the rows above and below the region). The rest of that array is left
undefined: the grid reader never reads it. Equal to the whole tile's decode over the region
(tests/test_nvimgcodec_engines.py: random regions and edge strips of 4:4:4, 4:2:2 and 4:2:0 tiles,
both engines). Not on the GPU: region decode there has not been run or measured.

Colour, decided by the TIFF directory and not by markers inside the stream:
* JPEG, photometric RGB (Aperio): the stream's three components are R, G, B, but a JPEG decoder
  would treat them as YCbCr. Asking nvImageCodec for SYCC output returns the components as
  stored (no colour transform): checked equal to OpenSlide's pixels on CMU-1-Small-Region.
* JPEG, photometric YCbCr: decoded to sRGB by the decoder, with libjpeg's default (fancy)
  chroma upsampling, which is what OpenSlide and cuCIM get from libjpeg.
* JPEG 2000, Aperio 33005 / TIFF 34712: decoded to sRGB (the codestream's own MCT, if any, is
  undone by the decoder). Aperio 33003 stores Y, Cb, Cr without MCT: decoded unchanged and
  converted here with the JFIF (BT.601 full-range) equations OpenSlide uses.
These are what the CPU backend needs, checked on the test slides. A GPU decoder might read a
stream's colour otherwise, so `colour_specs` lists other specs too, and choose_decoder tries them in
turn when the test tile does not match the slide reader's (the one kept is in the summary).
"""

from __future__ import annotations

import numpy as np

from ..errors import SlideError
from .base import WHITE
from .nvimgcodec_engines import TileStatus, make_engine
from .raw_tiles import RawLevel, RawTileSource, tile_stream

BACKENDS = ("cpu", "gpu")
# Where a stream must end. A tile cut short (a truncated write, a damaged copy) loses its end
# marker; libjpeg would pad it with grey and only warn, so this is checked before decoding.
_END_MARKER = b"\xff\xd9"       # JPEG EOI and JPEG 2000 EOC share the code
_END_SEARCH = 32                # encoders may pad a few bytes after the marker
_PROBLEMS = {TileStatus.UNPARSABLE: "is not a stream nvImageCodec can parse",
             TileStatus.DECODE_FAILED: "cannot be decoded (corrupt data)"}


def colour_specs(raw: RawLevel) -> tuple[str, ...]:
    """The nvImageCodec colour specs that may give this level's RGB, the expected one first (the
    module docstring; checked on the CPU backend against OpenSlide). choose_decoder tries the others
    when the test tile does not match with it: a GPU decoder may take a stream's colour from other
    markers than libjpeg does (an Aperio tile's components are R, G, B with no Adobe marker), and a
    slide it misreads should still decode on the GPU rather than fall back."""
    if raw.colour == "ycbcr-raw":
        return ("UNCHANGED",)                   # converted here: only the stored components will do
    if raw.codec == "jpeg" and raw.colour == "rgb":
        return ("SYCC", "UNCHANGED", "SRGB")
    return ("SRGB", "UNCHANGED")


def cuda_device(device=None):
    """(torch.device, CUDA device index) for `device` (None: the current CUDA device)."""
    import torch

    device = torch.device(device if device is not None else "cuda")
    return device, device.index if device.index is not None else torch.cuda.current_device()


class TileDecoder:
    """Decodes stored tiles of one level. Not thread-safe: one reader thread drives it.

    `backend` "cpu" returns numpy arrays; "gpu" returns torch uint8 tensors on `device`, produced
    on `stream` (a torch.cuda.Stream; the caller's current stream when None). `engine`: see
    nvimgcodec_engines.make_engine.
    """

    def __init__(self, source: RawTileSource, raw: RawLevel, *, backend: str, device=None, stream=None,
                 num_threads: int = 0, colour_spec: str | None = None, engine: str = "auto"):
        """`colour_spec`: the nvImageCodec ColorSpec asked for (a name of `colour_specs(raw)`),
        by default the first of them."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.source, self.raw, self.backend = source, raw, backend
        self.device = device
        self.stream = stream
        device_id = 0
        if backend == "gpu":
            self.device, device_id = cuda_device(device)
        self._engine = make_engine(backend, device_id, num_threads, engine)
        self.colour_spec = colour_spec or colour_specs(raw)[0]
        # Regions: see the module docstring (JPEG 2000 through OpenCV decodes the whole tile anyway).
        self.decodes_regions = backend == "cpu" and raw.codec == "jpeg"
        self.tiles_decoded = 0

    @property
    def name(self) -> str:
        return f"nvimgcodec-{self.backend}"

    @property
    def engine(self) -> str:
        """Which nvImageCodec API decodes: "c-api" or "python-api"."""
        return self._engine.name

    @property
    def engine_why(self) -> str:
        """Why that engine, when "auto" could not have the C API (else "")."""
        return self._engine.why

    def decode(self, indices, regions=None) -> list:
        """Tiles `indices` of the level, in that order. Raises SlideError naming a bad tile.

        `regions`: None, or per tile (x0, y0, x1, y1) in its pixels, Python ints (or None: all
        of it). Where
        `decodes_regions`, only that part of the tile's array is decoded (the rest is undefined);
        elsewhere regions are ignored and whole tiles decoded."""
        raw = self.raw
        indices = [int(i) for i in indices]
        datas = self.source.read(raw, indices)
        streams, where, boxes = [], [], []
        out: list = [None] * len(indices)
        whole = (0, 0, raw.tile_w, raw.tile_h)
        for k, (index, data) in enumerate(zip(indices, datas)):
            if not data:
                out[k] = self._white()     # not stored (sparse slide): background
                continue
            if _END_MARKER not in data[-_END_SEARCH:]:
                raise self._tile_error(index, "is truncated (its data has no end-of-image marker)")
            streams.append(tile_stream(raw, data))
            where.append(k)
            box = regions[k] if regions is not None and self.decodes_regions else None
            boxes.append(tuple(box) if box is not None else whole)
        if streams:
            with self._on_stream():
                tiles = [self._empty() for _ in streams]
                statuses = self._run(streams, [tile[y0:y1, x0:x1] for tile, (x0, y0, x1, y1) in zip(tiles, boxes)],
                                     [None if box == whole else box for box in boxes])
                for k, tile, status in zip(where, tiles, statuses):
                    if status != TileStatus.OK:
                        raise self._tile_error(indices[k], self._problem(status))
                    out[k] = self._finish(indices[k], tile)
        self.tiles_decoded += len(streams)
        return out

    def _run(self, streams: list[bytes], outputs: list, regions: list) -> list[int]:
        cuda_stream = 0
        if self.backend == "gpu":
            import torch

            cuda_stream = (self.stream or torch.cuda.current_stream(self.device)).cuda_stream
        try:
            return self._engine.decode(streams, outputs, colour=self.colour_spec, cuda_stream=cuda_stream,
                                       regions=regions, tile=(self.raw.tile_h, self.raw.tile_w))
        except (RuntimeError, ValueError) as exc:
            raise SlideError(self.source.path, f"nvImageCodec failed on a batch of {len(streams)} stored tiles "
                                               f"of level {self.raw.level}: {exc}") from exc

    def _problem(self, status: int) -> str:
        if status == TileStatus.WRONG_SIZE:
            return f"is not {self.raw.tile_w}x{self.raw.tile_h} pixels as its TIFF directory says"
        return _PROBLEMS.get(TileStatus(status), f"failed to decode (status {status})")

    def _on_stream(self):
        """GPU: allocations and the decode on `stream` (when given)."""
        if self.backend == "gpu" and self.stream is not None:
            import torch

            return torch.cuda.stream(self.stream)
        return _null()

    def _empty(self):
        shape = (self.raw.tile_h, self.raw.tile_w, 3)
        if self.backend == "gpu":
            import torch

            return torch.empty(shape, dtype=torch.uint8, device=self.device)
        return np.empty(shape, np.uint8)

    def _finish(self, index: int, tile):
        raw = self.raw
        if raw.colour == "ycbcr-raw":
            tile = ycbcr_to_rgb(tile)
        col, row = raw.position(index)
        w_in = raw.width - col * raw.tile_w
        h_in = raw.height - row * raw.tile_h
        if w_in < raw.tile_w:
            tile[:, w_in:] = WHITE      # stored edge tiles are padded with whatever the scanner wrote
        if h_in < raw.tile_h:
            tile[h_in:, :] = WHITE
        return tile

    def _white(self):
        shape = (self.raw.tile_h, self.raw.tile_w, 3)
        if self.backend == "gpu":
            import torch

            return torch.full(shape, WHITE, dtype=torch.uint8, device=self.device)
        return np.full(shape, WHITE, np.uint8)

    def _tile_error(self, index: int, problem: str) -> SlideError:
        col, row = self.raw.position(index)
        raw = self.raw
        return SlideError(self.source.path, f"stored tile (col {col}, row {row}) of level {raw.level} "
                                            f"(level pixels x {col * raw.tile_w}, y {row * raw.tile_h}) {problem}")

    def close(self, *, keep_source: bool = False) -> None:
        """Return the engine's decoders to their pool and (unless `keep_source`) close the file. Idempotent."""
        self._engine.close()
        if not keep_source:
            self.source.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def ycbcr_to_rgb(tile):
    """JFIF YCbCr -> RGB (uint8, rounded, clamped), numpy on the CPU or torch on the tile's device."""
    if isinstance(tile, np.ndarray):
        ycc = tile.astype(np.float32)
        y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
        rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    import torch

    ycc = tile.float()
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=-1)
    return rgb.round_().clamp_(0, 255).to(torch.uint8)

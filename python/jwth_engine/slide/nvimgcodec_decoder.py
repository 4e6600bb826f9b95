"""Batch decoding of stored slide tiles with nvImageCodec, on the GPU or on its CPU backend.

`TileDecoder.decode(indices)` reads the compressed tiles (raw_tiles.py) and decodes them in one
`Decoder.decode` call. On the CPU backend (libjpeg-turbo for JPEG, OpenJPEG through OpenCV for
JPEG 2000) the results are numpy views of host buffers; on the GPU (nvJPEG's hardware decoder where
the GPU has one, its CUDA decoder otherwise; nvJPEG2000 for JPEG 2000) they are torch tensors
taken over from the decoder's device buffers through DLPack, without a copy, ordered on the
caller's CUDA stream (the decoder runs on that stream, and `torch.from_dlpack` on the same current
stream needs no extra synchronisation). Either way one tile is [tile_h, tile_w, 3] uint8 RGB with
the part outside the level painted white, as `Slide.read_region` pads.

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

Decoders are pooled per process (creating one loads codec extensions) and each is used by one
thread at a time. On the CPU, a batch is shared out in small chunks among `num_threads`
single-threaded decoders run from as many Python threads (the decode call releases the GIL):
nvImageCodec's own executor keeps one core free (on a 2-core machine it decodes on one thread, and
then trails cuCIM's two). nvImageCodec logs to stderr through its own messenger and OpenCV's; both
are turned down unless the user set their variables, because every failure is detected on the
result (a None image, a wrong shape) and reported as one line naming the tile.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable, SlideError
from .base import WHITE
from .raw_tiles import RawLevel, RawTileSource, tile_stream

INSTALL_HINT = ("pip install 'jwth-engine[cu13]' (nvidia-nvimgcodec-cu13 with its nvjpeg and nvjpeg2k extras; "
                "'[cu12]' for a CUDA 12 driver)")
BACKENDS = ("cpu", "gpu")
# Where a stream must end. A tile cut short (a truncated write, a damaged copy) loses its end
# marker; libjpeg would pad it with grey and only warn, so this is checked before decoding.
_END_MARKER = b"\xff\xd9"       # JPEG EOI and JPEG 2000 EOC share the code
_END_SEARCH = 32                # encoders may pad a few bytes after the marker
# CPU work sharing: a batch is cut into about this many chunks per decoder thread, of at least
# _MIN_CHUNK tiles (each decode call costs a little beyond its tiles).
_CHUNKS_PER_THREAD = 4
_MIN_CHUNK = 4

_import_lock = threading.Lock()
_module = None


def import_nvimgcodec():
    """The nvidia.nvimgcodec module, or BackendUnavailable saying what to install."""
    global _module
    with _import_lock:
        if _module is None:
            os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
            os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
            try:
                from nvidia import nvimgcodec
            except ImportError as exc:
                raise BackendUnavailable(f"nvImageCodec is not installed ({exc}); {INSTALL_HINT}") from exc
            except OSError as exc:
                raise BackendUnavailable(f"nvImageCodec cannot load its native library ({exc}); {INSTALL_HINT}") from exc
            _module = nvimgcodec
        return _module


def nvimgcodec_version() -> str | None:
    try:
        return str(getattr(import_nvimgcodec(), "__version__", "installed"))
    except BackendUnavailable:
        return None


@dataclass(frozen=True)
class DecoderKey:
    backend: str
    device_id: int
    threads: int


class _DecoderPool:
    """nvImageCodec decoders, one user at a time each, kept for reuse across slides."""

    def __init__(self):
        self._free: dict[DecoderKey, list] = {}
        self._lock = threading.Lock()

    def acquire(self, key: DecoderKey):
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return _make_decoder(key)

    def release(self, key: DecoderKey, decoder) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(decoder)


def _make_decoder(key: DecoderKey):
    n = import_nvimgcodec()
    if key.backend == "cpu":
        device_id = n.NVIMGCODEC_DEVICE_CPU_ONLY
        backends = [n.Backend(n.BackendKind.CPU_ONLY)]
    else:
        device_id = key.device_id
        # Order is preference: the hardware JPEG engine (A100, H100, ...), then CUDA decoders.
        # No CPU backend: its output would land in host memory.
        backends = [n.Backend(n.BackendKind.HW_GPU_ONLY), n.Backend(n.BackendKind.GPU_ONLY),
                    n.Backend(n.BackendKind.HYBRID_CPU_GPU)]
    try:
        # options="": libjpeg's defaults (fancy upsampling on), as OpenSlide and cuCIM decode.
        return n.Decoder(device_id=device_id, max_num_cpu_threads=key.threads, backends=backends, options="")
    except (RuntimeError, ValueError) as exc:
        raise BackendUnavailable(f"nvImageCodec cannot create a {key.backend.upper()} decoder ({exc}); "
                                 f"{INSTALL_HINT}") from exc


DECODER_POOL = _DecoderPool()


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
    on `stream` (a torch.cuda.Stream; the caller's current stream when None).
    """

    def __init__(self, source: RawTileSource, raw: RawLevel, *, backend: str, device=None, stream=None,
                 num_threads: int = 0, colour_spec: str | None = None):
        """`colour_spec`: the nvImageCodec ColorSpec asked for (a name of `colour_specs(raw)`),
        by default the first of them."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.source, self.raw, self.backend = source, raw, backend
        self.device = device
        self.stream = stream
        n = import_nvimgcodec()
        device_id = 0
        if backend == "gpu":
            self.device, device_id = cuda_device(device)
        # CPU: one single-threaded decoder per thread (see the module docstring); GPU: one decoder.
        parts = max(1, int(num_threads)) if backend == "cpu" else 1
        self._key = DecoderKey(backend, device_id, 1 if backend == "cpu" else max(0, int(num_threads)))
        self._decoders = [DECODER_POOL.acquire(self._key) for _ in range(parts)]
        self._threads = ThreadPoolExecutor(parts, thread_name_prefix="jwth-nvimgcodec") if parts > 1 else None
        self._count_lock = threading.Lock()
        self.colour_spec = colour_spec or colour_specs(raw)[0]
        self._params = n.DecodeParams(color_spec=getattr(n.ColorSpec, self.colour_spec), apply_exif_orientation=False)
        self._n = n
        self.tiles_decoded = 0

    @property
    def name(self) -> str:
        return f"nvimgcodec-{self.backend}"

    def decode(self, indices) -> list:
        """Tiles `indices` of the level, in that order. Raises SlideError naming a bad tile.

        On the CPU with several decoders, each thread takes chunks of the (sorted) indices as it
        frees up, and reads, decodes and finishes them: file reads and colour/edge fix-ups overlap
        decoding too."""
        indices = [int(i) for i in indices]
        parts = len(self._decoders)
        if parts > 1 and len(indices) >= 2 * parts:
            # Small chunks handed out as threads free up: a stored tile's decode time varies
            # several-fold (background vs dense tissue), and fixed halves left one core idle while
            # the other finished (+5 % tiles/s on the decode benchmark's two JPEG slides in an A/B
            # of 7 interleaved passes each on a 2-core AMD EPYC, not kept as JSON).
            size = max(_MIN_CHUNK, -(-len(indices) // (parts * _CHUNKS_PER_THREAD)))
            chunks = [indices[s:s + size] for s in range(0, len(indices), size)]
            order = itertools.count()       # next() on a count is atomic under the GIL
            results: list = [None] * len(chunks)

            def work(decoder) -> None:
                while (k := next(order)) < len(chunks):
                    results[k] = self._decode_with(decoder, chunks[k])

            list(self._threads.map(work, self._decoders))      # re-raises a thread's SlideError
            return [tile for chunk in results for tile in chunk]
        return self._decode_with(self._decoders[0], indices)

    def _decode_with(self, decoder, indices: list[int]) -> list:
        raw = self.raw
        datas = self.source.read(raw, indices)
        streams, where = [], []
        out: list = [None] * len(indices)
        for k, (index, data) in enumerate(zip(indices, datas)):
            if not data:
                out[k] = self._white()     # not stored (sparse slide): background
                continue
            if _END_MARKER not in data[-_END_SEARCH:]:
                raise self._tile_error(index, "is truncated (its data has no end-of-image marker)")
            streams.append(self._n.CodeStream(tile_stream(raw, data)))
            where.append(k)
        if streams:
            images = self._run(decoder, streams)
            for k, image in zip(where, images):
                out[k] = self._finish(indices[k], image)
        with self._count_lock:
            self.tiles_decoded += len(streams)
        return out

    def _run(self, decoder, streams: list) -> list:
        cuda_stream = 0
        if self.backend == "gpu":
            import torch

            stream = self.stream or torch.cuda.current_stream(self.device)
            cuda_stream = stream.cuda_stream
        try:
            images = decoder.decode(streams, params=self._params, cuda_stream=cuda_stream)
        except (RuntimeError, ValueError) as exc:
            raise SlideError(self.source.path, f"nvImageCodec failed on a batch of {len(streams)} stored tiles "
                                               f"of level {self.raw.level}: {exc}") from exc
        if len(images) != len(streams):
            raise SlideError(self.source.path, f"nvImageCodec returned {len(images)} of {len(streams)} tiles")
        return images

    def _finish(self, index: int, image):
        raw = self.raw
        if image is None:
            raise self._tile_error(index, "cannot be decoded (corrupt data)")
        if self.backend == "gpu":
            import torch

            with torch.cuda.stream(self.stream) if self.stream is not None else _null():
                tile = torch.from_dlpack(image)
        else:
            tile = np.asarray(image)
        if tuple(tile.shape) != (raw.tile_h, raw.tile_w, 3):
            raise self._tile_error(index, f"decoded to {tuple(tile.shape)}, not {(raw.tile_h, raw.tile_w, 3)}")
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
        """Return the decoder to the pool and (unless `keep_source`) close the file. Idempotent."""
        decoders, self._decoders = self._decoders, []
        for decoder in decoders:
            DECODER_POOL.release(self._key, decoder)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
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

"""The two ways of driving nvImageCodec: its C API through jwth_engine._C, and its Python API.

Both decode a batch of complete code streams (JPEG or JPEG 2000) into caller-allocated
[tile_h, tile_w, 3] uint8 buffers (numpy arrays on the CPU backend, torch tensors on the decoder's
GPU) and return one `TileStatus` per stream; the tile decoder (nvimgcodec_decoder.py) turns a
failure into a line naming the tile. With `regions`, only part of a tile is decoded (nvImageCodec's
code stream views), into an output of that part's size: a view into a whole tile's array.

* `CApiEngine` (the default): csrc/decode/nvimgcodec_batch.cpp. One GIL release per batch; on the
  CPU its `threads` single-threaded decoders take tiles a few at a time as they free up; on the
  GPU one call decodes the whole batch into the given device buffers, ordered on the caller's
  stream (no DLPack hand-over, no copy).
* `PythonApiEngine`: nvImageCodec's own Python `Decoder.decode`, with the batch shared out among
  `threads` single-threaded decoders run from Python threads. The reference the C API path is
  tested against (equal pixels), and the path when `_C` was built without nvImageCodec's header.

Why the C API is the default: nvImageCodec's Python `decode` releases and re-takes the GIL around
every tile's image-info query and buffer allocation. Beside a thread running Python (the
pipeline's main thread, the reader cutting model tiles) each re-take can wait the interpreter's
switch interval (5 ms). benchmarks/results/decode_cpu.json (8b47186, 2-core CPU machine): one
single-threaded decoder, calls of 40 stored tiles, beside a busy Python thread kept 0.05-0.07 of
its speed alone through the Python API on the JPEG slides and 0.44-0.49 through the C API (its one
re-take per call); in the grid reader alone the C API read 1.14x and 1.18x the Python API's
tiles/s on the two JPEG slides (every one of 15 passes) and 1.06x on JPEG 2000 (not resolved).
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..errors import BackendUnavailable

INSTALL_HINT = ("pip install 'jwth-engine[cu13]' (nvidia-nvimgcodec-cu13 with its nvjpeg and nvjpeg2k extras; "
                "'[cu12]' for a CUDA 12 driver)")
ENGINES = ("auto", "c-api", "python-api")
# Python API work sharing: a batch is cut into about this many chunks per decoder thread, of at
# least _MIN_CHUNK tiles (each decode call costs a little beyond its tiles).
_CHUNKS_PER_THREAD = 4
_MIN_CHUNK = 4

_import_lock = threading.Lock()
_module = None


class TileStatus(IntEnum):
    """How one tile's decode ended (the values of csrc/decode/nvimgcodec_batch.h's TileStatus)."""

    OK = 0
    UNPARSABLE = 1       # not a code stream nvImageCodec recognises
    WRONG_SIZE = 2       # its image is not the TIFF directory's tile size
    DECODE_FAILED = 3    # the decoder gave up on it (corrupt data, or no backend took it)


def import_nvimgcodec():
    """The nvidia.nvimgcodec module, or BackendUnavailable saying what to install."""
    global _module
    with _import_lock:
        if _module is None:
            # nvImageCodec logs to stderr through its own messenger and OpenCV's; both are turned
            # down unless the user set their variables, because every failure is detected on the
            # result (a status, a None image) and reported as one line naming the tile.
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
    backend: str        # "cpu" | "gpu"
    device_id: int
    threads: int        # CPU: decoder threads; GPU: nvImageCodec's CPU helper threads (0 = its default)


class _Pool:
    """Decoders, one user at a time each, kept for reuse across slides (making one loads codec
    extensions)."""

    def __init__(self, make):
        self._make = make
        self._free: dict[DecoderKey, list] = {}
        self._lock = threading.Lock()

    def acquire(self, key: DecoderKey):
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return self._make(key)

    def release(self, key: DecoderKey, decoder) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(decoder)


def _make_python_decoder(key: DecoderKey):
    """One nvImageCodec Python `Decoder` (CPU: single-threaded, as `PythonApiEngine` runs one per thread)."""
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


def _make_batch(key: DecoderKey):
    """One C API batch decoder (jwth_engine._C.NvImageCodecBatch) for `key`."""
    why = _c_api_missing()
    if why is not None:
        raise BackendUnavailable(why)
    from .. import _native

    folder = os.path.dirname(import_nvimgcodec().__file__)
    # The codec extensions from where nvImageCodec's Python module takes them: its variable, else
    # the wheel's folder.
    extensions = os.environ.get("NVIMGCODEC_EXTENSIONS_PATH") or os.path.join(folder, "extensions")
    try:
        return _native.load().NvImageCodecBatch(os.path.join(folder, "libnvimgcodec.so.0"), extensions,
                                                gpu=key.backend == "gpu",
                                                device_id=key.device_id, threads=key.threads)
    except RuntimeError as exc:
        raise BackendUnavailable(f"nvImageCodec's C API cannot make a {key.backend.upper()} decoder ({exc})") from exc


PYTHON_DECODERS = _Pool(_make_python_decoder)
BATCH_DECODERS = _Pool(_make_batch)


def c_api_unavailable() -> str | None:
    """Why the C API engine cannot run here (None when it can): what `_c_api_missing` checks, then
    a CPU decoder made (and pooled), which opens the library and checks its version."""
    why = _c_api_missing()
    if why is not None:
        return why
    key = DecoderKey("cpu", 0, 1)
    try:
        BATCH_DECODERS.release(key, BATCH_DECODERS.acquire(key))
    except BackendUnavailable as exc:
        return str(exc)
    return None


def _c_api_missing() -> str | None:
    """What the C API engine lacks here before a decoder is made: _C, nvImageCodec's header in it,
    nvImageCodec itself (None when nothing)."""
    from .. import _native

    if not _native.native_available():
        return "jwth_engine._C is not built"
    if not _native.load().nvimgcodec_compiled():
        return "jwth_engine._C was built without nvImageCodec's header (see JWTH_NVIMGCODEC_INCLUDE in CMakeLists.txt)"
    try:
        import_nvimgcodec()
    except BackendUnavailable as exc:
        return str(exc)
    return None


def make_engine(backend: str, device_id: int, threads: int, engine: str = "auto"):
    """The decode engine for `backend` ("cpu" | "gpu"): `engine` "c-api", "python-api", or "auto"
    (the C API when it can be made here, else the Python API). Raises BackendUnavailable."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    why = ""
    if engine != "python-api":
        try:
            return CApiEngine(backend, device_id, threads)
        except BackendUnavailable as exc:
            if engine == "c-api":
                raise
            why = f"the C API is unavailable: {exc}"
    fallback = PythonApiEngine(backend, device_id, threads)
    fallback.why = why
    return fallback


def _tile_size(tile, outputs: list, regions) -> tuple[int, int]:
    """The streams' (height, width): `tile`, else (whole tiles only) the outputs' shape."""
    if tile is not None:
        return int(tile[0]), int(tile[1])
    if regions is not None:
        raise ValueError("decoding regions needs the tile size (tile=(height, width))")
    return int(outputs[0].shape[0]), int(outputs[0].shape[1])


class CApiEngine:
    """nvImageCodec's C API through jwth_engine._C (module docstring)."""

    name = "c-api"
    why = ""             # why this engine, when it is not the one asked for (see make_engine)

    def __init__(self, backend: str, device_id: int, threads: int):
        # CPU: `threads` decoders inside one batch object; GPU: one decoder (threads = its helpers).
        self._key = DecoderKey(backend, device_id, max(1, threads) if backend == "cpu" else max(0, threads))
        self._batch = BATCH_DECODERS.acquire(self._key)

    def decode(self, streams: list[bytes], outputs: list, *, colour: str, cuda_stream: int = 0, regions=None,
               tile: tuple[int, int] | None = None) -> list[int]:
        """`regions`: None, or per stream None (the whole tile) or (x0, y0, x1, y1); `tile`: the
        streams' (height, width), needed with regions (else the outputs' shape)."""
        from .._native import array_arg

        tile_h, tile_w = _tile_size(tile, outputs, regions)
        return self._batch.decode(streams, [array_arg(out) for out in outputs], regions=regions, tile_h=tile_h,
                                  tile_w=tile_w, colour=colour, cuda_stream=cuda_stream)

    def close(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            BATCH_DECODERS.release(self._key, batch)


class PythonApiEngine:
    """nvImageCodec's Python API (module docstring): the reference path."""

    name = "python-api"
    why = ""             # why this engine, when it is not the one asked for (see make_engine)

    def __init__(self, backend: str, device_id: int, threads: int):
        self.backend = backend
        # CPU: one single-threaded decoder per thread (nvImageCodec's own executor keeps a core
        # free; on a 2-core machine it decodes on one thread); GPU: one decoder.
        parts = max(1, int(threads)) if backend == "cpu" else 1
        self._key = DecoderKey(backend, device_id, 1 if backend == "cpu" else max(0, int(threads)))
        self._decoders = [PYTHON_DECODERS.acquire(self._key) for _ in range(parts)]
        self._threads = ThreadPoolExecutor(parts, thread_name_prefix="jwth-nvimgcodec") if parts > 1 else None
        self._n = import_nvimgcodec()

    def decode(self, streams: list[bytes], outputs: list, *, colour: str, cuda_stream: int = 0, regions=None,
               tile: tuple[int, int] | None = None) -> list[int]:
        """As CApiEngine.decode."""
        n, params = self._n, self._n.DecodeParams(color_spec=getattr(self._n.ColorSpec, colour),
                                                  apply_exif_orientation=False)
        tile = _tile_size(tile, outputs, regions)
        status = [int(TileStatus.DECODE_FAILED)] * len(streams)

        def code_stream(k: int):
            """The code stream to decode for stream k (its region's view), or None with status[k] set."""
            try:
                stream = n.CodeStream(streams[k])
                size = (stream.height, stream.width)
            except RuntimeError:                    # nvImageCodec cannot read its image info
                status[k] = int(TileStatus.UNPARSABLE)
                return None
            if size != tuple(tile):
                status[k] = int(TileStatus.WRONG_SIZE)
                return None
            box = regions[k] if regions is not None else None
            if box is not None:
                x0, y0, x1, y1 = box
                stream = stream.get_sub_code_stream(region=n.Region(y0, x0, y1, x1))
            return stream

        def run(decoder, begin: int, end: int) -> None:
            todo = [(k, stream) for k in range(begin, end) if (stream := code_stream(k)) is not None]
            if not todo:
                return
            images = decoder.decode([stream for _, stream in todo], params=params, cuda_stream=cuda_stream)
            for (k, _), image in zip(todo, images):
                if image is not None:
                    status[k] = self._copy(image, outputs[k])

        parts = len(self._decoders)
        if parts > 1 and len(streams) >= 2 * parts:
            # Small chunks handed out as threads free up: a stored tile's decode time varies
            # several-fold (background vs dense tissue), and fixed halves left one core idle.
            size = max(_MIN_CHUNK, -(-len(streams) // (parts * _CHUNKS_PER_THREAD)))
            starts = list(range(0, len(streams), size))
            order = itertools.count()       # next() on a count is atomic under the GIL

            def work(decoder) -> None:
                while (k := next(order)) < len(starts):
                    run(decoder, starts[k], min(len(streams), starts[k] + size))

            list(self._threads.map(work, self._decoders))      # re-raises a thread's exception
        else:
            run(self._decoders[0], 0, len(streams))
        return status

    def _copy(self, image, out) -> int:
        if self.backend == "gpu":
            import torch

            tile = torch.from_dlpack(image)      # decoded on the current stream: no sync needed
        else:
            tile = np.asarray(image)
        if tuple(tile.shape) != tuple(out.shape):
            return int(TileStatus.WRONG_SIZE)
        out[...] = tile
        return int(TileStatus.OK)

    def close(self) -> None:
        decoders, self._decoders = self._decoders, []
        for decoder in decoders:
            PYTHON_DECODERS.release(self._key, decoder)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None

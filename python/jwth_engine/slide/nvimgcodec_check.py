"""What nvImageCodec can decode here, per backend and codec, found by decoding: for `--decode`,
`choose_decoder` and `doctor`.

Importing nvImageCodec proves little: its codecs are extensions loaded at run time, and a GPU
extension whose library is missing (libnvjpeg.so.13 from nvidia-nvjpeg, libnvjpeg2k.so.0 from
nvidia-nvjpeg2k-cu13, neither in every CUDA image) loads nothing and says nothing; each decode
then returns None, which the tile decoder can only report as a corrupt tile. So, once per process
and backend, a small JPEG and a small JPEG 2000 image made here by Pillow are decoded with the
decoder the slides will use and compared with Pillow's own decode: a codec that fails is known
before any slide is read, named in `doctor`, and a slide stored in it goes to the slide reader
with that reason (tests/test_raw_decode.py runs this with the JPEG 2000 extension taken away).
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable
from .decoding import TEST_TILE_MAX_TOL
from .nvimgcodec_engines import TileStatus, import_nvimgcodec, make_engine

CODECS = {"jpeg": "JPEG", "jpeg2000": "JPEG 2000"}      # RawLevel.codec -> display name
_PILLOW_FORMAT = {"jpeg": "JPEG", "jpeg2000": "JPEG2000"}
_INSTALL = {("gpu", "jpeg"): "nvidia-nvjpeg (libnvjpeg.so.13)",
            ("gpu", "jpeg2000"): "nvidia-nvjpeg2k-cu13 (libnvjpeg2k.so.0)"}


@dataclass(frozen=True)
class CodecCheck:
    ok: bool
    detail: str          # "max |Δ| vs Pillow's decode 0", or why it failed

    def __str__(self) -> str:
        return f"ok ({self.detail})" if self.ok else f"FAILED: {self.detail}"


_lock = threading.Lock()
_checked: dict[tuple[str, int], dict[str, CodecCheck]] = {}


def codec_checks(backend: str, device_id: int = 0) -> dict[str, CodecCheck]:
    """codec ("jpeg", "jpeg2000") -> CodecCheck for nvImageCodec's `backend` ("cpu" | "gpu", on
    CUDA device `device_id`). Cached per process. Raises BackendUnavailable when nvImageCodec
    itself cannot be imported or a decoder cannot be made."""
    key = (backend, int(device_id) if backend == "gpu" else 0)
    with _lock:
        if key not in _checked:
            _checked[key] = {codec: _check(backend, key[1], codec) for codec in CODECS}
        return _checked[key]


def _check(backend: str, device_id: int, codec: str) -> CodecCheck:
    from PIL import Image

    # A smooth gradient with a coloured block. JPEG at 4:4:4 (no chroma upsampling, where nvJPEG
    # and libjpeg's fancy upsampling differ at colour edges) and quality 95: decoders then differ by
    # their IDCT's rounding only. Pillow's JPEG 2000 is lossless: every decoder gives it exactly.
    y, x = np.mgrid[0:32, 0:48]
    pixels = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)
    pixels[8:24, 16:32] = (200, 40, 120)
    options = {"quality": 95, "subsampling": 0} if codec == "jpeg" else {}
    buffer = io.BytesIO()
    try:
        Image.fromarray(pixels).save(buffer, format=_PILLOW_FORMAT[codec], **options)
    except (OSError, KeyError) as exc:          # a Pillow built without OpenJPEG
        return CodecCheck(True, f"not checked: Pillow cannot write a test {CODECS[codec]} image ({exc})")
    buffer.seek(0)
    reference = np.asarray(Image.open(buffer).convert("RGB"))
    # The engine the slides will use (the C API when _C has it), so a check that passes means
    # slide tiles decode through the same code.
    engine = make_engine(backend, device_id, 1 if backend == "cpu" else 0)
    try:
        if backend == "gpu":
            import torch

            with torch.cuda.device(device_id):
                out = torch.empty(reference.shape, dtype=torch.uint8, device=f"cuda:{device_id}")
                status = engine.decode([buffer.getvalue()], [out], colour="SRGB",
                                       cuda_stream=torch.cuda.current_stream().cuda_stream)[0]
                image = out.cpu()         # on the same (current) stream: ordered after the decode
        else:
            out = np.empty(reference.shape, np.uint8)
            status = engine.decode([buffer.getvalue()], [out], colour="SRGB")[0]
            image = out
    except (RuntimeError, ValueError) as exc:
        return CodecCheck(False, f"the {backend.upper()} decoder raised {exc}")
    finally:
        engine.close()
    if status == TileStatus.WRONG_SIZE:
        return CodecCheck(False, f"a {reference.shape} test image decoded to another size")
    if status != TileStatus.OK:
        hint = _INSTALL.get((backend, codec))
        return CodecCheck(False, f"no {backend.upper()} {CODECS[codec]} decoder loaded"
                                 + (f" (is {hint} installed?)" if hint else ""))
    error = int(np.abs(np.asarray(image).astype(int) - reference.astype(int)).max())
    if error > TEST_TILE_MAX_TOL:       # the test tile's bound: IDCT rounding passes, colour mistakes do not
        return CodecCheck(False, f"a test image decoded with max |Δ| {error} vs Pillow's decode")
    return CodecCheck(True, f"max |Δ| vs Pillow's decode {error}")


def _backend_checks(backend: str) -> tuple[dict[str, CodecCheck] | None, str]:
    """(the codec checks of `backend`, "") or (None, why they cannot run here)."""
    try:
        import_nvimgcodec()
    except BackendUnavailable as exc:
        return None, str(exc)
    device_id = 0
    if backend == "gpu":
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA GPU is visible to torch"
        device_id = torch.cuda.current_device()
    try:
        return codec_checks(backend, device_id), ""
    except BackendUnavailable as exc:
        return None, str(exc)


def _available(backend: str) -> tuple[bool, str, dict[str, CodecCheck] | None]:
    checks, why = _backend_checks(backend)
    if checks is None:
        return False, why, None
    if any(check.ok for check in checks.values()):
        return True, "", checks
    summary = "; ".join(f"{CODECS[codec]} {check}" for codec, check in checks.items())
    return False, f"nvImageCodec's {backend.upper()} backend decodes no slide codec here: {summary}", checks


def gpu_decode_available() -> tuple[bool, str]:
    """(available, why not) for `--decode gpu`: nvImageCodec, a CUDA device, and a GPU decoder
    that decodes at least one of the slide codecs."""
    return _available("gpu")[:2]


def cpu_decode_available() -> tuple[bool, str]:
    return _available("cpu")[:2]


def codec_unavailable(backend: str, device_id: int, codec: str) -> str | None:
    """Why nvImageCodec's `backend` cannot decode `codec` here, or None when it can."""
    check = codec_checks(backend, device_id)[codec]
    return None if check.ok else f"nvImageCodec's {backend.upper()} backend cannot decode {CODECS[codec]} here ({check.detail})"


def describe_decoders() -> dict:
    """For `doctor`: which tile decoders `--decode` can use here, each codec checked, or why not."""
    from .nvimgcodec_engines import c_api_unavailable, nvimgcodec_version

    report: dict = {"nvimgcodec": nvimgcodec_version() or "not installed"}
    c_api = c_api_unavailable()
    report["decode_api"] = ("C API through jwth_engine._C" if c_api is None
                            else f"Python API (the C API path is unavailable: {c_api})")
    for backend, what in (("cpu", "nvImageCodec CPU backend: libjpeg-turbo, OpenJPEG"),
                          ("gpu", "nvImageCodec: nvJPEG hardware/CUDA decoders, nvJPEG2000")):
        ok, why, checks = _available(backend)
        report[f"decode_{backend}"] = f"available ({what})" if ok else why
        if checks is not None:
            report[f"decode_{backend}_check"] = {CODECS[codec]: str(check) for codec, check in checks.items()}
    return report

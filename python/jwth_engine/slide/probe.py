"""Crash-isolated check that cuCIM can open and decode a file.

cuCIM can kill the whole process on a file it mishandles (it segfaults opening `boxes.tiff`, a
deflate-compressed generic TIFF), and it returns garbage pixels for some JPEG errors that it only
prints (on `unreadable.svs` it prints "Bogus marker length" on stdout). So before the engine's own
process touches a file with cuCIM, a child process opens it, reads its metadata, decodes a small
region of the lowest-resolution level and one at the centre of level 0, and compares the latter
with OpenSlide's decode of the same pixels (an independent decoder). The parent waits with a
timeout and learns one of: fine / failed with an error / died by a signal / pixels wrong / hung.

The decision is made on pixels, never on what the native libraries print: libtiff warns
"Invalid TIFF directory; tags are not sorted" about valid tiled TIFFs whose tags are merely out of
order, and grepping for such words sent those files to OpenSlide. The printed text is kept
(`ProbeResult.output`) and quoted in the reason when the pixels are wrong.

Two ways to start the child:
* "fork" (default): the child inherits the already-imported cuCIM, so a probe costs a few
  milliseconds plus cuCIM's own open. It runs cuCIM on the CPU only and leaves with `os._exit`, so
  it never runs the parent's atexit handlers or flushes its Python buffers.
* "spawn": a fresh interpreter (~0.5 s). Used automatically once this process has initialised
  CUDA through torch: a forked child of such a process must not touch CUDA, and nothing promises
  that cuCIM's open never does. `JWTH_SLIDE_PROBE=fork|spawn` forces one.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 60.0
PROBE_ENV = "JWTH_SLIDE_PROBE"
_RESULT_MARK = "JWTH-PROBE-RESULT "

# Lines about the CUDA driver or cuFile are import-time noise on machines without a GPU and say
# nothing about the file; they are left out of the text quoted in a reason.
_NOISE = re.compile(r"libcuda|cufile|cuda driver|dlopen|cuda symbols", re.IGNORECASE)
# cuCIM and OpenSlide both use libjpeg-turbo / OpenJPEG: their level-0 pixels agree exactly on the
# test slides (JPEG and JPEG 2000). The bounds leave room for another build's IDCT; a corrupt
# stream or a colour-space mistake is off by tens of levels.
PIXEL_MEAN_TOL = 1.0
PIXEL_MAX_TOL = 24


class PixelMismatch(ValueError):
    """cuCIM decoded the test region, but its pixels are not what an independent decoder gets."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str          # "" when ok; else a short cause, e.g. "cuCIM crashed opening the file (SIGSEGV)"
    seconds: float
    signal: str | None = None   # "SIGSEGV" etc. when the child died by a signal
    output: str = ""            # what the child's native libraries printed (trimmed)
    method: str = "fork"        # "fork" | "spawn"


def check_with_cucim(path: str) -> None:
    """Open with cuCIM, read metadata and decode a 16 x 16 region; raises on failure.

    Runs in the child. Uses only cuCIM on the CPU.
    """
    from cucim.clara import CuImage
    import numpy as np

    img = CuImage(path)
    res = img.resolutions
    count = int(res["level_count"])
    if count < 1:
        raise ValueError("no pyramid levels")
    _ = img.metadata  # parses the vendor metadata (JSON) the reader will need
    level = count - 1
    w, h = res["level_dimensions"][level]
    ds = float(res["level_downsamples"][level])
    size = (max(1, min(int(w), 16)), max(1, min(int(h), 16)))
    # The centre of the lowest level: a corner is often blank and may sit in an empty tile.
    loc = (int((w - size[0]) // 2 * ds), int((h - size[1]) // 2 * ds))
    region = np.asarray(img.read_region(loc, size, level))
    if region.ndim != 3 or region.shape[:2] != (size[1], size[0]) or region.dtype != np.uint8:
        raise ValueError(f"unexpected test region {region.shape} {region.dtype}")
    cross_check(img, path)


def cross_check(img, path: str) -> None:
    """Compare cuCIM's decode of a 16 x 16 region at the centre of level 0 with OpenSlide's.

    Level 0, because OpenSlide renders levels whose downsample is not an integer at sub-pixel
    offsets. Raises PixelMismatch when they differ or OpenSlide cannot decode that region (the
    file is damaged there); returns quietly when OpenSlide is missing or cannot open the file
    (nothing independent to compare with).
    """
    import numpy as np

    from .base import composite_on_white

    w0, h0 = (int(v) for v in img.resolutions["level_dimensions"][0])
    size = (max(1, min(w0, 16)), max(1, min(h0, 16)))
    loc = ((w0 - size[0]) // 2, (h0 - size[1]) // 2)
    ours = np.asarray(img.read_region(loc, size, 0))
    ours = composite_on_white(ours) if ours.shape[-1] == 4 else ours
    try:
        import openslide
    except (ImportError, OSError):
        return
    try:
        other = openslide.OpenSlide(path)
    except openslide.OpenSlideError:
        return
    try:
        theirs = composite_on_white(np.asarray(other.read_region(loc, 0, size)))
    except openslide.OpenSlideError as exc:
        raise PixelMismatch(f"OpenSlide cannot decode the level-0 test region either ({exc})") from exc
    finally:
        other.close()
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    if diff.mean() > PIXEL_MEAN_TOL or int(diff.max()) > PIXEL_MAX_TOL:
        raise PixelMismatch(f"its level-0 test region differs from OpenSlide's (mean |Δ| {diff.mean():.2f}, "
                            f"max {int(diff.max())})")


def _report(exc: BaseException | None) -> str:
    if exc is None:
        return json.dumps({"ok": True})
    if isinstance(exc, PixelMismatch):
        return json.dumps({"ok": False, "pixels": True, "error": str(exc)})
    return json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _forked_child(path: str, result_fd: int, out_fd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        # cuCIM's JPEG decoder reports some errors on stdout, others on stderr: capture both.
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        check_with_cucim(path)
        os.write(result_fd, _report(None).encode())
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the child's only job is to report what failed, then exit
        try:
            os.write(result_fd, _report(exc).encode())
        except OSError:
            pass
    finally:
        _flush_c_stdio()  # stdout into a file is block-buffered in C, and os._exit does not flush it
        os._exit(code)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except (AttributeError, RuntimeError):
        return False


def default_method() -> str:
    forced = os.environ.get(PROBE_ENV, "").strip().lower()
    if forced in ("fork", "spawn"):
        return forced
    return "spawn" if _cuda_initialised() else "fork"


def probe_slide(path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S,
                method: str | None = None) -> ProbeResult:
    """Open `path` with cuCIM in a child process and report whether that is safe and works.

    Raises BackendUnavailable if cuCIM is not installed (imported here first, so a forked child
    starts warm).
    """
    from .cucim_reader import import_cucim

    import_cucim()
    try:  # the cross-check's decoder, imported here so that a forked child starts warm
        import openslide  # noqa: F401
    except (ImportError, OSError):
        pass
    path = os.fspath(path)
    method = method or default_method()
    if method not in ("fork", "spawn"):
        raise ValueError(f"probe method must be 'fork' or 'spawn', got {method!r}")
    start = time.perf_counter()
    if method == "fork":
        payload, output, timed_out, killed_by = _run_forked(path, timeout)
    else:
        payload, output, timed_out, killed_by = _run_spawned(path, timeout)
    return _interpret(payload, output, timed_out, killed_by, time.perf_counter() - start, timeout, method)


def _run_forked(path: str, timeout: float) -> tuple[str, str, bool, int | None]:
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile(prefix="jwth-probe-") as out_file:
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            _forked_child(path, write_fd, out_file.fileno())
        os.close(write_fd)
        try:
            payload, timed_out = _read_until_eof(read_fd, timeout)
        finally:
            os.close(read_fd)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        out_file.seek(0)
        output = out_file.read(64 * 1024).decode("utf-8", "replace")
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) and not timed_out else None
    return payload.decode("utf-8", "replace"), output, timed_out, killed_by


def _run_spawned(path: str, timeout: float) -> tuple[str, str, bool, int | None]:
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding jwth_engine/
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from jwth_engine.slide.probe import _spawned_main\n"
        "_spawned_main(sys.argv[2])\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, package_root, path], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"") + (exc.stderr or b"")
        if isinstance(output, bytes):
            output = output.decode("utf-8", "replace")
        return "", output, True, None
    payload, other = "", []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        if line.startswith(_RESULT_MARK):
            payload = line[len(_RESULT_MARK):]
        else:
            other.append(line)
    killed_by = -proc.returncode if proc.returncode < 0 else None
    return payload, "\n".join(other), False, killed_by


def _spawned_main(path: str) -> None:
    """Entry point of the spawned child: the result goes to stdout on one marked line."""
    try:
        check_with_cucim(path)
        result = _report(None)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        result = _report(exc)
    sys.stdout.flush()
    _flush_c_stdio()
    print(_RESULT_MARK + result, flush=True)


def _interpret(payload: str, output: str, timed_out: bool, killed_by: int | None, seconds: float,
               timeout: float, method: str) -> ProbeResult:
    lines = [line.strip() for line in output.splitlines() if line.strip() and not _NOISE.search(line)]
    text = " | ".join(lines)[:500]
    if timed_out:
        return ProbeResult(False, f"cuCIM did not finish opening the file within {timeout:g} s", seconds,
                           output=text, method=method)
    if killed_by is not None:
        name = _signal_name(killed_by)
        return ProbeResult(False, f"cuCIM crashed opening the file ({name})", seconds, signal=name,
                           output=text, method=method)
    try:
        report = json.loads(payload or "{}")
    except ValueError:
        report = {}
    if report.get("pixels"):
        printed = f"; cuCIM printed: {text[:200]}" if text else ""
        return ProbeResult(False, f"cuCIM's pixels are wrong: decode error on a test region "
                                  f"({report.get('error')}{printed})", seconds, output=text, method=method)
    if not report.get("ok"):
        error = report.get("error") or "the probe process exited without a result"
        return ProbeResult(False, f"cuCIM cannot read the file ({error})", seconds, output=text, method=method)
    return ProbeResult(True, "", seconds, output=text, method=method)


def _read_until_eof(fd: int, timeout: float) -> tuple[bytes, bool]:
    """Everything the child writes, until it exits (EOF) or the timeout passes."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

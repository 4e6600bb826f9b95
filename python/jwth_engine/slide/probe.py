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
* "forkserver" (default): a small probe server, started once per process as a fresh interpreter
  (`python -m jwth_engine.slide.probe`) and kept warm, imports cuCIM and forks one child per probe.
  The server is single-threaded and never touches CUDA, so its forks are safe; forking the caller
  itself would not be (a screening worker or a `score` run has decoder threads, torch's thread
  pools and maybe a CUDA context, and a fork can inherit a lock some other thread held). A probe
  then costs a fork of a warm process plus cuCIM's own open; the server's start is paid once.
* "spawn": a fresh interpreter per probe (pays Python and cuCIM start-up every time).
  `JWTH_SLIDE_PROBE=forkserver|spawn` chooses.

The numbers behind this choice are in benchmarks/results/probe_start.json (benchmarks/probe_start.py).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..lifetime import die_with_parent
from .cucim_reader import import_cucim

DEFAULT_TIMEOUT_S = 60.0
PROBE_ENV = "JWTH_SLIDE_PROBE"
_RESULT_MARK = "JWTH-PROBE-RESULT "
_SERVER_GRACE_S = 30.0   # on top of a probe's timeout, before the server itself counts as stuck

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
    method: str = "forkserver"  # "forkserver" | "spawn"


def check_with_cucim(path: str) -> None:
    """Open with cuCIM, read metadata and decode a 16 x 16 region; raises on failure.

    Runs in the probe child. Uses only cuCIM on the CPU.
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


METHODS = ("forkserver", "spawn")


def default_method() -> str:
    forced = os.environ.get(PROBE_ENV, "").strip().lower()
    return forced if forced in METHODS else "forkserver"


def probe_slide(path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S,
                method: str | None = None) -> ProbeResult:
    """Open `path` with cuCIM in a child process and report whether that is safe and works.

    Raises BackendUnavailable if cuCIM is not installed (imported here first, so a forked child
    starts warm).
    """
    import_cucim()   # a missing cuCIM is the caller's error to report, here rather than in a child
    path = os.fspath(path)
    method = method or default_method()
    if method not in METHODS:
        raise ValueError(f"probe method must be one of {', '.join(METHODS)}, got {method!r}")
    start = time.perf_counter()
    if method == "forkserver":
        payload, output, timed_out, killed_by = _SERVER.probe(path, timeout)
    else:
        payload, output, timed_out, killed_by = _run_spawned(path, timeout)
    return _interpret(payload, output, timed_out, killed_by, time.perf_counter() - start, timeout, method)


def _run_forked(path: str, timeout: float) -> tuple[str, str, bool, int | None]:
    """Fork one probe child and wait for it. Only ever called in the single-threaded probe server."""
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


class _ProbeServer:
    """The caller's side of the warm probe server: one request at a time over a socket pair, one
    JSON line each way. Started on first use, restarted if it died; it exits when this process
    closes its end (or dies: the kernel closes it then)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._file = None
        self.starts = 0

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding jwth_engine/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        # One thread only, so that its forks are safe: numpy's BLAS would otherwise start a pool
        # (the probe does no linear algebra).
        env.update({name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        try:
            # subprocess starts it with fork+exec in C (no Python code runs between them), which is
            # safe from a threaded process, unlike a fork that goes on running Python.
            self._proc = subprocess.Popen([sys.executable, "-m", "jwth_engine.slide.probe", str(theirs.fileno()),
                                           str(os.getpid())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self._sock = ours
        self._file = ours.makefile("rwb", buffering=0)
        self.starts += 1

    def _stop(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
            self._sock = self._file = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def probe(self, path: str, timeout: float) -> tuple[str, str, bool, int | None]:
        request = (json.dumps({"path": path, "timeout": timeout}) + "\n").encode()
        with self._lock:
            for attempt in (0, 1):
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                self._sock.settimeout(timeout + _SERVER_GRACE_S)
                try:
                    self._file.write(request)
                    line = self._file.readline()
                except TimeoutError:
                    # The server itself is stuck (its own timeout should have fired): replace it.
                    self._stop()
                    return "", "", True, None
                except OSError:
                    line = b""
                if line:
                    reply = json.loads(line)
                    return reply["payload"], reply["output"], reply["timed_out"], reply["killed_by"]
                self._stop()    # the server died (not the probe child): start a fresh one once
            raise RuntimeError("the cuCIM probe server exits as soon as it starts; run "
                               "`python -m jwth_engine.slide.probe` to see why")

    def close(self) -> None:
        with self._lock:
            self._stop()


_SERVER = _ProbeServer()


def _serve(fd: int, parent: int) -> int:
    """The probe server's loop: import cuCIM once, then fork a child per request."""
    die_with_parent(parent)
    import_cucim()
    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rwb", buffering=0)
    while True:
        line = stream.readline()
        if not line:
            return 0   # the caller closed its end or died
        request = json.loads(line)
        payload, output, timed_out, killed_by = _run_forked(request["path"], float(request["timeout"]))
        stream.write((json.dumps({"payload": payload, "output": output, "timed_out": timed_out,
                                  "killed_by": killed_by}) + "\n").encode())


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


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), int(sys.argv[2])))

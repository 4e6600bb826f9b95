"""A screening worker: a separate Python process that loads the model once and scores one slide
after another.

Started by `process.WorkerProcess` as `python -m jwth_engine.screen.worker FD PARENT_PID`, where FD
is one end of a socket pair; the messages are the dataclasses of `protocol.py`. A fresh interpreter
rather than a fork: the driver may hold threads (Ray, rich) and torch must never be forked, and a
native library that crashes takes only this process with it. The worker dies with the driver
(parent-death signal): a driver killed with kill -9 leaves no worker holding a GPU.

Look-ahead: once the current slide's tiles are all decoded (only the backbone and the outputs are
left), a thread prepares the next queued slide — opens it, finds its tissue, starts decoding its
tiles — so the backbone never waits for a slide to be opened. Not for slides marked `solo` (the
driver's retry of a slide whose crash could not be attributed).

After an unexpected exception (not a `JwthError`) the worker reports it and exits, so that state a
library may have left broken (a CUDA context after an illegal access, say) never reaches the next
slide; the driver starts a replacement.
"""

from __future__ import annotations

import collections
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from ..config import flag_of
from ..errors import DiskFull, JwthError
from ..lifetime import die_with_parent
from ..outputs.atomic import is_disk_full
from .protocol import (DISK_FULL, ERROR, EXCEPTION, Done, Failed, Failure, Hello, InitFailed, Outcome,
                       Prefetching, Progress, Ready, Started, Stop, Task)

DEFAULT_JOB = "jwth_engine.screen.worker:ScoreJob"
PROGRESS_INTERVAL_S = 1.0


class ScoreJob:
    """The real work: `SlideScorer` (score_slide's steps, model loaded once) into the staging folder."""

    def __init__(self, options: dict):
        import torch

        from ..config import RunConfig
        from ..scoring import SlideScorer
        from ..scoring.visuals import VisualOptions
        from .config import REPORT_KEY

        options = dict(options)
        self.visuals = VisualOptions(report=True) if options.pop(REPORT_KEY, False) else None
        self.scorer = SlideScorer(RunConfig.from_dict(options))
        self.info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": str(self.scorer.device), "load_s": round(self.scorer.model.load_seconds, 2)}

    def prepare(self, task: Task):
        return self.scorer.prepare(task.path, task.mpp)

    def discard(self, prepared) -> None:
        prepared.close()

    def run(self, task: Task, prepared, progress) -> Outcome:
        from ..outputs import sha256_file

        staging = Path(task.staging)
        staging.mkdir(parents=True, exist_ok=True)
        result = self.scorer.finish(prepared, out=staging, name=task.slide_id, progress=progress,
                                    visuals=self.visuals)
        return Outcome(result.summary, tiles_sha256=sha256_file(result.tiles_path),
                       summary_sha256=sha256_file(result.summary_path))


class FunctionJob:
    """A plain `fn(task, options, progress) -> Outcome` as a job (no preparation step)."""

    prepares = False       # nothing to look ahead for

    def __init__(self, fn, options: dict):
        self.fn, self.options, self.info = fn, options, {}

    def prepare(self, task: Task):
        return None

    def discard(self, prepared) -> None:
        pass

    def run(self, task: Task, prepared, progress) -> Outcome:
        return self.fn(task, self.options, progress)


def load_job(spec: str, options: dict):
    """`module:attr`; a class is built with the options, a function is wrapped."""
    module, _, attr = spec.partition(":")
    target = getattr(importlib.import_module(module), attr)
    return target(options) if isinstance(target, type) else FunctionJob(target, options)


def _watch_parent(parent: int) -> None:
    """Exit when the driver is gone, where the parent-death signal is not available."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="jwth-parent-watch", daemon=True).start()


def _read_ahead(path: str) -> None:
    """Ask the kernel to start reading a queued slide's file (a cold archive on network storage
    costs more to fetch than to decode). Only I/O: nothing native touches the file yet."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # scoring it will report the problem
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only; some file systems do not take it
    finally:
        os.close(fd)


_STOP = object()


class _Inbox:
    """Tasks from the driver, in order; the look-ahead thread may peek at the next one."""

    def __init__(self, conn: Connection):
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._receive, args=(conn,), name="jwth-receiver", daemon=True).start()

    def _receive(self, conn: Connection) -> None:
        try:
            while True:
                message = conn.recv()
                if isinstance(message, Task):
                    _read_ahead(message.path)
                    self._put(message)
                elif isinstance(message, Stop):
                    break
        except (EOFError, OSError):
            pass
        self._put(_STOP)

    def _put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def get(self):
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    def peek_until(self, done: threading.Event, poll_s: float = 0.05):
        """The next task once there is one, or None when `done` is set first."""
        with self._cond:
            while not done.is_set():
                if self._items:
                    return self._items[0]
                self._cond.wait(poll_s)
        return None


class _LookAhead:
    """Prepares `task` in a thread once the current slide's decoding is finished."""

    def __init__(self, job, current_prepared, current_done: threading.Event, inbox: _Inbox, send):
        self.task = None
        self.prepared = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job, current_prepared, current_done, inbox, send),
                                        name="jwth-lookahead", daemon=True)
        self._ready = threading.Event()
        self._thread.start()

    def _run(self, job, current_prepared, current_done, inbox, send) -> None:
        try:
            prefetcher = getattr(current_prepared, "prefetcher", None)
            while prefetcher is not None and prefetcher.alive and not current_done.is_set():
                time.sleep(0.05)
            task = inbox.peek_until(current_done)
            if task is None or task is _STOP or task.solo:
                return
            self.task = task
            send(Prefetching(task.slide_id))
            try:
                self.prepared = job.prepare(task)
            except BaseException as exc:  # handed to the main loop when this slide's turn comes
                self.error = exc
        finally:
            self._ready.set()

    def take(self, task):
        """The preparation of `task` if this look-ahead made it (re-raising its error), else a miss."""
        self._ready.wait()
        if self.task is not task:
            return False, None
        if self.error is not None:
            raise self.error
        return True, self.prepared

    def discard(self, job) -> None:
        self._ready.wait()
        if self.prepared is not None:
            job.discard(self.prepared)



def _user_line(exc: JwthError) -> str:
    """A failure as the person running `screen` reads it: settings named by their flags."""
    return exc.cli_message(flag_of(exc.field)) if exc.field else str(exc)


def _failure(exc: BaseException, seconds: float) -> Failure:
    if isinstance(exc, DiskFull) or is_disk_full(exc):
        return Failure(DISK_FULL, str(exc) if isinstance(exc, JwthError) else f"{type(exc).__name__}: {exc}", seconds)
    if isinstance(exc, JwthError):
        return Failure(ERROR, _user_line(exc), seconds)
    return Failure(EXCEPTION, f"{type(exc).__name__}: {exc}", seconds, traceback.format_exc())


def serve(conn: Connection) -> int:
    hello = conn.recv()
    if not isinstance(hello, Hello):
        raise TypeError(f"expected Hello from the driver, got {type(hello).__name__}")
    try:
        job = load_job(hello.job or DEFAULT_JOB, hello.options)
    except JwthError as exc:
        conn.send(InitFailed(ERROR, _user_line(exc)))
        return 1
    except Exception as exc:  # reported to the driver, which stops the run with this message
        conn.send(InitFailed(EXCEPTION, f"{type(exc).__name__}: {exc}"))
        return 1
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    send(Ready(hello.name, os.getpid(), os.uname().nodename, os.environ.get("CUDA_VISIBLE_DEVICES"),
               dict(job.info)))
    inbox = _Inbox(conn)
    lookahead: _LookAhead | None = None
    while True:
        task = inbox.get()
        if task is _STOP:
            if lookahead is not None:
                lookahead.discard(job)
            return 0
        slide_id = task.slide_id
        t0 = time.time()
        send(Started(slide_id, t0))
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or done == total:
                last[0] = now
                send(Progress(slide_id, done, total))

        current_done = threading.Event()
        try:
            hit, prepared = lookahead.take(task) if lookahead is not None else (False, None)
            if not hit and lookahead is not None:
                lookahead.discard(job)
            lookahead = None
            if not hit:
                prepared = job.prepare(task)
            if not task.solo and getattr(job, "prepares", True):
                lookahead = _LookAhead(job, prepared, current_done, inbox, send)
            outcome = job.run(task, prepared, progress)
        except Exception as exc:
            failure = _failure(exc, time.time() - t0)
            send(Failed(slide_id, failure))
            if failure.kind == EXCEPTION:
                return 2   # recorded with its traceback; then this process is replaced
            continue
        finally:
            current_done.set()
        if isinstance(outcome, dict):   # jobs may return Outcome's fields as a dict
            outcome = Outcome(**outcome)
        send(Done(slide_id, Outcome(outcome.summary, outcome.tiles_sha256, outcome.summary_sha256,
                                    time.time() - t0)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C goes to the whole process group; the driver decides what happens to running slides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = int(argv[1]) if len(argv) > 1 else os.getppid()
    if not die_with_parent(parent):
        _watch_parent(parent)
    conn = Connection(int(argv[0]))
    try:
        return serve(conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0  # the driver went away


if __name__ == "__main__":
    sys.exit(main())

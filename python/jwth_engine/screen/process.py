"""Driver side of one worker process (see worker.py for the other side, protocol.py for the messages)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from .protocol import FromWorker, Hello, Stop, Task
from .worker import DEFAULT_JOB

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def worker_env(extra: dict | None = None) -> dict:
    """This environment updated with `extra`, and the folder this package was imported from on
    PYTHONPATH (after `extra`'s entries), so the worker runs the same jwth_engine as the driver."""
    extra = dict(extra or {})
    env = dict(os.environ)
    paths = [*extra.pop("PYTHONPATH", "").split(os.pathsep), _PACKAGE_PARENT,
             *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.update(extra)
    return env


class WorkerProcess:
    """A running `python -m jwth_engine.screen.worker`, its connection, and what it was sent.

    `tasks` lists the slides sent and not yet answered, in order; the first one the worker has
    announced with "start" is `current`."""

    def __init__(self, name: str, options: dict, *, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, job: str = DEFAULT_JOB):
        self.name = name
        ours, theirs = socket.socketpair()
        log = open(log_path, "ab") if log_path else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jwth_engine.screen.worker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=log or subprocess.DEVNULL, stderr=log, env=worker_env(env),
            )
        finally:
            theirs.close()
            if log:
                log.close()
        self.conn = Connection(ours.detach())
        self.conn.send(Hello(name, options, job))
        self.spawned = time.monotonic()
        self.ready = False
        self.info: dict = {}
        self.tasks: list[Task] = []
        self.current: str | None = None
        self.current_since: float | None = None     # monotonic
        self.solo = False
        self.dead = False
        self.retiring = False        # reported an unexpected exception and is exiting
        self.prefetching: str | None = None   # next slide it is preparing while scoring `current`
        self.progress: tuple[int, int] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, task: Task) -> None:
        """Queue `task`; if the worker has just died, it stays listed and the pool hands it back
        when it notices the exit."""
        self.tasks.append(task)
        try:
            self.conn.send(task)
        except OSError:
            self.dead = True

    @property
    def accepting(self) -> bool:
        return not self.dead and not self.retiring

    def task(self, slide_id: str) -> Task | None:
        return next((t for t in self.tasks if t.slide_id == slide_id), None)

    def pop(self, slide_id: str) -> Task | None:
        task = self.task(slide_id)
        if task is not None:
            self.tasks.remove(task)
        if self.current == slide_id:
            self.current = None
            self.current_since = None
            self.progress = None
        if self.prefetching == slide_id:
            self.prefetching = None
        return task

    def receive(self) -> list[FromWorker]:
        """Every message waiting; marks the worker dead when its end of the connection closed."""
        messages = []
        try:
            while not self.dead and self.conn.poll(0):
                messages.append(self.conn.recv())
        except (EOFError, OSError):
            self.dead = True
        return messages

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask politely, then kill."""
        if self.proc.poll() is None and not self.dead:
            try:
                self.conn.send(Stop())
            except OSError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.dead = True
        self.conn.close()

    def exit_cause(self) -> str:
        if self.proc.poll() is None:
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                return "stopped answering"
        return signal_name(self.proc.returncode)

"""A pool of worker processes on this machine: one per GPU (`--gpus`) or `--jobs` CPU workers.

The pool turns what its workers do into `Event`s for the scheduler and owns the failure policy of
a machine: a worker that dies (a signal, an exit) or runs past the per-slide timeout is killed and
replaced; the slide it was scoring is reported failed with the cause, the slides queued behind it
go back to the scheduler. Each worker holds at most `depth` slides (the one it scores and the next
one, so it never waits for the driver between slides).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from .process import WorkerProcess
from .protocol import (EXCEPTION, Done, Failed, FromWorker, InitFailed, Prefetching, Progress, Ready, Started,
                       Stop, Task)
from .worker import DEFAULT_JOB

MAX_START_FAILURES = 3
DEFAULT_READY_TIMEOUT_S = 1800.0   # loading a large model, building a TensorRT engine, compiling


@dataclass
class Event:
    """What happened in the pool, for the driver (in-process; a Ray actor sends its fields)."""

    kind: str            # ready | start | progress | done | failed | requeue | fatal
    slide_id: str | None
    worker: str
    data: dict = field(default_factory=dict)


@dataclass
class WorkerSpec:
    name: str
    env: dict = field(default_factory=dict)


def cpu_specs(jobs: int, *, hide_gpus: bool, cpus: int | None = None) -> list[WorkerSpec]:
    """`jobs` workers without a GPU of their own, sharing this machine's cores (torch threads split
    between them); `hide_gpus` for `--device cpu`, else they use what `--device` picks."""
    cpus = cpus or len(os.sched_getaffinity(0))
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, cpus // jobs))}
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return [WorkerSpec(f"cpu{i}" if hide_gpus else f"w{i}", dict(env)) for i in range(jobs)]


def gpu_specs(gpus: list[int]) -> list[WorkerSpec]:
    """One worker per CUDA ordinal in `gpus`, each seeing only its GPU."""
    from .gpus import device_for

    return [WorkerSpec(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": device_for(g)}) for g in gpus]


class LocalPool:
    def __init__(self, specs: list[WorkerSpec], options: dict, *, timeout_s: float,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                 log_dir: str | os.PathLike | None = None, depth: int = 2, job: str = DEFAULT_JOB,
                 name_prefix: str = ""):
        if not specs:
            raise ValueError("a pool needs at least one worker")
        self.specs = {s.name: s for s in specs}
        self.size = len(specs)
        self.options = options
        self.timeout_s = timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.depth = depth
        self.job = job
        self.prefix = name_prefix
        self.start_failures = {s.name: 0 for s in specs}
        self.workers: dict[str, WorkerProcess] = {}
        self._events: list[Event] = []
        for spec in specs:
            self._spawn(spec)

    # --- scheduling -------------------------------------------------------------------------------
    def _spawn(self, spec: WorkerSpec) -> None:
        log = self.log_dir / f"worker-{spec.name}.log" if self.log_dir else None
        self.workers[spec.name] = WorkerProcess(self.prefix + spec.name, self.options, env=spec.env,
                                                log_path=log, job=self.job)

    def free_slots(self, solo: bool = False) -> int:
        if solo:
            return sum(1 for w in self.workers.values() if w.accepting and not w.tasks)
        return sum(self.depth - len(w.tasks) for w in self.workers.values() if w.accepting and not w.solo)

    def submit(self, task: Task, solo: bool = False) -> str | None:
        """Send `task` to the least busy worker; None when every worker is full."""
        candidates = [w for w in self.workers.values() if w.accepting and not w.solo
                      and len(w.tasks) < (1 if solo else self.depth)]
        if not candidates:
            return None
        worker = min(candidates, key=lambda w: (len(w.tasks), not w.ready))
        worker.solo = solo
        worker.send(task.alone(solo))
        return worker.name

    def busy(self) -> int:
        return sum(len(w.tasks) for w in self.workers.values())

    def status(self) -> list[dict]:
        now = time.monotonic()
        return [{"worker": w.name, "ready": w.ready, "slide": w.current,
                 "seconds": now - w.current_since if w.current_since else None,
                 "progress": w.progress, "queued": len(w.tasks)} for w in self.workers.values()]

    # --- events ---------------------------------------------------------------------------------
    def poll(self, timeout: float) -> list[Event]:
        """Wait up to `timeout` s for something to happen; returns what happened."""
        if not self._events:
            conns = [w.conn for w in self.workers.values() if not w.dead]
            if conns:
                wait(conns, timeout=timeout)
            else:
                time.sleep(timeout)
        events, self._events = self._events, []
        for key, worker in list(self.workers.items()):
            for message in worker.receive():
                events += self._handle(worker, message)
            if self.workers.get(key) is not worker:
                continue  # retired while handling its messages
            if worker.dead or not worker.alive():
                events += self._on_exit(key, worker)
            elif not worker.ready and time.monotonic() - worker.spawned > self.ready_timeout_s:
                events += self._on_ready_timeout(key, worker)
            elif worker.current_since and time.monotonic() - worker.current_since > self.timeout_s:
                events += self._on_timeout(key, worker)
        return events

    def _handle(self, worker: WorkerProcess, message: FromWorker) -> list[Event]:
        if isinstance(message, Ready):
            worker.ready = True
            worker.info = message.describe()
            self.start_failures[self._key(worker)] = 0
            return [Event("ready", None, worker.name, worker.info)]
        if isinstance(message, InitFailed):
            worker.kill()
            del self.workers[self._key(worker)]
            events = [Event("requeue", t.slide_id, worker.name, {"reason": "worker failed to start"})
                      for t in worker.tasks]
            worker.tasks.clear()
            return events + [Event("fatal", None, worker.name, {"kind": message.kind, "error": message.error})]
        if isinstance(message, Started):
            worker.current, worker.current_since = message.slide_id, time.monotonic()
            if worker.prefetching == message.slide_id:
                worker.prefetching = None
            return [Event("start", message.slide_id, worker.name, {"t": message.t})]
        if isinstance(message, Prefetching):
            worker.prefetching = message.slide_id
            return []
        if isinstance(message, Progress):
            worker.progress = (message.done, message.total)
            return [Event("progress", message.slide_id, worker.name, {"done": message.done, "total": message.total})]
        if isinstance(message, (Done, Failed)):
            if isinstance(message, Failed) and message.failure.kind == EXCEPTION:
                worker.retiring = True
            task = worker.pop(message.slide_id)
            if task and task.solo:
                worker.solo = False
            if isinstance(message, Done):
                return [Event("done", message.slide_id, worker.name, {"outcome": message.outcome})]
            return [Event("failed", message.slide_id, worker.name, asdict(message.failure))]
        raise TypeError(f"worker {worker.name} sent an unknown message {type(message).__name__}")

    def _key(self, worker: WorkerProcess) -> str:
        return worker.name[len(self.prefix):]

    def _drop(self, key: str, worker: WorkerProcess, cause: str, failed_kind: str, failed_text: str,
              ambiguous: bool = False) -> list[Event]:
        """Settle the slides of a worker that is gone. `ambiguous`: it died while scoring one slide
        and preparing the next, so either could be the cause; both are retried alone ("solo")."""
        events = []
        suspects = {worker.current, worker.prefetching} if ambiguous else set()
        for task in worker.tasks:
            sid = task.slide_id
            if sid in suspects:
                events.append(Event("requeue", sid, worker.name, {
                    "reason": f"worker {worker.name} crashed ({cause}) while scoring {worker.current} and "
                              f"preparing {worker.prefetching}; retrying each alone",
                    "started": sid == worker.current, "solo": True}))
            elif sid == worker.current:
                seconds = time.monotonic() - worker.current_since if worker.current_since else None
                events.append(Event("failed", sid, worker.name,
                                    {"kind": failed_kind, "error": failed_text.format(path=task.path),
                                     "seconds": seconds}))
            else:
                events.append(Event("requeue", sid, worker.name,
                                    {"reason": f"worker {worker.name} stopped ({cause}) before starting it"}))
        worker.tasks.clear()
        if not worker.ready:
            self.start_failures[key] += 1
            if self.start_failures[key] >= MAX_START_FAILURES:
                events.append(Event("fatal", None, worker.name, {
                    "kind": "crash",
                    "error": f"worker {worker.name} failed to start {MAX_START_FAILURES} times "
                             f"(last: {cause}); see {self.log_dir or 'its log'}",
                }))
                del self.workers[key]
                return events
        self._spawn(self.specs[key])
        return events

    def _on_exit(self, key: str, worker: WorkerProcess) -> list[Event]:
        cause = worker.exit_cause()
        worker.kill()
        ambiguous = bool(worker.current and worker.prefetching and worker.prefetching != worker.current)
        return self._drop(key, worker, cause, "crash", f"worker crashed with {cause} while scoring {{path}}",
                          ambiguous=ambiguous)

    def _on_ready_timeout(self, key: str, worker: WorkerProcess) -> list[Event]:
        """A worker that never said it was ready (a hung model load, engine build or compile): the
        slide it was given first is failed with that reason, the others go back to the queue."""
        worker.kill()
        cause = (f"worker {worker.name} did not become ready within {self.ready_timeout_s:g} s "
                 f"(loading the model, building an engine or compiling); killed")
        events = []
        if worker.tasks:
            first = worker.tasks[0]
            events.append(Event("failed", first.slide_id, worker.name,
                                {"kind": "start_timeout", "error": f"{cause} before it could score {first.path}",
                                 "seconds": time.monotonic() - worker.spawned}))
            worker.tasks = worker.tasks[1:]
        return events + self._drop(key, worker, "it did not become ready in time", "start_timeout", cause)

    def _on_timeout(self, key: str, worker: WorkerProcess) -> list[Event]:
        worker.kill()
        return self._drop(key, worker, "killed after the timeout", "timeout",
                          f"timed out after {self.timeout_s:g} s while scoring {{path}}")

    def close(self, grace_s: float = 5.0) -> None:
        for worker in self.workers.values():
            if not worker.dead:
                try:
                    worker.conn.send(Stop())
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s
        for worker in self.workers.values():
            while worker.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.kill()

    def kill(self) -> None:
        for worker in self.workers.values():
            worker.kill()

"""The messages between the screening driver and its worker processes: small frozen dataclasses,
sent as pickles over the socket pair `process.WorkerProcess` creates (both ends are this package,
started by the driver itself; nothing from outside is ever unpickled here).

Driver → worker: `Hello` once, then a `Task` per slide, then `Stop`.
Worker → driver: `Ready` or `InitFailed`; then per slide `Started`, optionally `Prefetching`
(it began preparing the next slide, so a crash from now on may be either's), `Progress`, and
finally `Done` or `Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Failure kinds. "error": a JwthError (the slide's fault, one line); "exception": an unexpected
# exception (the worker then exits and is replaced); "disk_full": the output folder is full (not
# the slide's fault: the driver stops the run, the slide stays to do).
ERROR, EXCEPTION, DISK_FULL = "error", "exception", "disk_full"


@dataclass(frozen=True)
class Hello:
    name: str
    options: dict          # the run's RunConfig.to_dict()
    job: str               # "module:attr" of the job the worker runs


@dataclass(frozen=True)
class Task:
    slide_id: str
    path: str
    mpp: float | None
    staging: str           # folder the worker writes this slide's outputs into
    solo: bool = False     # retried alone: no look-ahead while it runs

    def alone(self, solo: bool = True) -> "Task":
        return replace(self, solo=solo)


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    name: str
    pid: int
    host: str
    cuda_visible: str | None
    details: dict = field(default_factory=dict)   # what the job reports: torch version, device, load time

    def describe(self) -> dict:
        return {"name": self.name, "pid": self.pid, "host": self.host, "cuda_visible": self.cuda_visible,
                **self.details}


@dataclass(frozen=True)
class InitFailed:
    kind: str              # ERROR | EXCEPTION
    error: str


@dataclass(frozen=True)
class Started:
    slide_id: str
    t: float               # time.time() in the worker


@dataclass(frozen=True)
class Prefetching:
    slide_id: str


@dataclass(frozen=True)
class Progress:
    slide_id: str
    done: int
    total: int


@dataclass(frozen=True)
class Outcome:
    summary: dict
    tiles_sha256: str
    summary_sha256: str
    seconds: float | None = None


@dataclass(frozen=True)
class Failure:
    kind: str              # ERROR | EXCEPTION | DISK_FULL
    error: str
    seconds: float | None = None
    traceback: str | None = None


@dataclass(frozen=True)
class Done:
    slide_id: str
    outcome: Outcome


@dataclass(frozen=True)
class Failed:
    slide_id: str
    failure: Failure


ToWorker = Hello | Task | Stop
FromWorker = Ready | InitFailed | Started | Prefetching | Progress | Done | Failed

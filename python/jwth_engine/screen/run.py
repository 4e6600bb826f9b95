"""The screening driver: plans a run from the ledger, feeds slides to a pool of workers (local
processes or Ray actors, same events either way), and commits each result.

Only this process writes the ledger, the slide folders and the summary tables, so none of them
ever needs a lock shared between machines.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, DiskFull, JwthError
from ..outputs.atomic import is_disk_full
from .config import REPORT_KEY, config_hash, describe_difference, identity
from .layout import ScreenLayout
from .ledger import Ledger, ledger_full
from .progress import ScreenDisplay
from .protocol import DISK_FULL, Outcome, Task
from .results import ResultsWriter, result_from_summary
from .sources import SlideSource, load_sources

log = logging.getLogger("jwth_engine.screen")

MAX_LOST = 3            # a slide whose worker vanished this many times (not its fault) is failed


class ScreenAborted(JwthError):
    """The run cannot continue (its workers cannot start); slides are left pending."""


class _OutputFull(Exception):
    """Raised inside the driver loop when the output folder filled up; becomes DiskFull."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def _full(exc: BaseException, folder: Path | None = None) -> bool:
    return isinstance(exc, DiskFull) or is_disk_full(exc) or ledger_full(exc, folder)


@dataclass
class ScreenReport:
    out: Path
    run_id: int
    config_hash: str
    scheduled: int
    skipped: int
    done: list[str] = field(default_factory=list)          # scored and no-tissue slides alike
    no_tissue: list[str] = field(default_factory=list)     # done, but no tile reached --min-tissue
    failed: dict[str, str] = field(default_factory=dict)
    tiles_scored: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def scored(self) -> int:
        return len(self.done) - len(self.no_tissue)

    @property
    def slides_per_hour(self) -> float | None:
        """Scored slides per hour of this run's wall time: failures and no-tissue slides take
        time but are not throughput (they are reported beside it)."""
        return self.scored / self.seconds * 3600 if self.scored and self.seconds > 0 else None

    @property
    def tiles_per_second(self) -> float | None:
        return self.tiles_scored / self.seconds if self.tiles_scored and self.seconds > 0 else None


def recover(ledger: Ledger, layout: ScreenLayout) -> list[str]:
    """Finish or undo what a killed run left: slides `running` go back to pending, except those
    whose outputs were already checked and staged, which are moved into place and marked done."""
    notes = []
    for row in ledger.slides("running"):
        if row.phase == "staged":
            staging = Path(row.staging) if row.staging else None
            if staging and staging.is_dir() and not layout.check_outputs(
                    staging, row.slide_id, row.tiles_sha256, row.summary_sha256):
                layout.publish(staging, row.slide_id)
            if not layout.check_outputs(layout.slide_dir(row.slide_id), row.slide_id,
                                        row.tiles_sha256, row.summary_sha256):
                ledger.mark_done(row.slide_id)
                notes.append(f"{row.slide_id}: finished committing outputs of an interrupted run")
                continue
        layout.retire(row.slide_id)
        ledger.mark_pending(row.slide_id, note="interrupted (the run stopped while scoring it)")
        notes.append(f"{row.slide_id}: back to pending (interrupted)")
    # A slide folder is visible only while its ledger row says done; anything else is a leftover.
    done = {row.slide_id for row in ledger.slides("done")}
    if layout.slides.is_dir():
        for folder in layout.slides.iterdir():
            if folder.name not in done:
                layout.retire(folder.name)
                notes.append(f"{folder.name}: removed outputs the ledger does not list as done")
    layout.clean_scratch()
    return notes


def plan(ledger: Ledger, layout: ScreenLayout, sources: list[SlideSource], current_hash: str, *,
         retry_failed: bool) -> tuple[list[str], int]:
    """Slide ids to score in this run (source order) and how many are skipped as finished."""
    todo, skipped = [], 0
    for src in sources:
        row = ledger.get(src.slide_id)
        if row.status == "done":
            if row.config_hash != current_hash:
                reason = "configuration changed"
            else:
                problem = layout.check_outputs(layout.slide_dir(src.slide_id), src.slide_id,
                                               row.tiles_sha256, row.summary_sha256)
                if problem is None:
                    skipped += 1
                    continue
                reason = f"outputs damaged ({problem})"
            layout.retire(src.slide_id)
            ledger.mark_pending(src.slide_id, note=f"scoring again: {reason}")
        elif row.status == "failed":
            if not retry_failed and row.config_hash == current_hash:
                skipped += 1
                continue
            ledger.mark_pending(src.slide_id, note="retrying a failed slide")
        todo.append(src.slide_id)
    return todo, skipped


def check_config(ledger: Ledger, out: Path, ident: dict, current_hash: str, reconfigure: bool) -> None:
    old_hash, old_ident = ledger.config()
    if old_hash is None or old_hash == current_hash:
        return
    if not reconfigure:
        raise ConfigError(
            f"{out}: this folder was screened with another configuration "
            f"({describe_difference(old_ident or {}, ident)}); pass --reconfigure to score its slides "
            f"again with this one, or use another --out"
        )


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run_screen(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: RunConfig,
    *,
    gpus: list[int] | None = None,
    jobs: int | None = None,
    slide_timeout_s: float = 3600.0,
    ready_timeout_s: float | None = None,
    retry_failed: bool = False,
    reconfigure: bool = False,
    ray_address: str | None = None,
    ray_cpus_per_job: float = 1.0,
    progress: bool | None = None,
    results_interval_s: float = 5.0,
    argv: list[str] | None = None,
    pool_factory=None,
    extra_identity: dict | None = None,
    report: bool = False,
) -> ScreenReport:
    """Screen every slide of `source` into `out`; see `jwth-engine screen --help`. `report` adds
    each slide's NAME.report.html (pictures only: not part of the configuration's identity)."""
    t0 = time.monotonic()
    if gpus and ray_address:
        raise ConfigError("gpus is for local runs; on Ray each GPU of the cluster gets a worker "
                          "(--device cpu for CPU workers)", field="gpus")
    if gpus and config.runtime.device == "cpu":
        raise ConfigError("gpus and device cpu contradict each other", field="gpus")
    sources = load_sources(source)
    # A job other than scoring (embed) adds what decides its own outputs to the folder's identity.
    ident = {**identity(config), **(extra_identity or {})}
    current_hash = config_hash(ident)

    layout = ScreenLayout(out)
    layout.create()
    layout.lock()
    try:
        ledger = Ledger(layout.ledger)
    except DiskFull:
        layout.unlock()
        raise
    try:
        return _run_locked(layout, ledger, sources, config, ident, current_hash, t0, gpus=gpus, jobs=jobs,
                           slide_timeout_s=slide_timeout_s, ready_timeout_s=ready_timeout_s,
                           retry_failed=retry_failed, reconfigure=reconfigure, ray_address=ray_address,
                           ray_cpus_per_job=ray_cpus_per_job, progress=progress,
                           results_interval_s=results_interval_s, argv=argv, pool_factory=pool_factory,
                           write_reports=report)
    except Exception as exc:
        if _full(exc, layout.root) and not isinstance(exc, DiskFull):
            raise DiskFull(_full_message(layout.root, exc)) from exc
        raise
    finally:
        ledger.close()
        layout.unlock()


def _full_message(root: Path, cause: BaseException | str) -> str:
    return (f"{root}: the output folder's disk is full ({cause}); the run stopped, finished slides are kept "
            f"and the ledger is consistent; free space and run the same command again to resume")


def _run_locked(layout, ledger, sources, config, ident, current_hash, t0, *, gpus, jobs, slide_timeout_s,
                ready_timeout_s, retry_failed, reconfigure, ray_address, ray_cpus_per_job, progress,
                results_interval_s, argv, pool_factory, write_reports=False) -> ScreenReport:
    check_config(ledger, layout.root, ident, current_hash, reconfigure)
    for note in recover(ledger, layout):
        log.info("%s", note)
    ledger.set_config(current_hash, ident, config.to_dict())
    for slide_id, note in ledger.sync_sources(sources).items():
        layout.retire(slide_id)
        log.info("%s: %s", slide_id, note)
    todo, skipped = plan(ledger, layout, sources, current_hash, retry_failed=retry_failed)
    results = ResultsWriter(ledger, layout, results_interval_s)
    if pool_factory is None:
        pool_factory = _default_pool_factory(gpus=gpus, jobs=jobs, ray_address=ray_address,
                                             ray_cpus_per_job=ray_cpus_per_job)
    runner = "ray" if ray_address else "local"
    report = ScreenReport(layout.root, 0, current_hash, len(todo), skipped)
    if not todo:
        results.maybe_write(force=True)
        report.counts = ledger.counts()
        report.seconds = time.monotonic() - t0
        return report
    display = ScreenDisplay(len(todo), skipped, live=progress)
    pool_kwargs = {"ready_timeout_s": ready_timeout_s} if ready_timeout_s is not None else {}
    # `--report` travels beside the configuration: pictures are not part of its identity.
    options = {**config.to_dict(), REPORT_KEY: True} if write_reports else config.to_dict()
    pool = pool_factory(options, timeout_s=slide_timeout_s, log_dir=layout.logs, **pool_kwargs)
    report.run_id = ledger.begin_run(current_hash, runner, getattr(pool, "size", 0), argv or sys.argv)
    driver = _Driver(ledger, layout, pool, display, results, report)
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    state = "interrupted"
    try:
        display.start()
        driver.loop(todo)
        state = "finished"
    except ScreenAborted:
        state = "aborted"
        raise
    except (KeyboardInterrupt, _Stop):
        report.interrupted = True
    except Exception as exc:
        if not (isinstance(exc, _OutputFull) or _full(exc, layout.root)):
            raise
        state = "disk_full"
        cause = exc.cause if isinstance(exc, _OutputFull) else str(exc)
        raise DiskFull(_full_message(layout.root, cause)) from exc
    finally:
        signal.signal(signal.SIGTERM, old_term)
        display.stop()
        driver.shutdown(state)
    report.counts = ledger.counts()
    report.seconds = time.monotonic() - t0
    if report.interrupted:
        raise KeyboardInterrupt
    return report


def _default_pool_factory(*, gpus, jobs, ray_address, ray_cpus_per_job):
    if ray_address:
        from .ray_runner import RayPool

        def make_ray(options, *, timeout_s, log_dir, **kwargs):
            return RayPool(ray_address, options, timeout_s=timeout_s, log_dir=log_dir, **kwargs,
                           use_gpus=options["runtime"]["device"] != "cpu", jobs=jobs, cpus_per_job=ray_cpus_per_job)
        return make_ray

    from .local import LocalPool, cpu_specs, gpu_specs

    def make_local(options, *, timeout_s, log_dir, **kwargs):
        specs = gpu_specs(gpus) if gpus else cpu_specs(jobs or 1, hide_gpus=options["runtime"]["device"] == "cpu")
        return LocalPool(specs, options, timeout_s=timeout_s, log_dir=log_dir, **kwargs)
    return make_local


class _Driver:
    def __init__(self, ledger: Ledger, layout: ScreenLayout, pool, display: ScreenDisplay,
                 results: ResultsWriter, report: ScreenReport):
        self.ledger, self.layout, self.pool = ledger, layout, pool
        self.display, self.results, self.report = display, results, report
        self.in_flight: dict[str, Task] = {}
        self.lost: dict[str, int] = {}
        self._serial = 0

    def loop(self, todo: list[str]) -> None:
        queue, solo = deque(todo), deque()
        while queue or solo or self.in_flight:
            while solo and self.pool.free_slots(solo=True):
                self._dispatch(solo.popleft(), solo=True)
            while queue and not solo and self.pool.free_slots() > 0:
                self._dispatch(queue.popleft())
            for event in self.pool.poll(0.5):
                requeue = self._handle(event)
                if requeue is not None:
                    (solo if event.data.get("solo") else queue).appendleft(requeue)
            self.display.update(self.pool.status())
            self.results.maybe_write()

    def _dispatch(self, slide_id: str, solo: bool = False) -> None:
        row = self.ledger.get(slide_id)
        self._serial += 1
        staging = self.layout.staging_dir(slide_id, self.report.run_id, self._serial)
        task = Task(slide_id, row.path, row.mpp, str(staging))
        worker = self.pool.submit(task, solo=solo)
        if worker is None:
            raise RuntimeError("pool reported a free slot but refused the task")
        self.ledger.mark_queued(slide_id, run_id=self.report.run_id, config_hash=self.report.config_hash,
                                worker=worker, staging=str(staging))
        self.in_flight[slide_id] = task

    def _handle(self, event) -> str | None:
        sid = event.slide_id
        if event.kind == "fatal":
            raise ScreenAborted(f"worker {event.worker} could not start: {event.data['error']}")
        if event.kind == "ready":
            log.info("worker %s ready: %s", event.worker, event.data)
            return None
        if sid not in self.in_flight:
            return None  # late news of a slide already settled
        if event.kind == "start":
            self.ledger.mark_started(sid, event.worker, event.data["t"])
        elif event.kind == "done":
            self._commit(sid, event.data["outcome"])
        elif event.kind == "failed" and event.data.get("kind") == DISK_FULL:
            # Not this slide's fault: it stays to do (shutdown requeues it) and the run stops.
            raise _OutputFull(event.data["error"])
        elif event.kind == "failed":
            self._fail(sid, event.data.get("kind", "error"), event.data["error"], event.data.get("seconds"),
                       event.data.get("traceback"))
        elif event.kind == "requeue":
            task = self.in_flight.pop(sid)
            _remove(Path(task.staging))
            if event.data.get("started"):
                self.lost[sid] = self.lost.get(sid, 0) + 1
                if self.lost[sid] >= MAX_LOST:
                    self.in_flight[sid] = task
                    self._fail(sid, "lost", f"its worker was lost {MAX_LOST} times ({event.data['reason']})")
                    return None
            self.ledger.mark_requeued(sid, event.data["reason"])
            return sid
        return None

    def _commit(self, sid: str, outcome: Outcome) -> None:
        task = self.in_flight[sid]
        staging = Path(task.staging)
        summary = outcome.summary
        problem = self.layout.check_outputs(staging, sid, outcome.tiles_sha256, outcome.summary_sha256)
        recorded = summary.get("outputs", {}).get("tiles_parquet_sha256")
        if problem is None and recorded != outcome.tiles_sha256:
            problem = "tiles parquet does not match the checksum in its summary"
        if problem:
            self._fail(sid, "outputs", f"{task.path}: outputs not usable after scoring: {problem}",
                       outcome.seconds)
            return
        self.ledger.mark_staged(sid, tiles_sha256=outcome.tiles_sha256, summary_sha256=outcome.summary_sha256,
                                result=result_from_summary(summary), seconds=outcome.seconds)
        self.layout.publish(staging, sid)
        self.ledger.mark_done(sid)
        del self.in_flight[sid]
        self.report.done.append(sid)
        if summary.get("status") == "scored":
            self.report.tiles_scored += int(summary["tiles"]["scored"])
        else:
            self.report.no_tissue.append(sid)
        detail = f"{summary['tiles']['scored']} tiles" if summary.get("status") == "scored" else "no tissue"
        self.display.slide_done(sid, outcome.seconds, detail)
        self.results.changed()

    def _fail(self, sid: str, kind: str, error: str, seconds: float | None = None,
              tb: str | None = None) -> None:
        task = self.in_flight[sid]
        _remove(Path(task.staging))
        self.ledger.mark_failed(sid, kind, error, seconds)
        del self.in_flight[sid]    # only once the ledger has it (a full disk leaves it to requeue)
        if tb:
            with open(self.layout.logs / "failures.log", "a") as fh:
                fh.write(f"--- {sid} ({task.path})\n{tb}\n")
        self.report.failed[sid] = error
        self.display.slide_failed(sid, error)
        self.results.changed()

    def shutdown(self, state: str) -> None:
        """Stop the workers; slides still in flight go back to pending; tables written last. On a
        full disk every write is tried and may fail: a slide the ledger still lists as running is
        put back to pending by the next run's recover()."""
        if state == "finished":
            self.pool.close()
        else:
            self.pool.kill()
        writes = [*((lambda sid=sid: self.ledger.mark_requeued(sid, "run interrupted")) for sid in self.in_flight)]
        for task in self.in_flight.values():
            _remove(Path(task.staging))
        self.in_flight.clear()
        if self.report.run_id:
            writes.append(lambda: self.ledger.finish_run(self.report.run_id, state))
        writes.append(lambda: self.results.maybe_write(force=True))
        for write in writes:
            try:
                write()
            except Exception as exc:
                if state != "disk_full" or not _full(exc, self.layout.root):
                    raise


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

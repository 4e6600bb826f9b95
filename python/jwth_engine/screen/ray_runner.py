"""Screening on a Ray cluster: the same workers, hosted by Ray actors, one per GPU of the cluster
(or `--jobs` CPU actors when it has none).

Each actor owns a one-worker `LocalPool` on its node, so a slide that crashes or hangs is handled
exactly as on one machine (the worker process dies or is killed, the actor reports it and starts
another). The driver keeps the ledger and moves outputs into place; workers write into the output
folder, which must therefore be the same shared path on every node. An actor that disappears with
its node has its slides handed back to the scheduler.

Ray is optional (`pip install "jwth-engine[distributed]"`) and imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError
from .local import DEFAULT_READY_TIMEOUT_S, Event, LocalPool, WorkerSpec
from .process import _PACKAGE_PARENT
from .protocol import Task
from .worker import DEFAULT_JOB

log = logging.getLogger("jwth_engine.screen")

MAX_ACTOR_FAILURES = 3
POLL_S = 0.5


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(
            f"ray_address needs Ray, which is not installed ({exc}); pip install 'jwth-engine[distributed]'",
            field="ray_address") from exc
    return ray


class ScreenActor:
    """Body of the Ray actor: one worker process on this node (its GPU, if Ray gave it one)."""

    def __init__(self, name: str, options: dict, timeout_s: float, ready_timeout_s: float, log_dir: str,
                 depth: int, threads: int, job: str, env: dict):
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}
        if not gpu_ids and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(threads)
        self.host = socket.gethostname()
        spec = WorkerSpec(f"{self.host}-{name}", env)
        self.pool = LocalPool([spec], options, timeout_s=timeout_s, ready_timeout_s=ready_timeout_s,
                              log_dir=log_dir, depth=depth, job=job)
        self.backlog: list[tuple[Task, bool]] = []

    def submit(self, task: Task, solo: bool) -> None:
        # The driver counts this actor's slots; its worker may be between processes right now.
        self.backlog.append((task, solo))
        self._drain()

    def _drain(self) -> None:
        while self.backlog and self.pool.submit(self.backlog[0][0], solo=self.backlog[0][1]):
            self.backlog.pop(0)

    def poll(self, timeout: float) -> list[Event]:
        events = self.pool.poll(timeout)
        self._drain()
        return events

    def status(self) -> list[dict]:
        return self.pool.status()

    def close(self) -> None:
        self.pool.close()


def _runtime_env() -> dict:
    """Run from a source checkout: make the package importable by the actors too (an installed
    jwth-engine is found without help)."""
    if "site-packages" in _PACKAGE_PARENT or "dist-packages" in _PACKAGE_PARENT:
        return {}
    paths = [_PACKAGE_PARENT, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


class RayPool:
    """The driver's view of the actors; same interface as `LocalPool`."""

    def __init__(self, address: str, options: dict, *, timeout_s: float, log_dir: str | os.PathLike,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S, use_gpus: bool = True, jobs: int | None = None, cpus_per_job: float = 1.0, depth: int = 2,
                 job: str = DEFAULT_JOB, worker_env: dict | None = None):
        ray = self.ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, runtime_env=_runtime_env() or None, log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"ray_address {address}: cannot connect to a Ray cluster ({exc})",
                                  field="ray_address") from exc
            self._owns_ray = True
        else:
            self._owns_ray = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if use_gpus else 0
        if gpus:
            count, actor_options, threads = gpus, {"num_gpus": 1, "num_cpus": cpus_per_job}, 0
        else:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            count = jobs or max(1, nodes)
            actor_options, threads = {"num_cpus": cpus_per_job}, max(1, int(cpus_per_job))
        self.size = count
        self.depth = depth
        self._actor_cls = ray.remote(max_restarts=0)(ScreenActor)
        self._args = (options, timeout_s, ready_timeout_s, str(Path(log_dir).resolve()), depth, threads, job,
                      worker_env or {})
        self._actor_options = actor_options
        self.actors: dict[str, object] = {}
        self.refs: dict[str, object] = {}
        self.tasks: dict[str, list[Task]] = {}
        self.current: dict[str, str | None] = {}
        self.status_cache: dict[str, dict] = {}
        self.failures: dict[str, int] = {}
        self.solo: dict[str, bool] = {}
        for i in range(count):
            self._start(f"ray{i}")

    def _start(self, name: str) -> None:
        actor = self._actor_cls.options(**self._actor_options).remote(name, *self._args)
        self.actors[name] = actor
        self.tasks[name] = []
        self.current[name] = None
        self.solo[name] = False
        self.refs[name] = actor.poll.remote(POLL_S)

    # --- the LocalPool interface --------------------------------------------------------------------
    def free_slots(self, solo: bool = False) -> int:
        if solo:
            return sum(1 for name in self.actors if not self.tasks[name])
        return sum(self.depth - len(self.tasks[name]) for name in self.actors if not self.solo[name])

    def submit(self, task: Task, solo: bool = False) -> str | None:
        names = [n for n in self.actors if not self.solo[n] and len(self.tasks[n]) < (1 if solo else self.depth)]
        if not names:
            return None
        name = min(names, key=lambda n: len(self.tasks[n]))
        task = task.alone(solo)
        self.tasks[name].append(task)
        self.solo[name] = solo
        self.actors[name].submit.remote(task, solo)   # ordered before the actor's next poll
        return name

    def poll(self, timeout: float) -> list[Event]:
        ray = self.ray
        refs = list(self.refs.values())
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        events: list[Event] = []
        for name, ref in list(self.refs.items()):
            if ref not in ready:
                continue
            try:
                raw = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                    ray.exceptions.ActorUnavailableError) as exc:
                events += self._lost(name, exc)
                continue
            for event in raw:
                events.append(self._track(name, event))
            self.refs[name] = self.actors[name].poll.remote(POLL_S)
        return events

    def _track(self, name: str, event: Event) -> Event:
        if event.kind == "ready":
            self.failures[name] = 0
        elif event.kind == "start":
            self.current[name] = event.slide_id
        elif event.kind == "progress":
            self.status_cache[name] = {"slide": event.slide_id, "progress": (event.data["done"], event.data["total"])}
        elif event.kind in ("done", "failed", "requeue"):
            self.tasks[name] = [t for t in self.tasks[name] if t.slide_id != event.slide_id]
            if not self.tasks[name]:
                self.solo[name] = False
            if self.current[name] == event.slide_id:
                self.current[name] = None
                self.status_cache.pop(name, None)
        return event

    def _lost(self, name: str, exc: Exception) -> list[Event]:
        reason = f"Ray actor {name} died ({type(exc).__name__})"
        log.warning("%s: %s", reason, exc)
        events = [Event("requeue", t.slide_id, name,
                        {"reason": reason, "started": t.slide_id == self.current[name], "solo": t.solo})
                  for t in self.tasks[name]]
        self.failures[name] = self.failures.get(name, 0) + 1
        del self.actors[name], self.refs[name]
        if self.failures[name] >= MAX_ACTOR_FAILURES:
            events.append(Event("fatal", None, name, {
                "kind": "crash", "error": f"Ray actor {name} died {MAX_ACTOR_FAILURES} times in a row; last: {exc}"}))
            return events
        self._start(name)
        return events

    def status(self) -> list[dict]:
        out = []
        for name in self.actors:
            cached = self.status_cache.get(name, {})
            out.append({"worker": name, "ready": True, "slide": self.current[name],
                        "progress": cached.get("progress") if cached.get("slide") == self.current[name] else None,
                        "seconds": None, "queued": len(self.tasks[name])})
        return out

    def close(self) -> None:
        ray = self.ray
        closing = [actor.close.remote() for actor in self.actors.values()]
        try:
            ray.get(closing, timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:   # dying actors: kill below anyway
            log.warning("closing Ray actors: %s", exc)
        self.kill()

    def kill(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        if self._owns_ray:
            self.ray.shutdown()

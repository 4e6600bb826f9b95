"""Screening on a real Ray cluster (head on 127.0.0.1, two CPUs, started and stopped here) gives the
same results as the local run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_screen import TINY, assert_no_partial_outputs, assert_same_results, ledger_rows, real_slide_folder, run_cli

pytest.importorskip("ray", reason="Ray is the optional 'distributed' extra")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster of our own. Stopped by killing its process group: `ray stop` would
    stop every Ray cluster on the machine."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="jwth-ray-", dir="/tmp")   # short: Ray puts sockets under it
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.Popen(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
         "--object-store-memory=150000000", f"--temp-dir={temp_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    output, _ = start.communicate(timeout=180)
    session = start.pid       # every process of the cluster inherits the session `ray start` opened
    try:
        assert start.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_in_session(session):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _pids_in_session(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def test_ray_run_matches_local_run(cli_cmd, data_dir, tmp_path, ray_address):
    src = real_slide_folder(data_dir, tmp_path / "slides")
    args = [*TINY, "--slide-timeout", "300"]
    local = tmp_path / "local"
    proc = run_cli(cli_cmd, "screen", src, "--out", local, *args, "--jobs", "1")
    assert proc.returncode == 1, proc.stderr

    on_ray = tmp_path / "ray"
    proc = run_cli(cli_cmd, "screen", src, "--out", on_ray, *args, "--ray-address", ray_address, "--jobs", "2")
    assert proc.returncode == 1, proc.stderr
    assert_same_results(local, on_ray)
    assert_no_partial_outputs(on_ray)
    rows = ledger_rows(on_ray)
    workers = {r["worker"].rsplit("-", 1)[-1] for r in rows.values()}
    assert workers == {"ray0", "ray1"}, workers      # both actors took slides
    from jwth_engine.screen.ledger import Ledger

    with Ledger(on_ray / "ledger.sqlite", readonly=True) as ledger:
        (run,) = ledger.runs()
    assert (run["runner"], run["workers"], run["state"]) == ("ray", 2, "finished")

    again = run_cli(cli_cmd, "screen", src, "--out", on_ray, *args, "--ray-address", ray_address, "--jobs", "2")
    assert again.returncode == 1 and "0 done, 0 failed, 6 skipped" in again.stdout   # resume needs no work

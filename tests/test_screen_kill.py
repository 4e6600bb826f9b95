"""kill -9 of a whole screening run (driver and workers) after its first finished slide, then a
rerun: nothing finished is lost, nothing is duplicated, nothing partial is ever visible, and the
result equals an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time

from test_screen import (TINY, assert_no_partial_outputs, assert_same_results, ledger_rows,
                         real_slide_folder, run_cli)


def _done_count(ledger) -> int:
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM slides WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:   # tables not created yet
        return 0


def test_kill9_after_first_slide_then_resume(cli_cmd, data_dir, tmp_path):
    src = real_slide_folder(data_dir, tmp_path / "slides")
    # A second scored slide after the first (ids sort by path), so the kill lands mid-run.
    shutil.copy(src / "CMU-1-Small-Region.svs", src / "zz-CMU-copy.svs")
    args = [*TINY, "--slide-timeout", "300", "--jobs", "1"]

    reference = tmp_path / "reference"
    proc = run_cli(cli_cmd, "screen", src, "--out", reference, *args)
    assert proc.returncode == 1, proc.stderr

    out = tmp_path / "out"
    run = subprocess.Popen([*cli_cmd, "screen", str(src), "--out", str(out), *args], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _done_count(out / "ledger.sqlite") < 1:
        assert run.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no slide finished within 300 s"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)          # the driver and every worker, at once
    run.wait()

    killed = ledger_rows(out)
    finished = {k for k, r in killed.items() if r["status"] == "done"}
    assert finished and len(finished) < len(killed)
    assert_no_partial_outputs(out, killed=True)

    proc = run_cli(cli_cmd, "screen", src, "--out", out, *args)
    assert proc.returncode == 1, proc.stderr
    resumed = ledger_rows(out)
    for sid in finished:                          # finished slides were not scored again
        assert resumed[sid]["attempts"] == 1 and resumed[sid]["run_id"] == killed[sid]["run_id"]
        assert resumed[sid]["summary_sha256"] == killed[sid]["summary_sha256"]
    assert all(r["attempts"] <= 2 for r in resumed.values())
    assert_no_partial_outputs(out)
    assert_same_results(reference, out)
    assert not any((out / ".staging").iterdir())

"""Reliability: what a run leaves on disk when it is killed, when two runs share a folder, when the
disk fills up, when a worker hangs before it is ready or outlives its driver, and how the cuCIM
probe starts its children. Each test here failed on the code before these guarantees existed.

Real slides and the tiny preset throughout; faults are injected by killing real processes
(`os._exit` at a chosen rename, SIGKILL) and by a real, small file system (tmpfs).
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

TESTS_DIR = Path(__file__).resolve().parent
TINY = ["--model", "test_tiny_patch14_reg4", "--batch-size", "16", "--precision", "fp32"]
NAME = "CMU-1-Small-Region"


def run_python(code: str, *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_cli(cli_cmd, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The engine's error lines (native libraries print their own noise on stderr: cuFile, libcuda)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_never_sets_the_umask(tmp_path, monkeypatch):
    """Setting the umask to read it opens a window in which another thread creates files with
    mode 0666; the writer must let the kernel apply the umask instead."""
    from jwth_engine.outputs import atomic_write_bytes

    calls = []
    real_umask = os.umask
    old = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        real_umask(old)
    assert calls == []
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_stale_temp_cleanup_spares_live_writers(tmp_path):
    """remove_stale_temps deletes what killed writers left, never the temp file of a writer that is
    still running (here: in this process, on another descriptor)."""
    from jwth_engine.outputs import atomic_path, remove_stale_temps

    (tmp_path / ".jwth-tmp-killed.parquet.abc").write_bytes(b"left by kill -9")
    with atomic_path(tmp_path / "live.parquet") as tmp:
        tmp.write_bytes(b"half")
        assert remove_stale_temps(tmp_path) == 1
        assert tmp.exists()
        with open(tmp, "ab") as fh:
            fh.write(b" and the rest")
    assert (tmp_path / "live.parquet").read_bytes() == b"half and the rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.parquet"]


def test_two_processes_scoring_into_one_folder_both_succeed(cli_cmd, cmu_small, ndpi, tmp_path):
    """A `score` starting in a folder where another process is writing must not delete that
    process's temp file; and two real `score` runs on different slides into one folder both
    finish with consistent outputs."""
    out = tmp_path / "out"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from jwth_engine.outputs import atomic_path
        with atomic_path({str(out / 'other.bin')!r}) as tmp:
            tmp.write_bytes(b"first half ")
            print("writing", flush=True)
            sys.stdin.readline()              # hold the temp file until told to finish
            with open(tmp, "ab") as fh:
                fh.write(b"second half")
        print("done", flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        scores = [subprocess.Popen([*cli_cmd, "score", str(slide), *TINY, "--out", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for slide in (cmu_small, ndpi)]
        results = [(p.wait(600), p.stderr.read()) for p in scores]
        assert [rc for rc, _ in results] == [0, 0], results
        stdout, stderr = writer.communicate("go\n", timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0 and stdout.strip() == "done", stderr
    assert (out / "other.bin").read_bytes() == b"first half second half"
    from jwth_engine.outputs import load_slide_outputs

    for name in (NAME, ndpi.stem):
        outputs = load_slide_outputs(out, name)
        assert outputs.tiles.num_rows == outputs.summary["tiles"]["scored"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --- a slide's outputs are one unit --------------------------------------------------------------

_KILL_AT_SUMMARY_RENAME = """
import os, sys
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == "{name}.summary.json":
        os._exit(9)                      # killed between the Parquet's rename and the summary's
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
"""


def _score_code(cmu_small, out, seed, prelude="", progress="None"):
    return prelude + f"""
from jwth_engine import score_slide
score_slide({str(cmu_small)!r}, model="test_tiny_patch14_reg4", batch_size=16, precision="fp32",
            out={str(out)!r}, seed={seed}, progress={progress})
"""


def _mean_positive(outputs) -> float:
    return float(outputs.tiles.column("prob_positive").to_numpy().mean())


def test_killed_commit_is_detected_by_readers_and_recovered_by_the_next_run(cmu_small, tmp_path):
    from jwth_engine.outputs import load_slide_outputs, sha256_file

    out = tmp_path / "out"
    first = run_python(_score_code(cmu_small, out, seed=0))
    assert first.returncode == 0, first.stderr
    old = load_slide_outputs(out, NAME)

    # Seed 1 gives another random head, hence another Parquet; killed at the summary's rename.
    killed = run_python(_score_code(cmu_small, out, seed=1, prelude=_KILL_AT_SUMMARY_RENAME.format(name=NAME)))
    assert killed.returncode == 9, killed.stderr
    tiles, summary = out / f"{NAME}.tiles.parquet", out / f"{NAME}.summary.json"
    assert json.loads(summary.read_bytes()) == old.summary   # the old summary beside the new Parquet
    assert sha256_file(tiles) != old.summary["outputs"]["tiles_parquet_sha256"]
    # A reader never pairs them: the commit was decided, so it reads the new pair.
    new = load_slide_outputs(out, NAME)
    assert new.summary["outputs"]["tiles_parquet_sha256"] == sha256_file(tiles)
    assert new.summary["scores"]["positive"]["mean"] == pytest.approx(_mean_positive(new), rel=1e-5)
    assert new.summary["scores"]["positive"]["mean"] != old.summary["scores"]["positive"]["mean"]

    # The next run is killed while scoring (before writing anything); it has already finished the
    # interrupted commit, so the files on disk are the consistent new pair.
    again = run_python(_score_code(cmu_small, out, seed=2, progress="lambda done, total: os._exit(7)",
                                   prelude="import os\n"))
    assert again.returncode == 7, again.stderr
    on_disk = json.loads(summary.read_bytes())
    assert on_disk == new.summary and on_disk["outputs"]["tiles_parquet_sha256"] == sha256_file(tiles)
    assert sorted(p.name for p in out.iterdir()) == sorted([tiles.name, summary.name])


def test_reader_refuses_a_mismatched_pair(cmu_small, tmp_path):
    from jwth_engine.errors import OutputError
    from jwth_engine.outputs import load_slide_outputs

    out = tmp_path / "out"
    proc = run_python(_score_code(cmu_small, out, seed=0))
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out / f"{NAME}.tiles.parquet")
    pq.write_table(table.slice(1), out / f"{NAME}.tiles.parquet")    # a foreign write
    with pytest.raises(OutputError, match="does not match the checksum"):
        load_slide_outputs(out, NAME)
    with pytest.raises(OutputError, match="missing"):
        load_slide_outputs(out, "never-scored")


def test_bad_slide_writes_nothing_not_even_the_out_folder(cli_cmd, fixtures_dir, tmp_path):
    out = tmp_path / "new" / "out"
    for bad in (tmp_path / "missing.svs", fixtures_dir / "unopenable.tiff"):
        proc = run_cli(cli_cmd, "score", bad, *TINY, "--out", out)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()
    blocked = tmp_path / "file"
    blocked.write_text("")
    proc = run_cli(cli_cmd, "score", tmp_path / "missing.svs", *TINY, "--out", blocked / "out")
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


# --- full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs of our own (root can mount one; elsewhere the test is skipped, saying why)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system holding `folder` up to `leave_bytes` free."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        block = b"\0" * 4096
        try:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave_bytes:
                fh.write(block)
                fh.flush()
        except OSError:
            pass
    return filler


def test_score_on_a_full_disk_says_so_and_keeps_the_old_outputs(cli_cmd, cmu_small, small_fs):
    out = small_fs / "out"
    first = run_cli(cli_cmd, "score", cmu_small, *TINY, "--out", out)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    filler = fill(small_fs, 0)
    proc = run_cli(cli_cmd, "score", cmu_small, *TINY, "--seed", "1", "--out", out)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {out}: no space left"), lines
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # nothing half-written
    filler.unlink()
    proc = run_cli(cli_cmd, "score", cmu_small, *TINY, "--seed", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / f"{NAME}.summary.json").read_bytes() != before[f"{NAME}.summary.json"]


@pytest.mark.parametrize("leave_kib", [0, 48])
def test_screen_on_a_full_disk_stops_cleanly_and_resumes(cli_cmd, cmu_small, small_fs, tmp_path, leave_kib):
    """Wherever the disk fills up (the ledger, a worker's outputs, the tables), the run stops with
    one line naming the folder, no slide is marked failed for it, and a rerun after freeing space
    finishes every slide."""
    from test_screen import assert_no_partial_outputs

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(cmu_small, src / "a.svs")
    out = small_fs / "run"
    args = [*TINY, "--jobs", "1", "--no-progress", "--slide-timeout", "300"]
    proc = run_cli(cli_cmd, "screen", src, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    for name in ("b.svs", "c.svs"):
        shutil.copy(cmu_small, src / name)
    filler = fill(small_fs, leave_kib * 1024)
    proc = run_cli(cli_cmd, "screen", src, "--out", out, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = error_lines(proc.stderr)[-1]
    assert last.startswith(f"error: {out}") and "full" in last and "free space" in last, proc.stderr
    filler.unlink()    # (a reader of a WAL database needs room for its shared-memory file)
    with sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        states = dict(db.execute("SELECT slide_id, status FROM slides"))
    assert states["a"] == "done" and "failed" not in states.values(), states
    proc = run_cli(cli_cmd, "screen", src, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        assert dict(db.execute("SELECT slide_id, status FROM slides")) == {"a": "done", "b": "done", "c": "done"}
    assert_no_partial_outputs(out)


# --- screening workers ---------------------------------------------------------------------------

class HangingStartJob:
    """A job whose start never finishes (a hung model load or engine build)."""

    def __init__(self, options: dict):
        time.sleep(600)


def hold_the_gil(task, options, progress):
    """Stuck in native code with the GIL held (as some library calls are): no Python thread of
    this process runs until it returns."""
    Path(options["marker"]).write_text(str(os.getpid()))
    ctypes.PyDLL(None).sleep(120)


def test_a_worker_that_never_becomes_ready_fails_its_slide(tmp_path):
    from jwth_engine.config import RunConfig
    from jwth_engine.screen import run_screen
    from jwth_engine.screen.local import LocalPool, WorkerSpec

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.svs", "b.svs"):
        (src / name).write_bytes(b"x")

    def pool(options, *, timeout_s, log_dir, ready_timeout_s):
        spec = WorkerSpec("cpu0", {"PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "1"})
        return LocalPool([spec], options, timeout_s=timeout_s, ready_timeout_s=ready_timeout_s, log_dir=log_dir,
                         job="test_reliability:HangingStartJob")

    t0 = time.monotonic()
    report = run_screen(src, tmp_path / "out", RunConfig.from_kwargs(model="test_tiny_patch14_reg4"), pool_factory=pool,
                        slide_timeout_s=300, ready_timeout_s=2, progress=False, results_interval_s=0)
    assert time.monotonic() - t0 < 60
    assert sorted(report.failed) == ["a", "b"]
    for sid, error in report.failed.items():
        assert "did not become ready within 2 s" in error and str(src / f"{sid}.svs") in error, error
    from test_screen import ledger_rows

    rows = ledger_rows(tmp_path / "out")
    assert {r["error_kind"] for r in rows.values()} == {"start_timeout"}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_die_with_a_killed_driver(tmp_path):
    """kill -9 of the driver alone: its worker, stuck in native code holding the GIL (where a
    watchdog thread cannot run), still exits within seconds."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.svs").write_bytes(b"x")
    marker = tmp_path / "worker.pid"
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from jwth_engine.config import RunConfig
        from jwth_engine.screen import run_screen
        from jwth_engine.screen.local import LocalPool, WorkerSpec

        def pool(options, *, timeout_s, log_dir, **kwargs):
            spec = WorkerSpec("cpu0", {{"PYTHONPATH": {str(TESTS_DIR)!r}}})
            return LocalPool([spec], dict(options, marker={str(marker)!r}), timeout_s=timeout_s, log_dir=log_dir,
                             job="test_reliability:hold_the_gil")

        run_screen({str(src)!r}, {str(tmp_path / 'out')!r}, RunConfig.from_kwargs(model="test_tiny_patch14_reg4"),
                   pool_factory=pool, progress=False)
    """)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert driver.poll() is None, driver.stderr.read()
            assert time.monotonic() < deadline, "the worker never started the slide"
            time.sleep(0.1)
        worker = int(marker.read_text())
        time.sleep(1.0)          # the watchdog thread, if any, has had its chance to run by now
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its driver"
    finally:
        if driver.poll() is None:
            driver.kill()
        if marker.exists() and marker.read_text() and _alive(int(marker.read_text())):
            os.kill(int(marker.read_text()), signal.SIGKILL)


# --- the cuCIM probe ---------------------------------------------------------------------------

def test_probe_never_forks_the_caller(cmu_small, fixtures_dir, monkeypatch):
    """The caller may be multithreaded (decoder threads, torch pools): the probe's children come
    from a warm, single-threaded server, never from a fork of the caller."""
    from jwth_engine.slide import probe_slide
    from jwth_engine.slide.probe import _SERVER

    def no_fork():
        raise AssertionError("probe forked the calling process")

    monkeypatch.setattr(os, "fork", no_fork)
    stop = threading.Event()
    busy = [threading.Thread(target=lambda: [np.dot(np.ones(64), np.ones(64)) for _ in iter(stop.is_set, True)])
            for _ in range(4)]
    for thread in busy:
        thread.start()
    try:
        results = [probe_slide(cmu_small) for _ in range(3)]
        crash = probe_slide(fixtures_dir / "boxes.tiff")
    finally:
        stop.set()
        for thread in busy:
            thread.join()
    assert all(r.ok and r.method == "forkserver" for r in results)
    assert not crash.ok and crash.signal == "SIGSEGV"
    server = _SERVER.pid
    assert server is not None and os.listdir(f"/proc/{server}/task") == [str(server)]  # one thread
    assert probe_slide(cmu_small).ok and _SERVER.pid == server                          # kept warm


def test_probe_server_dies_with_its_caller(cmu_small):
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from jwth_engine.slide import probe_slide
        from jwth_engine.slide.probe import _SERVER
        assert probe_slide({str(cmu_small)!r}).ok
        print(_SERVER.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        server = int(proc.stdout.readline())
        assert _alive(server)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server)
    finally:
        if proc.poll() is None:
            proc.kill()


# --- fit-head reports what it measured -----------------------------------------------------------

def test_fit_head_reports_the_split_and_the_kept_epochs_validation_score(cli_cmd, data_dir, tmp_path):
    import torch

    from jwth_engine.backends import select_backend
    from jwth_engine.heads import load_head
    from jwth_engine.heads.fit import balanced_accuracy, embed_tiles, load_tile_images
    from jwth_engine.models import load_backbone
    from jwth_engine.pipeline import ModelStage

    head_path = tmp_path / "head.safetensors"
    proc = run_cli(cli_cmd, "fit-head", data_dir / "tiles/labels.csv", "--root", data_dir,
                   "--where", "label_type=tissue_class", "--model", "test_tiny_patch14_reg4", "--pooling", "jwth",
                   "--num-heads", "4", "--epochs", "30", "--lr", "3e-3", "--val-fraction", "0.25",
                   "--precision", "fp32", "-o", head_path, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    split = report["split"]
    assert set(split) == set(report["classes"])
    assert all(n["val"] >= 1 and n["train"] >= 1 for n in split.values()), split   # 3-5 tiles per class
    assert sum(n["val"] for n in split.values()) == report["num_val"] == len(report["val_tiles"])
    assert sum(n["train"] + n["val"] for n in split.values()) == report["num_tiles"] == 33
    assert report["selected_epoch"] == 29 and report["classes_without_validation"] == []

    # The reported validation score is the saved head's, on the listed held-out tiles.
    backbone = load_backbone("test_tiny_patch14_reg4", None, seed=0)
    chosen = select_backend(backbone, backend="torch", device="cpu", precision="fp32", max_batch=16, compile=False)
    stage = ModelStage(chosen, head=None, tile_size=224, mean=backbone.preset.mean, std=backbone.preset.std)
    val_paths = [Path(p) for p in report["val_tiles"]]
    tokens = embed_tiles(load_tile_images(val_paths), stage, 16)
    head = load_head(head_path)
    with torch.no_grad():
        pred = head.module(tokens.float()).logits.argmax(-1).numpy()
    labels = {Path(r).name: r for r in report["val_tiles"]}
    with open(data_dir / "tiles/labels.csv", newline="") as fh:
        label_of = {Path(r["path"]).name: r["label"] for r in csv.DictReader(fh) if Path(r["path"]).name in labels}
    target = np.array([report["classes"].index(label_of[p.name]) for p in val_paths])
    assert report["val_balanced_accuracy"] == pytest.approx(
        balanced_accuracy(pred, target, len(report["classes"])), abs=1e-9)


def test_fit_head_warns_or_refuses_without_validation_tiles():
    import torch

    from jwth_engine.config import TrainingConfig
    from jwth_engine.errors import FitError
    from jwth_engine.heads.fit import train_head

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(7, 5, 16, generator=g)
    warnings = []
    _, report = train_head(tokens, np.array([0, 0, 0, 1, 1, 1, 2]), pooling="jwth", num_classes=3,
                           num_prefix_tokens=1, training=TrainingConfig(num_heads=2, epochs=2, val_fraction=0.3),
                           seed=0, classes=["a", "b", "c"], warn=warnings.append)
    assert report["split"] == {"a": {"train": 2, "val": 1}, "b": {"train": 2, "val": 1}, "c": {"train": 1, "val": 0}}
    assert report["classes_without_validation"] == ["c"]
    assert len(warnings) == 1 and "c" in warnings[0] and "no validation tiles" in warnings[0]
    with pytest.raises(FitError, match="nothing to validate on"):
        train_head(tokens[:2], np.array([0, 1]), pooling="jwth", num_classes=2, num_prefix_tokens=1,
                   training=TrainingConfig(num_heads=2, epochs=1, val_fraction=0.5), seed=0)

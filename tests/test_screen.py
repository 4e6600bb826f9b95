"""Bulk screening: slide ids, manifest, ledger, crash isolation, resume rules, results, and the CLI
over copies of the real slides and the broken fixtures.

Scheduling tests run real worker processes with a stand-in job (`fake_job` below, imported by the
worker from this file) so that crashes, hangs and exceptions are exact and fast; the end-to-end
tests score the real slides with the tiny preset.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jwth_engine.errors import ConfigError, SlideError
from jwth_engine.config import RunConfig
from jwth_engine.screen import run_screen
from jwth_engine.screen.layout import ScreenLayout
from jwth_engine.screen.ledger import Ledger
from jwth_engine.screen.local import LocalPool, WorkerSpec
from jwth_engine.screen.run import recover
from jwth_engine.screen.sources import (MAX_ID_LENGTH, assign_ids, load_sources, read_manifest,
                                        sanitize_slide_id, scan_folder)

TESTS_DIR = Path(__file__).resolve().parent
TINY = ["--model", "test_tiny_patch14_reg4", "--batch-size", "16", "--precision", "fp32"]
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
# Fixed tiling, so that tests with the stand-in job need no backbone preset.
FAKE_OPTIONS = dict(model="test_tiny_patch14_reg4", tile_size=224, target_mpp=0.5)


# --- the stand-in job, run inside real worker processes ------------------------------------------------
def fake_job(task: dict, options: dict, progress) -> dict:
    """Behaves according to how the file starts: segv / hang / bad / bug, else writes outputs."""
    from jwth_engine.outputs import sha256_file, write_summary_json
    from jwth_engine.outputs.atomic import atomic_write_bytes

    name = Path(task.path).name
    content = Path(task.path).read_bytes()
    if content.startswith(b"segv"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if content.startswith(b"hang"):
        time.sleep(600)
    if content.startswith(b"bad"):
        raise SlideError(task.path, "cannot read this file")
    if content.startswith(b"bug"):
        raise ZeroDivisionError("division by zero in a library")
    staging = Path(task.staging)
    staging.mkdir(parents=True, exist_ok=True)
    sid = task.slide_id
    tiles = staging / f"{sid}.tiles.parquet"
    atomic_write_bytes(tiles, Path(task.path).read_bytes() + options["model"]["model"].encode())
    progress(1, 1)
    time.sleep(float(os.environ.get("FAKE_JOB_SLEEP", "0")))
    mean = (len(name) % 10) / 10
    summary = {
        "status": "scored", "classes": ["negative", "positive"], "prediction": "negative",
        "scores": {"negative": {"mean": 1 - mean, "topk_mean": 1 - mean, "k": 1},
                   "positive": {"mean": mean, "topk_mean": mean, "k": 1}},
        "tiles": {"scored": 1, "candidates": 1}, "slide": {"mpp_used": task.mpp or 0.5, "reader": "fake"},
        "outputs": {"tiles_parquet_sha256": sha256_file(tiles)},
    }
    write_summary_json(summary, staging / f"{sid}.summary.json")
    return {"summary": summary, "tiles_sha256": sha256_file(tiles),
            "summary_sha256": sha256_file(staging / f"{sid}.summary.json")}


class PreparingFakeJob:
    """`fake_job` with a preparation step that crashes on files starting with "segvprep", run by
    the worker's look-ahead while the previous slide is still being scored."""

    def __init__(self, options: dict):
        self.options, self.info = options, {}

    def prepare(self, task: dict):
        if Path(task.path).read_bytes().startswith(b"segvprep"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return None

    def discard(self, prepared) -> None:
        pass

    def run(self, task: dict, prepared, progress) -> dict:
        return fake_job(task, self.options, progress)


def fake_pool(jobs: int = 2, timeout_s: float = 5.0, env: dict | None = None, job: str = "test_screen:fake_job"):
    def factory(options, *, timeout_s=timeout_s, log_dir=None, _timeout=timeout_s, **kwargs):
        specs = [WorkerSpec(f"cpu{i}", {"PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "1", **(env or {})})
                 for i in range(jobs)]
        return LocalPool(specs, options, timeout_s=_timeout, log_dir=log_dir, job=job, **kwargs)
    return factory


def make_files(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
    return folder


def ledger_rows(out: Path) -> dict[str, dict]:
    with Ledger(Path(out) / "ledger.sqlite", readonly=True) as ledger:
        return {r.slide_id: r.__dict__ for r in ledger.slides()}


def fake_run(source, out, **kwargs):
    options = RunConfig.from_kwargs(**{**FAKE_OPTIONS, **kwargs.pop("options", {})})
    pool = kwargs.pop("pool", None) or fake_pool()
    return run_screen(source, out, options, pool_factory=pool, progress=False, results_interval_s=0, **kwargs)


# --- slide ids and sources ---------------------------------------------------------------------
HOSTILE = ["../../etc/passwd", "/abs/path/slide", "a/b", "..", ".", "", "   ", ".hidden", "CON", "nul.svs",
           "x" * 300, "ünïcödé", "a\x00b", "semi;colon|pipe*?", "C:\\windows\\evil", "-rf", "~user",
           "slides/../../..", "..\\..\\x"]


@pytest.mark.parametrize("raw", HOSTILE)
def test_sanitize_slide_id_is_one_safe_component(raw, tmp_path):
    slide_id = sanitize_slide_id(raw)
    assert SAFE_ID.match(slide_id), slide_id
    assert slide_id not in (".", "..") and len(slide_id) <= MAX_ID_LENGTH
    assert (tmp_path / slide_id).resolve().parent == tmp_path.resolve()
    assert slide_id.split(".")[0].lower() not in ("con", "nul")


def test_assign_ids_unique_and_stable():
    rows = [("A", "/d/1.svs", None, {}), ("a", "/d/2.svs", None, {}), ("a/", "/d/3.svs", None, {}),
            ("a", "/d/2.svs", None, {}), ("../a", "/d/4.svs", None, {})]
    ids = [s.slide_id for s in assign_ids(rows)]
    assert ids[0] == "A"
    assert len({i.lower() for i in ids}) == len(ids)
    assert ids == [s.slide_id for s in assign_ids(rows)]


def test_scan_folder_recursive_by_extension(tmp_path):
    make_files(tmp_path / "a", ["x.svs", "y.NDPI", "notes.txt", ".hidden.svs"])
    make_files(tmp_path / "b", ["x.svs", "z.tiff"])
    make_files(tmp_path / ".cache", ["c.svs"])
    sources = scan_folder(tmp_path)
    assert [Path(s.path).relative_to(tmp_path).as_posix() for s in sources] == ["a/x.svs", "a/y.NDPI", "b/x.svs", "b/z.tiff"]
    ids = [s.slide_id for s in sources]
    assert ids[:2] == ["x", "y"] and ids[2].startswith("x-") and ids[3] == "z"


def test_manifest_columns_paths_and_errors(tmp_path):
    make_files(tmp_path / "s", ["one.svs", "two.svs"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id,mpp,cohort,label\ns/one.svs,P-1,0.25,A,1\n"
                        f"{tmp_path / 's' / 'two.svs'},,,B,0\n")
    first, second = read_manifest(manifest)
    assert (first.slide_id, first.path, first.mpp, first.extra) == ("P-1", str(tmp_path / "s/one.svs"), 0.25,
                                                                    {"cohort": "A", "label": "1"})
    assert (second.slide_id, second.mpp, second.extra["cohort"]) == ("two", None, "B")

    bad = tmp_path / "bad.csv"
    for text, message in [("slide,mpp\na,1\n", "no 'path' column"), ("path,mpp\na.svs,abc\n", "line 2: mpp 'abc'"),
                          ("path,mpp\na.svs,0\n", "outside"), ("path,mpp\n,0.5\n", "line 2: empty path"), ("path\n", "no rows")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load_sources(bad)
        assert str(bad) in str(info.value)


# --- ledger ---------------------------------------------------------------------------------------
def test_ledger_is_wal_and_tracks_states(tmp_path):
    make_files(tmp_path / "s", ["a.svs", "b.svs"])
    with Ledger(tmp_path / "l.sqlite") as ledger:
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        sources = scan_folder(tmp_path / "s")
        assert ledger.sync_sources(sources) == {}
        ledger.mark_queued("a", run_id=1, config_hash="h", worker="w", staging="/x")
        ledger.mark_started("a", "w", 1.0)
        ledger.mark_failed("a", "error", "a.svs: broken\nsecond line")
        row = ledger.get("a")
        assert (row.status, row.attempts, row.error, row.error_kind) == ("failed", 1, "a.svs: broken second line", "error")
        assert ledger.counts() == {"pending": 1, "running": 0, "done": 0, "failed": 1}
        moved = [s.__class__(s.slide_id, s.path + ".moved", s.mpp, s.extra) for s in sources]
        assert set(ledger.sync_sources(moved)) == {"a"}   # a changed file is scored again
        assert ledger.get("a").status == "pending"


# --- crash isolation and scheduling with real worker processes -----------------------------------------
def test_crash_hang_and_errors_are_failed_and_the_run_goes_on(tmp_path):
    src = make_files(tmp_path / "src", ["a.svs", "segv_b.svs", "c.svs", "bad_d.svs", "bug_e.svs", "hang_f.svs", "g.svs"])
    out = tmp_path / "out"
    report = fake_run(src, out, pool=fake_pool(jobs=2, timeout_s=3))
    rows = ledger_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {
        "a": "done", "segv_b": "failed", "c": "done", "bad_d": "failed", "bug_e": "failed", "hang_f": "failed",
        "g": "done"}
    assert rows["segv_b"]["error"] == f"worker crashed with SIGSEGV while scoring {src / 'segv_b.svs'}"
    assert rows["segv_b"]["error_kind"] == "crash"
    assert rows["hang_f"]["error"].startswith("timed out after 3 s") and rows["hang_f"]["error_kind"] == "timeout"
    assert rows["bad_d"]["error"] == f"{src / 'bad_d.svs'}: cannot read this file"
    assert rows["bug_e"]["error_kind"] == "exception" and "ZeroDivisionError" in rows["bug_e"]["error"]
    assert "ZeroDivisionError" in (out / "logs" / "failures.log").read_text()
    assert sorted(report.done) == ["a", "c", "g"] and len(report.failed) == 4
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["a", "c", "g"]
    assert not any((out / ".staging").iterdir())
    for sid in ("a", "c", "g"):
        assert sorted(p.name for p in (out / "slides" / sid).iterdir()) == [f"{sid}.summary.json", f"{sid}.tiles.parquet"]


def test_crash_while_preparing_the_next_slide_is_attributed_by_retrying_alone(tmp_path):
    src = make_files(tmp_path / "src", ["a.svs", "b.svs", "c.svs"])
    (src / "b.svs").write_bytes(b"segvprep")
    out = tmp_path / "out"
    report = fake_run(src, out, pool=fake_pool(jobs=1, job="test_screen:PreparingFakeJob",
                                               env={"FAKE_JOB_SLEEP": "1"}))
    rows = ledger_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {"a": "done", "b": "failed", "c": "done"}
    assert rows["b"]["error"] == f"worker crashed with SIGSEGV while scoring {src / 'b.svs'}"
    assert rows["a"]["attempts"] == 2            # scored again, alone, after the ambiguous crash
    assert sorted(report.done) == ["a", "c"]


def test_rerun_skips_retries_and_guards_the_configuration(tmp_path):
    src = make_files(tmp_path / "src", ["a.svs", "bad_b.svs", "c.svs"])
    out = tmp_path / "out"
    fake_run(src, out)
    first = ledger_rows(out)

    again = fake_run(src, out)
    assert (again.scheduled, again.skipped) == (0, 3)
    assert ledger_rows(out) == first                      # nothing touched

    (src / "bad_b.svs").write_bytes(b"repaired")
    assert fake_run(src, out).scheduled == 0               # failed stays failed without --retry-failed
    retried = fake_run(src, out, retry_failed=True)
    assert (retried.scheduled, retried.done) == (1, ["bad_b"])
    assert ledger_rows(out)["bad_b"]["attempts"] == 2 and ledger_rows(out)["bad_b"]["status"] == "done"

    with pytest.raises(ConfigError, match=r"another configuration .*model test_tiny_patch14_reg4 -> other.*--reconfigure"):
        fake_run(src, out, options={"model": "other"})
    with pytest.raises(ConfigError, match="min_tissue 0.25 -> 0.5"):
        fake_run(src, out, options={"min_tissue": 0.5})
    redo = fake_run(src, out, options={"model": "other"}, reconfigure=True)
    assert sorted(redo.done) == ["a", "bad_b", "c"] and redo.skipped == 0
    assert (out / "slides" / "a" / "a.tiles.parquet").read_bytes().endswith(b"other")


def test_damaged_or_missing_outputs_are_scored_again(tmp_path):
    src = make_files(tmp_path / "src", ["a.svs", "b.svs", "c.svs"])
    out = tmp_path / "out"
    fake_run(src, out)
    (out / "slides" / "a" / "a.summary.json").write_text("{}")
    shutil.rmtree(out / "slides" / "b")
    report = fake_run(src, out)
    assert sorted(report.done) == ["a", "b"] and report.skipped == 1
    assert json.loads((out / "slides" / "a" / "a.summary.json").read_text())["status"] == "scored"


def test_recover_finishes_staged_and_undoes_running(tmp_path):
    """The states a kill -9 can leave, built by hand: staged (checksums recorded, folder not yet
    moved), running (worker writing), a stray slide folder and stale temp files."""
    src = make_files(tmp_path / "src", ["a.svs", "b.svs", "c.svs"])
    out = tmp_path / "out"
    fake_run(src, out)
    layout = ScreenLayout(out)
    with Ledger(layout.ledger) as ledger:
        row = ledger.get("a")
        staging = layout.staging_dir("a", 9, 1)
        os.rename(layout.slide_dir("a"), staging)             # killed between the two renames
        ledger.mark_queued("a", run_id=9, config_hash=row.config_hash, worker="w", staging=str(staging))
        ledger.mark_staged("a", tiles_sha256=row.tiles_sha256, summary_sha256=row.summary_sha256,
                           result=row.result, seconds=1.0)
        half = layout.staging_dir("b", 9, 2)
        half.mkdir()
        (half / ".jwth-tmp-b.tiles.parquet.x").write_bytes(b"partial")
        ledger.mark_queued("b", run_id=9, config_hash=row.config_hash, worker="w", staging=str(half))
        (layout.slides / "zz").mkdir()
        (out / ".jwth-tmp-summary.csv.123").write_text("partial")
        notes = recover(ledger, layout)
        assert ledger.get("a").status == "done" and ledger.get("b").status == "pending"
        assert any("zz" in n for n in notes)
    assert sorted(p.name for p in layout.slides.iterdir()) == ["a", "c"]
    assert not any(layout.staging.iterdir()) and not (out / ".jwth-tmp-summary.csv.123").exists()


def test_results_tables_and_screen_status(tmp_path, cli_cmd):
    make_files(tmp_path / "s", ["one.svs", "bad_two.svs"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id,status,cohort\ns/one.svs,p1,x,A\ns/bad_two.svs,p2,y,B\n")
    out = tmp_path / "out"
    fake_run(manifest, out)
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows["p1"]["status"] == "done" and rows["p2"]["status"] == "failed"
    assert rows["p1"]["cohort"] == "A" and rows["p1"]["extra_status"] == "x"   # clashing name kept, renamed
    assert float(rows["p1"]["score_positive_mean"]) == pytest.approx(0.7) and rows["p1"]["tiles_scored"] == "1"
    assert "cannot read" in rows["p2"]["error"]
    table = pq.read_table(out / "summary.parquet")
    assert table.num_rows == 2 and str(table.schema.field("score_positive_mean").type) == "double"
    assert table.column("slide_id").to_pylist() == ["p1", "p2"]

    proc = subprocess.run([*cli_cmd, "screen-status", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "done 1, failed 1" in proc.stdout and "FAILED   p2: [error]" in proc.stdout
    proc = subprocess.run([*cli_cmd, "screen-status", str(out), "--json"], capture_output=True, text=True, timeout=120)
    status = json.loads(proc.stdout)
    assert status["counts"]["done"] == 1 and status["config"]["model"] == "test_tiny_patch14_reg4"


def test_one_run_per_folder(tmp_path):
    src = make_files(tmp_path / "src", ["a.svs"])
    layout = ScreenLayout(tmp_path / "out")
    layout.create()
    layout.lock()
    try:
        with pytest.raises(ConfigError, match=f"another screening run is using this folder \\(pid {os.getpid()}\\)"):
            fake_run(src, tmp_path / "out")
    finally:
        layout.unlock()


# --- real slides, end to end through the CLI -----------------------------------------------------------------
def run_cli(cli_cmd, *args, timeout=600, **kwargs):
    return subprocess.run([*cli_cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


def real_slide_folder(data_dir: Path, dest: Path) -> Path:
    """Copies of the shared slides (the JP2K TCGA slide, which has no MPP, is in the manifest test)
    plus the three broken fixtures."""
    dest.mkdir(parents=True)
    for rel in ("wsi/aperio_svs/CMU-1-Small-Region.svs", "wsi/aperio_svs/openslide-python-small.svs",
                "wsi/hamamatsu_ndpi/test3-DAPI-2-387.ndpi", "fixtures_synthetic/boxes.tiff",
                "fixtures_synthetic/unreadable.svs", "fixtures_synthetic/unopenable.tiff"):
        shutil.copy(data_dir / rel, dest / Path(rel).name)
    return dest


EXPECTED_STATUS = {"CMU-1-Small-Region": "done", "openslide-python-small": "done", "test3-DAPI-2-387": "done",
                   "boxes": "failed", "unreadable": "failed", "unopenable": "failed"}


def test_screen_real_slides_and_broken_fixtures(cli_cmd, data_dir, tmp_path):
    src = real_slide_folder(data_dir, tmp_path / "slides")
    out = tmp_path / "out"
    proc = run_cli(cli_cmd, "screen", src, "--out", out, *TINY, "--slide-timeout", "300")
    assert proc.returncode == 1, proc.stderr        # 1: finished, some slides failed
    rows = ledger_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == EXPECTED_STATUS, {k: r["error"] for k, r in rows.items()}
    for sid in ("boxes", "unreadable", "unopenable"):
        assert rows[sid]["error"] and rows[sid]["error_kind"] in ("error", "crash"), rows[sid]
        # either OpenSlide's complaint naming the file, or the worker crash naming it
        assert f"{sid}." in rows[sid]["error"]
    for sid, row in rows.items():
        if row["status"] == "done":
            folder = out / "slides" / sid
            summary = json.loads((folder / f"{sid}.summary.json").read_text())
            assert summary["model"]["preset"] == "test_tiny_patch14_reg4"
            assert row["result"]["tiles_scored"] == summary["tiles"]["scored"]
            assert pq.read_table(folder / f"{sid}.tiles.parquet").num_rows == summary["tiles"]["scored"]
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(k for k, v in EXPECTED_STATUS.items() if v == "done")
    with open(out / "summary.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(EXPECTED_STATUS)
    assert "3 done, 3 failed, 0 pending" in proc.stdout


def test_manifest_with_hostile_slide_ids(cli_cmd, data_dir, tmp_path):
    slides = tmp_path / "in"
    slides.mkdir()
    small = shutil.copy(data_dir / "wsi/aperio_svs/openslide-python-small.svs", slides / "small.svs")
    tcga = shutil.copy(data_dir / "wsi/aperio_svs/tcga-cr-7395-01a-01-ts1.svs", slides / "tcga.svs")
    manifest = tmp_path / "manifest.csv"
    rows = [("../../escape", small, ""), ("/etc/passwd", small, ""), ("..", small, ""), ("A", small, ""),
            ("a", small, ""), (".hidden", small, ""), ("x" * 400, small, ""), ("tcga", tcga, "0.25")]
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "slide_id", "mpp", "site"])
        for i, (sid, path, mpp) in enumerate(rows):
            writer.writerow([path, sid, mpp, f"site{i}"])
    out = tmp_path / "deep" / "out"
    proc = run_cli(cli_cmd, "screen", manifest, "--out", out, *TINY, "--min-tissue", "0.5")
    assert proc.returncode == 0, proc.stderr
    folders = sorted(p.name for p in (out / "slides").iterdir())
    assert len(folders) == len(rows) and len({f.lower() for f in folders}) == len(rows)
    assert all(SAFE_ID.match(f) and len(f) <= MAX_ID_LENGTH for f in folders)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]       # nothing escaped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "in", "manifest.csv"]
    ledger = ledger_rows(out)
    assert ledger["tcga"]["mpp"] == 0.25 and ledger["tcga"]["result"]["mpp_used"] == 0.25
    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["site"] for r in table] == [f"site{i}" for i in range(len(rows))]


class CucimFirstJob:
    """The real job, except that each slide is first opened with cuCIM directly, without the reader
    factory's crash-isolated probe (as a reader without that protection would)."""

    def __new__(cls, options: dict):
        from jwth_engine.screen.worker import ScoreJob

        class _Job(ScoreJob):
            def prepare(self, task):
                from cucim import CuImage

                CuImage(task.path)
                return super().prepare(task)

        return _Job(options)


def test_native_crash_in_a_worker_is_recorded(fixtures_dir, tiny_svs, tmp_path):
    """cuCIM opening boxes.tiff segfaults: the worker dies with SIGSEGV, the slide is failed with
    that cause, and a replacement worker scores the next slide."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(fixtures_dir / "boxes.tiff", src / "a_boxes.tiff")
    shutil.copy(tiny_svs, src / "b_small.svs")
    out = tmp_path / "out"
    options = RunConfig.from_kwargs(model="test_tiny_patch14_reg4", precision="fp32", batch_size=16)

    def pool(opts, *, timeout_s, log_dir, **kwargs):
        spec = WorkerSpec("cpu0", {"PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "1"})
        return LocalPool([spec], opts, timeout_s=120, log_dir=log_dir, job="test_screen:CucimFirstJob")

    report = run_screen(src, out, options, pool_factory=pool, progress=False)
    rows = ledger_rows(out)
    assert rows["a_boxes"]["status"] == "failed" and rows["a_boxes"]["error_kind"] == "crash"
    assert rows["a_boxes"]["error"] == f"worker crashed with SIGSEGV while scoring {src / 'a_boxes.tiff'}"
    assert rows["b_small"]["status"] == "done" and report.done == ["b_small"]
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["b_small"]


# --- shared by test_screen_kill.py and test_screen_ray.py ---------------------------------------------------
def assert_no_partial_outputs(out: Path, *, killed: bool = False) -> None:
    """Every visible slide folder holds exactly a complete, self-consistent pair of outputs, and the
    summary tables are complete. Right after a kill, a writer's hidden `.jwth-tmp-*` file may be
    left (the next run removes it); otherwise there is none."""
    from jwth_engine.outputs import sha256_file

    for folder in (out / "slides").iterdir():
        sid = folder.name
        assert sorted(p.name for p in folder.iterdir()) == [f"{sid}.summary.json", f"{sid}.tiles.parquet"], folder
        summary = json.loads((folder / f"{sid}.summary.json").read_text())
        assert summary["outputs"]["tiles_parquet_sha256"] == sha256_file(folder / f"{sid}.tiles.parquet")
        assert pq.read_table(folder / f"{sid}.tiles.parquet").num_rows == summary["tiles"]["scored"]
    with open(out / "summary.csv", newline="") as fh:
        assert {r["slide_id"] for r in csv.DictReader(fh)} <= set(ledger_rows(out))
    assert pq.read_table(out / "summary.parquet").num_rows == len(ledger_rows(out))
    for path in out.rglob("*"):
        if path.name.startswith(".jwth-tmp-"):
            assert killed and (path.parent == out or ".staging" in path.parts), path


def assert_same_results(a: Path, b: Path) -> None:
    """Two screening folders hold the same slides, statuses and scores (the scores to float tolerance)."""
    rows_a, rows_b = ledger_rows(a), ledger_rows(b)
    assert {k: r["status"] for k, r in rows_a.items()} == {k: r["status"] for k, r in rows_b.items()}
    assert {k: r["config_hash"] for k, r in rows_a.items()} == {k: r["config_hash"] for k, r in rows_b.items()}
    assert sorted(p.name for p in (a / "slides").iterdir()) == sorted(p.name for p in (b / "slides").iterdir())
    for sid, row in rows_a.items():
        if row["status"] != "done":
            assert rows_b[sid]["error_kind"] == row["error_kind"]
            continue
        res_a, res_b = row["result"], rows_b[sid]["result"]
        assert {k: v for k, v in res_a.items() if k != "scores"} == {k: v for k, v in res_b.items() if k != "scores"}
        for cls, value in res_a["scores"].items():
            assert res_b["scores"][cls]["mean"] == pytest.approx(value["mean"], rel=1e-4, abs=1e-6)
            assert res_b["scores"][cls]["topk_mean"] == pytest.approx(value["topk_mean"], rel=1e-4, abs=1e-6)
        ta = pq.read_table(a / "slides" / sid / f"{sid}.tiles.parquet")
        tb = pq.read_table(b / "slides" / sid / f"{sid}.tiles.parquet")
        assert ta.column_names == tb.column_names and ta.num_rows == tb.num_rows
        for name in ta.column_names:
            assert ta.column(name).to_pylist() == pytest.approx(tb.column(name).to_pylist(), rel=1e-4, abs=1e-6)
    for table in ("summary.csv",):
        with open(a / table, newline="") as fa, open(b / table, newline="") as fb:
            ids_a = [r["slide_id"] for r in csv.DictReader(fa)]
            ids_b = [r["slide_id"] for r in csv.DictReader(fb)]
        assert ids_a == ids_b and len(set(ids_a)) == len(ids_a)


def test_slide_scorer_writes_what_score_slide_writes(cmu_small, tmp_path):
    """The worker's split of score_slide (model loaded once, next slide prepared ahead) must write
    the same files as score_slide itself."""
    import pyarrow as pa

    from jwth_engine.scoring import SlideScorer, score_slide

    options = dict(model="test_tiny_patch14_reg4", precision="fp32", batch_size=16, num_workers=1)
    reference = score_slide(cmu_small, out=tmp_path / "ref", name="s", **options)
    scorer = SlideScorer(**options)
    first = scorer.prepare(str(cmu_small))
    second = scorer.prepare(str(cmu_small))           # a second slide decoding while the first is scored
    summaries = [scorer.finish(first, out=tmp_path / "a", name="s").summary,
                 scorer.finish(second, out=tmp_path / "b", name="s").summary]
    volatile = {"timings_s", "created", "throughput", "outputs", "pipeline"}  # pipeline: queue high-water marks
    expected = {k: v for k, v in reference.summary.items() if k not in volatile}
    for folder, summary in zip(("a", "b"), summaries):
        on_disk = json.loads((tmp_path / folder / "s.summary.json").read_text())
        assert on_disk == json.loads(json.dumps(summary))
        assert {k: v for k, v in summary.items() if k not in volatile} == expected
        assert summary["timings_s"].keys() == reference.summary["timings_s"].keys()
        table = pq.read_table(tmp_path / folder / "s.tiles.parquet")
        assert table.equals(pa.Table.from_batches(reference.tiles.to_batches(), reference.tiles.schema))
        assert table.schema.metadata == pq.read_table(tmp_path / "ref" / "s.tiles.parquet").schema.metadata
    assert summaries[1]["timings_s"]["model_load"] == 0.0     # loaded once

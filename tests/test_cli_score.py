"""End-to-end: the installed CLI scores real slides as a subprocess, and fails cleanly on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

TINY = ["--model", "test_tiny_patch14_reg4", "--batch-size", "16"]


def run_cli(cli_cmd, *args, timeout=600):
    return subprocess.run([*cli_cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def error_line(proc) -> str:
    """The last stderr line; the CLI's error is one line starting with 'error: '."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no error message on stderr"
    return lines[-1]


def test_score_cmu_end_to_end(cli_cmd, cmu_small, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(cli_cmd, "score", cmu_small, *TINY, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "scored"
    assert summary["slide"]["reader"] == "cucim" and summary["slide"]["vendor"] == "aperio"
    assert summary["slide"]["mpp_used"] == pytest.approx(0.499)
    assert summary["model"]["random_init"] and summary["head"]["random_init"]
    assert any("not meaningful" in note.lower() for note in summary["notes"])
    assert "NOT meaningful" in proc.stderr  # the loud warning reaches the user
    files = sorted(p.name for p in out.iterdir())
    assert files == ["CMU-1-Small-Region.summary.json", "CMU-1-Small-Region.tiles.parquet"]
    on_disk = json.loads((out / "CMU-1-Small-Region.summary.json").read_text())
    assert on_disk["scores"] == summary["scores"]
    table = pq.read_table(out / "CMU-1-Small-Region.tiles.parquet")
    n = summary["tiles"]["scored"]
    assert table.num_rows == n and 20 < n <= summary["tiles"]["candidates"]
    probs = np.stack([table.column(f"prob_{c}").to_numpy() for c in summary["classes"]], axis=1)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert summary["scores"]["positive"]["mean"] == pytest.approx(float(probs[:, 1].mean()), rel=1e-5)
    x, y = table.column("x").to_numpy(), table.column("y").to_numpy()
    width, height = summary["slide"]["level_dimensions"][0]
    assert (x >= 0).all() and (x < width).all() and (y >= 0).all() and (y < height).all()
    assert (table.column("width").to_numpy() == summary["tiles"]["size_level0"][0]).all()
    assert (table.column("tissue_fraction").to_numpy() >= 0.25).all()
    timings = summary["timings_s"]
    for stage in ("open", "tissue", "decode", "backbone", "head", "write", "total"):
        assert timings[stage] > 0, stage                 # every stage ran and was timed
    # The steps run one after the other within the total (decode overlaps the backbone).
    assert timings["open"] + timings["tissue"] + timings["scoring_wall"] + timings["write"] <= timings["total"] + 1e-3
    assert timings["backbone"] + timings["head"] <= timings["scoring_wall"] * 1.05


def test_score_linear_probe_and_api_agree(cli_cmd, cmu_small, tmp_path):
    import jwth_engine

    proc = run_cli(cli_cmd, "score", cmu_small, *TINY, "--pooling", "linear-probe", "--out", tmp_path / "cli",
                   "--precision", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    cli_summary = json.loads(proc.stdout)
    with pytest.warns(UserWarning):
        result = jwth_engine.score_slide(cmu_small, model="test_tiny_patch14_reg4", pooling="linear-probe",
                                         batch_size=16, precision="fp32", out=tmp_path / "api")
    assert result.summary["head"]["pooling"] == "linear-probe"
    assert result.tiles.num_rows == cli_summary["tiles"]["scored"]
    for cls, value in cli_summary["scores"].items():
        assert result.summary["scores"][cls]["mean"] == pytest.approx(value["mean"], rel=1e-5)


def test_jp2k_without_mpp_fails_then_scores_with_override(cli_cmd, tcga_jp2k, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(cli_cmd, "score", tcga_jp2k, *TINY, "--out", out)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: ") and str(tcga_jp2k) in line and "--mpp" in line
    assert not out.exists() or not any(out.iterdir())
    proc = run_cli(cli_cmd, "score", tcga_jp2k, *TINY, "--out", out, "--mpp", "0.25", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["slide"]["mpp_used"] == 0.25 and summary["slide"]["mpp_overridden"]
    assert summary["tiles"]["read_level"] == 1  # 0.25 µm/px at level 0 -> 0.5 at level 1
    assert summary["tiles"]["scored"] > 0


def _bad_inputs(fixtures_dir, data_dir, tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes((data_dir / "wsi/aperio_svs/CMU-1-Small-Region.svs").read_bytes()[:100_000])
    return {
        "missing": (tmp_path / "nope.svs", "not found|no such file|does not exist"),
        "text": (text, ""),
        "truncated": (truncated, ""),
        "unreadable_region": (fixtures_dir / "unreadable.svs", ""),
        "unopenable": (fixtures_dir / "unopenable.tiff", ""),
        "boxes_implausible_mpp": (fixtures_dir / "boxes.tiff", "--mpp"),
    }


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "unreadable_region", "unopenable",
                                  "boxes_implausible_mpp"])
def test_bad_input_one_line_error_no_output(case, cli_cmd, fixtures_dir, data_dir, tmp_path):
    import re

    path, pattern = _bad_inputs(fixtures_dir, data_dir, tmp_path)[case]
    out = tmp_path / "out"
    # A subprocess, so that a native crash (cuCIM segfaults on boxes.tiff) fails the test, not pytest.
    proc = run_cli(cli_cmd, "score", path, *TINY, "--out", out)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    line = error_line(proc)
    assert line.startswith("error: ") and path.name in line, line
    assert "Traceback" not in proc.stderr
    if pattern:
        assert re.search(pattern, line, re.I), line
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_existing_outputs_survive_a_failed_run(cli_cmd, cmu_small, fixtures_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli(cli_cmd, "score", cmu_small, *TINY, "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "CMU-1-Small-Region.svs"  # same output name, broken content
    bad.write_bytes(b"garbage")
    assert run_cli(cli_cmd, "score", bad, *TINY, "--out", out).returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_zero_tissue_is_a_valid_result(cli_cmd, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    white = np.full((1024, 1024, 3), 243, np.uint8)
    slide = tmp_path / "blank.tiff"
    # 0.5 µm/px = 20000 px/cm in the TIFF resolution tags
    tifffile.imwrite(slide, white, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    proc = run_cli(cli_cmd, "score", slide, *TINY, "--out", tmp_path / "out", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "no_tissue" and summary["scores"] == "no tissue"
    assert summary["tiles"]["scored"] == 0
    assert pq.read_table(tmp_path / "out" / "blank.tiles.parquet").num_rows == 0


def test_info_reports_reader_and_metadata(cli_cmd, cmu_small, ndpi):
    proc = run_cli(cli_cmd, "info", cmu_small, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["reader"] == "cucim" and info["vendor"] == "aperio" and info["level_tile_sizes"][0] == [240, 240]
    assert info["compression"] and "jpeg" in info["compression"].lower()
    proc = run_cli(cli_cmd, "info", ndpi)
    assert proc.returncode == 0, proc.stderr
    assert "openslide" in proc.stdout and "hamamatsu" in proc.stdout


def test_doctor_runs(cli_cmd):
    proc = run_cli(cli_cmd, "doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "test_tiny_patch14_reg4" in report["presets"]
    assert report["native_kernels"]


@pytest.mark.skipif(shutil.which("jwth-engine") is None, reason="console script not installed (source checkout)")
def test_console_script_entry_point():
    proc = subprocess.run(["jwth-engine", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "score" in proc.stdout

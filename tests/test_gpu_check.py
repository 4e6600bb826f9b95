"""benchmarks/gpu_check.sh --dry-run runs every step of the GPU check on this CPU machine, so the
script (and every flag it passes to the benchmarks) cannot rot between the rare GPU sessions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
GPU_STEPS = ["build", "tests", "heads", "preprocess", "pipeline", "backbones", "decode", "rawdecode"]
BENCH_SCRIPTS = {"heads": "bench_heads.py", "preprocess": "bench_preprocess.py", "pipeline": "bench_pipeline.py",
                 "backbones": "bench_backbones.py", "decode": "bench_cucim_decode.py", "rawdecode": "bench_decode.py"}


def _env(data_dir: Path) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, JWTH_TEST_DATA=str(data_dir))
    env.pop("JWTH_REQUIRE_GPU", None)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO, env=_env(data_dir), timeout=1800)
    return proc, out


def test_dry_run_passes_and_reports_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["passed"] is True
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert list(status) == ["env", "wheels", *GPU_STEPS[:1], "doctor", *GPU_STEPS[1:]]
    for name in GPU_STEPS:
        assert status[name] == "skipped (dry run; checked)", (name, status[name])
    assert status["env"] == "ok" and status["doctor"] == "ok"
    assert json.loads((out / "doctor.json").read_text())        # the doctor step really ran
    assert report["provenance"]["git"]["commit"], report["provenance"]


def test_dry_run_checks_each_benchmarks_arguments(dry_run):
    _, out = dry_run
    for step, script in BENCH_SCRIPTS.items():
        log = (out / f"{step}.log").read_text()
        assert f"dry run: {script} " in log, (step, log[-2000:])
        assert "_cuda.json" in log, (step, log[-2000:])    # the real run's arguments, parsed


def test_dry_run_collects_the_gpu_tests(dry_run):
    _, out = dry_run
    log = (out / "tests.log").read_text()
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", log)
    assert match and int(match.group(1)) >= 20, log[-2000:]
    for name in ("test_cuda_matches_reference", "test_streaming_gpu_matches_sequential", "test_torch_gpu_precisions"):
        assert name in log, name


def test_unknown_argument_is_one_clear_line(data_dir):
    proc = subprocess.run(["bash", str(SCRIPT), "--gpus", "2"], capture_output=True, text=True, cwd=REPO,
                          env=_env(data_dir), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_check.sh: unknown argument --gpus (see --help)"


def _carried_wheels() -> dict[str, str]:
    """name -> version of the wheels benchmarks/gpu_wheels.txt has `download` fetch (comments skipped)."""
    wheels = {}
    for line in (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, version = spec.split("==")
            wheels[name.lower()] = version
    return wheels


@pytest.mark.parametrize("library", ["libnvjpeg.so", "libnvjpeg2k.so"])
def test_carried_wheels_hold_nvimagecodecs_gpu_codecs(library):
    """nvImageCodec's GPU JPEG / JPEG 2000 extensions dlopen these from beside its own folder
    (RUNPATH $ORIGIN/../../cu13/lib, ../../nvjpeg2k/lib); the GPU image has neither, so the wheels
    that installed them here must be carried, at the version tested here."""
    from importlib import metadata

    providers = {dist.metadata["Name"].lower(): dist.version for dist in metadata.distributions()
                 if any(Path(str(f)).name.startswith(library) and "nvidia" in str(f) for f in dist.files or ())}
    assert providers, f"no installed distribution ships {library} (install jwth-engine[cu13])"
    carried = _carried_wheels()
    assert any(carried.get(name) == version for name, version in providers.items()), (library, providers, carried)


def test_gpu_decode_goal_is_judged_on_the_tissue_tiles():
    """The GPU goal reads the decoder-alone figures of the stored tiles the tissue grid needs, not
    those of every stored tile (background decodes faster and would flatter it)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_decode import gpu_goal

    def result(tissue: float, every: float, cores: float = 1.0, compression: str = "JPEG") -> dict:
        figures = lambda rate: {"stored_tiles_per_s": {"median": rate}, "cpu_cores_busy": {"median": cores}}
        return {"slide": "/x/a.svs", "compression": compression,
                "gpu": {"stored_tiles": {"stored_tile": [240, 240], "tissue": figures(tissue), "all": figures(every)}}}

    assert gpu_goal([result(9_000, 30_000)])["met"] is False
    assert gpu_goal([result(12_000, 30_000)])["met"] is True
    assert gpu_goal([result(12_000, 30_000, cores=2.5)])["met"] is False
    assert gpu_goal([result(12_000, 30_000, compression="JPEG 2000")])["met"] is None
    assert gpu_goal([{"slide": "/x/a.svs", "compression": "JPEG", "gpu": {"skipped": "no CUDA GPU"}}])["met"] is None

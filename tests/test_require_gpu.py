"""JWTH_REQUIRE_GPU=1 turns skips for a missing GPU dependency into failures, and only those."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest
from _gpu import gpu_skip

@pytest.fixture
def gpu():
    gpu_skip("no CUDA GPU (fixture)")

def test_gpu_in_body():
    gpu_skip("no CUDA GPU (body)")

def test_gpu_in_fixture(gpu):
    pass

def test_other_skip():
    pytest.skip("ray is not installed")

def test_passes():
    assert True
'''


def run_sample(tmp_path: Path, require: str | None) -> tuple[int, str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "JWTH_REQUIRE_GPU"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    if require is not None:
        env["JWTH_REQUIRE_GPU"] = require
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "_gpu",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def counts(output: str) -> dict[str, int]:
    last = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)][-1]
    return {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}


def test_gpu_skips_stay_skips_by_default(tmp_path):
    code, out = run_sample(tmp_path, None)
    assert code == 0, out
    assert counts(out) == {"passed": 1, "skipped": 3}, out


@pytest.mark.parametrize("value", ["1", "yes"])
def test_required_gpu_turns_gpu_skips_into_failures(tmp_path, value):
    code, out = run_sample(tmp_path, value)
    assert code == 1, out
    c = counts(out)
    # the body's skip fails; the fixture's skip is an error at setup; other skips stay skips
    assert c.get("failed") == 1 and c.get("error") == 1 and c.get("skipped") == 1 and c.get("passed") == 1, out
    assert "JWTH_REQUIRE_GPU=1, but this test would skip: no CUDA GPU (body)" in out


def test_other_values_do_not_require(tmp_path):
    code, out = run_sample(tmp_path, "0")
    assert code == 0 and counts(out) == {"passed": 1, "skipped": 3}, out

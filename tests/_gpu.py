"""GPU test coverage that cannot pass by skipping.

Tests skip with `gpu_skip(reason)` (not `pytest.skip`) when what is missing is a GPU or a GPU
library (CUDA kernels in `_C`, a CUDA device, onnxruntime-gpu, TensorRT, nvcc). On a CPU machine
that is an ordinary skip. With `JWTH_REQUIRE_GPU=1` (what `benchmarks/gpu_check.sh` sets on a GPU
machine) the hook below turns each such skip into a failure, so a GPU run that silently tested
nothing on the GPU fails. Other skips (Ray not installed, a console script absent) stay skips.

conftest.py imports the hook; `python -m pytest -p _gpu` loads it alone (tests/test_require_gpu.py).
"""

from __future__ import annotations

import os

import pytest

ENV = "JWTH_REQUIRE_GPU"


class MissingGpuDependency(pytest.skip.Exception):
    """A skip for lack of a GPU or a GPU library."""


def gpu_skip(reason: str):
    raise MissingGpuDependency(msg=reason)


def gpu_required() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(MissingGpuDependency) and gpu_required():
        report.outcome = "failed"
        report.longrepr = f"{ENV}=1, but this test would skip: {call.excinfo.value.msg}"

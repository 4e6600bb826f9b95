"""Which CUDA GPUs this machine has, asked of a short-lived child process so that the driver never
initialises CUDA (or imports torch) itself."""

from __future__ import annotations

import os
import subprocess
import sys

from .process import worker_env

_PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


def visible_gpus() -> list[int]:
    """CUDA ordinals 0..N-1 of the GPUs this process may use (after CUDA_VISIBLE_DEVICES)."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                             env=worker_env(), check=True).stdout
        count = int(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return []
    return list(range(count))


def device_for(ordinal: int) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a worker exactly GPU `ordinal` of this process."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        if ordinal >= len(visible):
            from ..errors import ConfigError

            raise ConfigError(f"gpus: GPU {ordinal} is not among CUDA_VISIBLE_DEVICES={','.join(visible)}",
                              field="gpus")
        return visible[ordinal]
    return str(ordinal)

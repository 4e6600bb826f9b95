"""`jwth-engine doctor`: what this machine can run, and why not when it cannot."""

from __future__ import annotations

import importlib
import json
import platform

import click


def _probe(module: str, attr: str = "__version__") -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return False, f"not installed ({exc.name or exc})"
    except OSError as exc:  # a wheel whose native library cannot be loaded
        return False, f"installed but cannot load: {exc}"
    return True, str(getattr(mod, attr, "installed"))


def collect() -> dict:
    report: dict = {"python": platform.python_version(), "machine": platform.machine()}
    ok, version = _probe("torch")
    report["torch"] = version
    if ok:
        import torch

        report["cuda_available"] = torch.cuda.is_available()
        report["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            report["gpus"] = [
                f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                for i in range(torch.cuda.device_count())
            ]
    for name, module in (("cucim", "cucim"), ("openslide", "openslide"), ("timm", "timm"), ("ray", "ray")):
        report[name] = _probe(module)[1]
    from ..slide.nvimgcodec_decoder import describe_decoders

    report.update(describe_decoders())   # --decode gpu / cpu: available, or why not
    from ..backends import cpu_has_native_bf16
    from ..backends.onnxruntime_backend import onnxruntime_status
    from ..backends.tensorrt_backend import tensorrt_status

    # The backends' own probes, so doctor says exactly what `--backend` would say.
    report["onnxruntime"] = onnxruntime_status()[1]
    report["tensorrt"] = tensorrt_status()[1]
    try:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    report["cpu_native_bf16"] = cpu_has_native_bf16()
    from .. import _native

    report["native_kernels"] = _native.describe()
    from ..models import list_presets

    report["presets"] = list_presets()
    return report


@click.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Report the runtime: GPU, CUDA, cuCIM, OpenSlide, backends and native kernels."""
    report = collect()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:22s} {', '.join(map(str, value)) if isinstance(value, list) else value}")

"""Backend selection and the torch / ONNX Runtime backends against the PyTorch fp32 reference.

GPU variants run only where torch sees a CUDA device (decided at run time, skipped with the reason
otherwise); everything else runs here on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from jwth_engine.backends import NUMERICS, choose_backend, choose_precision, select_backend, token_rel_error
from jwth_engine.backends import select as select_module
from jwth_engine.errors import BackendUnavailable, ConfigError
from jwth_engine.heads.reference import JwthPoolingHead

from _backbones import lively_backbone
from _gpu import gpu_skip

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
NO_TRT = (False, "not installed (tensorrt): pip install 'jwth-engine[tensorrt]'")
TRT = (True, "10.13.0")
ORT = (True, "1.32.0")


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def reference(backbone, x):
    with torch.inference_mode():
        return backbone.module(x)


def head_probs(tokens: torch.Tensor, dim: int = 96) -> torch.Tensor:
    torch.manual_seed(0)
    head = JwthPoolingHead(dim, 2, 4, 5).eval()
    with torch.inference_mode():
        return torch.softmax(head(tokens.float().cpu()).logits.float() * 20, dim=-1)  # sharpened: harder test


# --- selection logic (pure) -------------------------------------------------------------------

def test_auto_prefers_tensorrt_only_with_a_gpu():
    assert choose_backend("auto", CUDA, tensorrt=TRT, onnxruntime=ORT)[0] == "tensorrt"
    name, reason = choose_backend("auto", CUDA, tensorrt=NO_TRT, onnxruntime=ORT)
    assert name == "torch" and "tensorrt is not installed" in reason
    name, reason = choose_backend("auto", CPU, tensorrt=TRT, onnxruntime=ORT)
    assert name == "torch" and "needs one" in reason


def test_unavailable_backends_say_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"^backend tensorrt: tensorrt is not installed.*pip install"):
        choose_backend("tensorrt", CUDA, tensorrt=NO_TRT, onnxruntime=ORT)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        choose_backend("tensorrt", CPU, tensorrt=TRT, onnxruntime=ORT)
    with pytest.raises(BackendUnavailable, match="onnxruntime is not installed.*pip install onnxruntime"):
        choose_backend("onnxruntime", CPU, tensorrt=NO_TRT,
                       onnxruntime=(False, "not installed (onnxruntime): pip install onnxruntime"))
    with pytest.raises(ConfigError, match="^backend 'jax'"):
        choose_backend("jax", CPU, tensorrt=NO_TRT, onnxruntime=ORT)


def test_precision_rules():
    assert choose_precision("torch", CPU, "auto", cpu_bf16=True)[0] == "bf16"
    precision, reason = choose_precision("torch", CPU, "auto", cpu_bf16=False)
    assert precision == "fp32" and "no native bf16" in reason
    assert choose_precision("torch", CUDA, "auto")[0] == "bf16"
    assert choose_precision("tensorrt", CUDA, "auto")[0] == "bf16"
    assert choose_precision("onnxruntime", CPU, "auto")[0] == "fp32"
    assert choose_precision("torch", CPU, "fp32", cpu_bf16=True)[0] == "fp32"
    for backend, device, precision, match in [("torch", CUDA, "fp8", "TensorRT only"),
                                              ("onnxruntime", CPU, "bf16", "fp32 only"),
                                              ("torch", CPU, "fp16", "on the CPU"),
                                              ("torch", CPU, "int4", "expected auto")]:
        with pytest.raises(ConfigError, match=match):
            choose_precision(backend, device, precision)


def test_select_on_this_machine_logs_the_choice(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only selection test; this machine has a GPU")
    monkeypatch.setattr(select_module, "cpu_has_native_bf16", lambda: True)
    messages = []
    backend = select_backend(lively_backbone(), log=messages.append)
    assert (backend.name, backend.precision, backend.device.type) == ("torch", "bf16", "cpu")
    assert len(messages) == 1 and "torch bf16 on cpu" in messages[0] and "no CUDA" in messages[0]
    info = backend.describe()
    assert info["reason"] in messages[0] and info["name"] == "torch" and not info["compiled"]
    json.dumps(info)  # goes into the slide summary
    with pytest.raises(BackendUnavailable, match="^device cuda: torch sees no CUDA GPU"):
        select_backend(lively_backbone(), device="cuda", log=messages.append)
    with pytest.raises(BackendUnavailable, match="^backend tensorrt"):
        select_backend(lively_backbone(), backend="tensorrt", log=messages.append)


def test_forced_fp32_and_tensorrt_missing(monkeypatch):
    monkeypatch.setattr(select_module, "cpu_has_native_bf16", lambda: True)
    backend = select_backend(lively_backbone(), device="cpu", precision="fp32", log=lambda m: None)
    assert backend.precision == "fp32" and backend.input_dtype == torch.float32


# --- torch backend ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["test_tiny_patch14_reg4", "test_tiny_patch16_rope"])
def test_torch_backend_precisions_against_reference(preset):
    backbone = lively_backbone(preset)
    x = images(3)
    ref = reference(backbone, x)
    fp32 = select_backend(backbone, backend="torch", device="cpu", precision="fp32", log=lambda m: None)
    with torch.inference_mode():
        assert torch.equal(fp32(x), ref)
    bf16 = select_backend(backbone, backend="torch", device="cpu", precision="bf16", log=lambda m: None)
    with torch.inference_mode():
        out = bf16(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = token_rel_error(out, ref)
    assert 1e-5 < err < NUMERICS["bf16"][0]                      # really bf16, within the contract
    prob_diff = float((head_probs(out) - head_probs(ref)).abs().max())
    assert prob_diff < NUMERICS["bf16"][1]
    # The bf16 backend works on its own copy: the reference module is untouched.
    assert torch.equal(reference(backbone, x), ref)
    assert next(backbone.module.parameters()).dtype == torch.float32


def test_torch_backend_batch_one_and_input_checks():
    backbone = lively_backbone()
    backend = select_backend(backbone, backend="torch", device="cpu", precision="fp32", log=lambda m: None)
    with torch.inference_mode():
        assert backend(images(1)).shape == (1, 261, 96)
        with pytest.raises(ConfigError, match="takes 224x224 tiles, got 256x256"):
            backend(torch.zeros(2, 3, 256, 256))
        with pytest.raises(TypeError, match="dtype"):
            backend(images(2).half())


# --- onnxruntime backend ------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["test_tiny_patch14_reg4", "test_tiny_patch16_rope"])
def test_onnxruntime_backend_matches_reference_and_caches(preset, tmp_path):
    backbone = lively_backbone(preset)
    messages: list[str] = []
    backend = select_backend(backbone, backend="onnxruntime", device="cpu", cache_dir=str(tmp_path),
                             log=messages.append)
    assert backend.precision == "fp32" and "CPUExecutionProvider" in backend.describe()["providers"]
    for batch in (1, 4):
        x = images(batch, seed=batch)
        with torch.inference_mode():
            out = backend(x)
        assert token_rel_error(out, reference(backbone, x)) < NUMERICS["fp32"][0]
        assert float((head_probs(out) - head_probs(reference(backbone, x))).abs().max()) < NUMERICS["fp32"][1]
    assert sum("exporting" in m for m in messages) == 1
    again = select_backend(backbone, backend="onnxruntime", device="cpu", cache_dir=str(tmp_path), log=messages.append)
    assert again.onnx_path == backend.onnx_path and sum("exporting" in m for m in messages) == 1
    json.dumps(again.describe())


def test_onnxruntime_backend_rejects_low_precision(tmp_path):
    with pytest.raises(ConfigError, match="fp32 only"):
        select_backend(lively_backbone(), backend="onnxruntime", device="cpu", precision="bf16",
                       cache_dir=str(tmp_path), log=lambda m: None)


# --- GPU (run time decision) --------------------------------------------------------------------

@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        gpu_skip("no CUDA GPU visible to torch")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_torch_gpu_precisions(cuda_device, precision):
    backbone = lively_backbone("test_tiny_patch16_rope")
    x = images(5)
    ref = reference(backbone, x)
    eager = select_backend(backbone, backend="torch", device="cuda", precision=precision, compile=False,
                           log=lambda m: None)
    with torch.inference_mode():
        out = eager(x.to(cuda_device))
    assert token_rel_error(out, ref) < NUMERICS[precision][0]
    compiled = select_backend(backbone, backend="torch", device="cuda", precision=precision, compile=True,
                              max_batch=8, log=lambda m: None)
    with torch.inference_mode():
        for batch in (8, 5, 8):   # padded partial batch and CUDA-graph replay after it
            xb = images(batch, seed=batch).to(cuda_device)
            assert token_rel_error(compiled(xb), reference(backbone, xb.cpu())) < NUMERICS[precision][0]


def test_onnxruntime_cuda_io_binding(cuda_device, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        gpu_skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    backbone = lively_backbone()
    backend = select_backend(backbone, backend="onnxruntime", device="cuda", cache_dir=str(tmp_path),
                             log=lambda m: None)
    x = images(3)
    with torch.inference_mode():
        out = backend(x.to(cuda_device))
    assert out.device.type == "cuda" and token_rel_error(out, reference(backbone, x)) < 1e-3  # TF32 convs

"""TensorRT: everything upstream of TensorRT runs here (cache keys, build profile shapes, FP8
calibration input, the missing-library errors); engine build and runtime tests run only where
`tensorrt` imports and a CUDA GPU is present, and skip with that reason otherwise (decided at run
time)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jwth_engine.backends import NUMERICS, select_backend, token_rel_error
from jwth_engine.backends import tensorrt_backend as trt_backend
from jwth_engine.cli.export import build_engine as build_engine_command
from jwth_engine.errors import BackendUnavailable, ConfigError

from _backbones import lively_backbone
from _gpu import gpu_skip


KEY_ARGS = dict(precision="bf16", max_batch=64, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                tensorrt_version="10.13.0")


def test_engine_key_changes_with_every_component():
    backbone, profile = lively_backbone(), trt_backend.load_build_profile()
    base = trt_backend.engine_key(backbone, profile=profile, **KEY_ARGS)
    assert trt_backend.engine_key(backbone, profile=profile, **KEY_ARGS) == base
    variants = [dict(precision="fp16"), dict(max_batch=32), dict(gpu_name="NVIDIA L40S"),
                dict(compute_capability="8.9"), dict(tensorrt_version="11.4.0")]
    stems = {base.stem()}
    for change in variants:
        stems.add(trt_backend.engine_key(backbone, profile=profile, **{**KEY_ARGS, **change}).stem())
    other_profile = dataclasses.replace(profile, digest="0" * 16)
    stems.add(trt_backend.engine_key(backbone, profile=other_profile, **KEY_ARGS).stem())
    backbone.weights_hash = "f" * 64                        # other weights
    stems.add(trt_backend.engine_key(backbone, profile=profile, **KEY_ARGS).stem())
    stems.add(trt_backend.engine_key(lively_backbone("test_tiny_patch16_rope"), profile=profile, **KEY_ARGS).stem())
    assert len(stems) == len(variants) + 4
    assert base.stem().startswith("test-tiny-patch14-reg4-bf16-b64-sm90-")


def test_build_profile_shapes():
    profile = trt_backend.load_build_profile()
    assert profile.opt_batch == "max" and not profile.tf32
    assert profile.shapes(224, 32) == ((1, 3, 224, 224), (32, 3, 224, 224), (32, 3, 224, 224))
    fixed = dataclasses.replace(profile, opt_batch=16)
    assert fixed.shapes(224, 8)[1] == (8, 3, 224, 224) and fixed.shapes(224, 64)[1] == (16, 3, 224, 224)
    with pytest.raises(ConfigError, match="below the build profile's min batch"):
        dataclasses.replace(profile, min_batch=4).shapes(224, 2)


def test_calibration_input(tmp_path):
    backbone = lively_backbone()
    tiles = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    np.save(tmp_path / "tiles.npy", tiles)
    data = trt_backend.load_calibration(tmp_path / "tiles.npy", backbone, min_tiles=64)
    assert data.shape == (64, 3, 224, 224) and data.dtype == np.float32
    expected = (tiles[3, 10, 20, 1] / 255.0 - backbone.preset.mean[1]) / backbone.preset.std[1]
    assert data[3, 1, 10, 20] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="at least 128"):
        trt_backend.load_calibration(tmp_path / "tiles.npy", backbone, min_tiles=128)
    np.save(tmp_path / "wrong.npy", tiles[:, :100])
    with pytest.raises(ConfigError, match=r"uint8 \[N, 224, 224, 3\]"):
        trt_backend.load_calibration(tmp_path / "wrong.npy", backbone, min_tiles=1)


def test_missing_tensorrt_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)       # import tensorrt -> ImportError
    ok, detail = trt_backend.tensorrt_status()
    assert not ok and "pip install 'jwth-engine[tensorrt]'" in detail
    with pytest.raises(BackendUnavailable, match=r"^backend tensorrt: tensorrt is not installed.*pip install"):
        select_backend(lively_backbone(), backend="tensorrt", log=lambda m: None)
    with pytest.raises(BackendUnavailable, match="build-engine: tensorrt is not installed"):
        trt_backend.build_engine(lively_backbone(), precision="fp16", max_batch=4)
    result = CliRunner().invoke(build_engine_command, ["--model", "test_tiny_patch14_reg4", "--precision", "fp16"])
    assert isinstance(result.exception, BackendUnavailable) and "pip install" in str(result.exception)


def test_fp8_without_modelopt_is_explained(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)
    with pytest.raises(BackendUnavailable, match="ModelOpt.*nvidia-modelopt"):
        trt_backend.quantize_fp8(tmp_path / "in.onnx", tmp_path / "out.onnx", np.zeros((1, 3, 4, 4), np.float32),
                                 trt_backend.load_build_profile())


# --- with TensorRT and a GPU ----------------------------------------------------------------------

@pytest.fixture
def trt_gpu():
    ok, detail = trt_backend.tensorrt_status()
    if not ok:
        gpu_skip(f"tensorrt not usable here: {detail}")
    if not torch.cuda.is_available():
        gpu_skip("TensorRT tests need a CUDA GPU; torch sees none")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("preset", ["test_tiny_patch14_reg4", "test_tiny_patch16_rope"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_build_and_runtime(trt_gpu, tmp_path, preset, precision):
    backbone = lively_backbone(preset)
    messages: list[str] = []
    backend = select_backend(backbone, backend="tensorrt", device="cuda", precision=precision, max_batch=4,
                             cache_dir=str(tmp_path), log=messages.append)
    assert any("building TensorRT engine" in m for m in messages)
    for batch in (4, 1, 3, 4):   # graph per batch size, replays, and the partial batch
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            out = backend(x.to(trt_gpu))
            ref = backbone.module(x)
        assert out.device.type == "cuda" and out.shape == ref.shape
        assert token_rel_error(out, ref) < NUMERICS[precision][0]
    info = backend.describe()
    assert info["name"] == "tensorrt" and info["engine"].endswith(".engine")
    # Reused, not rebuilt.
    messages.clear()
    again = select_backend(backbone, backend="tensorrt", device="cuda", precision=precision, max_batch=4,
                           cache_dir=str(tmp_path), log=messages.append)
    assert again.engine_path == backend.engine_path and not any("building" in m for m in messages)


def test_cuda_graph_and_plain_enqueue_agree(trt_gpu, tmp_path):
    backbone = lively_backbone()
    graphs = select_backend(backbone, backend="tensorrt", device="cuda", precision="fp32", max_batch=4,
                            cache_dir=str(tmp_path), log=lambda m: None)
    plain = select_backend(backbone, backend="tensorrt", device="cuda", precision="fp32", max_batch=4,
                           compile=False, cache_dir=str(tmp_path), log=lambda m: None)
    assert not plain.cuda_graphs
    x = torch.randn(3, 3, 224, 224, device=trt_gpu)
    with torch.inference_mode():
        torch.testing.assert_close(graphs(x), plain(x))
        torch.testing.assert_close(graphs(x * 2), plain(x * 2))   # replay sees new inputs

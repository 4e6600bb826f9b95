"""ONNX export: dynamic batch, the full token sequence, parity with PyTorch on ONNX Runtime for the
DINOv2-style and DINOv3-style (RoPE) tiny presets, the fp16/bf16 mixed-precision recipes, the
export cache and the `export-onnx` command."""

from __future__ import annotations

import collections
import json

import onnx
import pytest
from click.testing import CliRunner

from jwth_engine.backends import NUMERICS
from jwth_engine.backends import onnx_export as ox
from jwth_engine.cli.export import export_onnx as export_onnx_command
from jwth_engine.errors import BackendUnavailable

from _backbones import lively_backbone

TINY = ["test_tiny_patch14_reg4", "test_tiny_patch16_rope"]


@pytest.fixture(scope="module", params=TINY)
def exported(request, tmp_path_factory):
    backbone = lively_backbone(request.param)
    path = ox.export_onnx(backbone, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return backbone, path


def elem_types(path) -> collections.Counter:
    graph = onnx.load(str(path)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    return collections.Counter((n.op_type, onnx.TensorProto.DataType.Name(types.get(n.input[0], 0)))
                               for n in graph.node if n.op_type in ("MatMul", "Conv", "LayerNormalization"))


def test_graph_io_is_the_token_sequence_with_dynamic_batch(exported):
    backbone, path = exported
    graph = onnx.load(str(path)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("images", "tokens")
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 224, 224]
    assert out_dims[0] == in_dims[0] and out_dims[1:] == [backbone.num_tokens, backbone.embed_dim]
    assert not (path.parent / (path.name + ".data")).exists()   # small graphs are one file


def test_parity_with_pytorch_at_other_batch_sizes(exported):
    backbone, path = exported
    # Traced at batch 2; run at 1 and 3 (and 5) to prove the batch dimension is really dynamic.
    check = ox.verify_onnx(backbone, path, batch_sizes=(1, 3, 5))
    assert check["token_rel_error"] < NUMERICS["fp32"][0] == 1e-4
    assert check["max_abs_error"] < 1e-3


def test_export_leaves_the_backbone_untouched(exported):
    backbone, _ = exported
    assert type(backbone.module.model.patch_embed.proj).__name__ == "Conv2d"


@pytest.mark.parametrize("preset", TINY)
def test_fp16_recipe_graph(preset, tmp_path):
    backbone = lively_backbone(preset)
    path = ox.export_onnx(backbone, tmp_path / "fp16.onnx", precision="fp16")
    types = elem_types(path)
    assert types[("Conv", "FLOAT")] == 1 and types[("MatMul", "FLOAT16")] >= 8
    assert types[("LayerNormalization", "FLOAT")] == 5 and ("LayerNormalization", "FLOAT16") not in types
    check = ox.verify_onnx(backbone, path)
    # Really lower precision (not a silent fp32 graph), and within the fp16 contract.
    assert 1e-5 < check["token_rel_error"] < NUMERICS["fp16"][0]


def test_bf16_recipe_graph_is_valid_onnx(tmp_path):
    backbone = lively_backbone("test_tiny_patch16_rope")
    path = ox.export_onnx(backbone, tmp_path / "bf16.onnx", precision="bf16")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    types = elem_types(path)
    assert types[("MatMul", "BFLOAT16")] >= 8 and types[("Conv", "FLOAT")] == 1
    with pytest.raises(BackendUnavailable, match="CPU provider cannot run"):
        ox.verify_onnx(backbone, path)


def test_export_cache_reuses_and_keys(tmp_path, monkeypatch):
    backbone = lively_backbone("test_tiny_patch14_reg4")
    messages = []
    first = ox.cached_onnx(backbone, cache_dir=tmp_path, log=messages.append)
    assert first.is_file() and len(messages) == 1
    manifest = json.loads(first.with_suffix(".onnx.json").read_text())
    assert manifest["components"]["weights_hash"] == backbone.weights_hash

    def no_export(*args, **kwargs):
        raise AssertionError("re-exported a cached graph")

    monkeypatch.setattr(ox, "export_onnx", no_export)
    assert ox.cached_onnx(backbone, cache_dir=tmp_path, log=messages.append) == first
    base = ox.onnx_key(backbone)
    assert ox.onnx_key(backbone, precision="bf16").stem() != base.stem()
    assert ox.onnx_key(backbone, opset=19).stem() != base.stem()
    backbone.weights_hash = "0" * 64
    assert ox.onnx_key(backbone).stem() != base.stem()


def test_export_onnx_command(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match="NOT meaningful"):   # no --weights: random init, said loudly
        result = CliRunner().invoke(export_onnx_command, ["--model", "test_tiny_patch16_rope", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == ["batch", 201, 96] and report["num_prefix_tokens"] == 5
    assert report["verification"]["token_rel_error"] < 1e-4 and out.is_file()

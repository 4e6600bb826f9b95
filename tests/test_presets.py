"""Backbone presets: the shipped JSON files validate, build the timm model they describe (real
ViT-L/g presets on the meta device: structure and token layout without allocating weights), and
bad presets fail with one-line ModelErrors."""

from __future__ import annotations

import json

import pytest
import torch

from jwth_engine.errors import ModelError
from jwth_engine.models import build_model, check_model_matches_preset, get_preset, list_presets, preset_from_dict
from jwth_engine.models.presets import LAYER_WHITELIST

REQUIRED_PRESETS = ["jwth_vitl14_reg4", "jwth_vitl16_rope", "jwth_vits14_reg4", "jwth_vits16_rope",
                    "test_tiny_patch14_reg4", "test_tiny_patch16_rope"]


def tiny_dict(**changes) -> dict:
    data = get_preset("test_tiny_patch14_reg4").to_dict()
    data.update(changes)
    return data


def test_required_presets_are_shipped():
    assert set(REQUIRED_PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_shipped_preset_builds_what_it_declares(name):
    preset = get_preset(name)
    assert preset.name == name and preset.source and preset.family in ("dinov2", "dinov3", "vit")
    assert preset.num_tokens == preset.num_prefix_tokens + (preset.input_size // preset.patch_size) ** 2
    model = build_model(preset, device="meta")   # raises ModelError on any layout mismatch
    assert model.num_prefix_tokens == preset.num_prefix_tokens
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("name, arch, dim, tokens", [
    ("jwth_vitl14_reg4", "vit_large_patch14_reg4_dinov2", 1024, 5 + 256),
    ("jwth_vitl16_rope", "vit_large_patch16_dinov3", 1024, 5 + 196),
    ("jwth_vits14_reg4", "vit_small_patch14_reg4_dinov2", 384, 5 + 256),
    ("jwth_vits16_rope", "vit_small_patch16_dinov3", 384, 5 + 196),
])
def test_jwth_presets_layout(name, arch, dim, tokens):
    preset = get_preset(name)
    assert (preset.timm_arch, preset.embed_dim, preset.num_tokens) == (arch, dim, tokens)
    assert preset.num_register_tokens == 4 and preset.native_mpp == 0.5


def test_dinov3_arch_has_four_storage_tokens_and_rope():
    model = build_model("jwth_vitl16_rope", device="meta")
    assert model.reg_token.shape[1] == 4            # DINOv3's storage tokens, as timm names them
    assert model.rope is not None and model.pos_embed is None


def test_dinov2_shapes_on_meta_forward():
    model = build_model("jwth_vitl14_reg4", device="meta")
    tokens = model.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert list(tokens.shape) == [2, 261, 1024]


def test_layer_names_resolve_through_the_whitelist():
    from timm.layers import SwiGLUPacked

    kwargs = get_preset("uni2h_vith14_reg8").resolved_timm_kwargs()
    assert kwargs["mlp_layer"] is SwiGLUPacked and kwargs["act_layer"] is torch.nn.SiLU
    assert kwargs["img_size"] == 224 and kwargs["num_classes"] == 0


@pytest.mark.parametrize("changes, match", [
    (dict(family="dinov4"), "family"),
    (dict(mean=[0.5, 0.5]), "mean"),
    (dict(std=[0.2, 0.0, 0.2]), "std values"),
    (dict(input_size=225), "multiple of patch_size"),
    (dict(num_register_tokens=5), "num_register_tokens"),
    (dict(name="Tiny Model"), "family_size_patchN_tag"),
    (dict(timm_kwargs={"mlp_layer": "os.system"}), "not an allowed layer"),
    (dict(timm_kwargs={"pretrained": True}), "may not set pretrained"),
    (dict(timm_kwargs={"embed_dim": 128}), "embed_dim"),
    (dict(native_mpp=0.0), "native_mpp"),
    (dict(input_size="224"), "input_size must be int"),
    (dict(extra_field=1), "unknown field"),
])
def test_invalid_presets_are_model_errors(changes, match):
    with pytest.raises(ModelError, match=match):
        preset_from_dict(tiny_dict(**changes), "bad.json")


def test_missing_fields_are_listed_together():
    data = tiny_dict()
    del data["mean"], data["embed_dim"]
    with pytest.raises(ModelError, match="missing field.*mean, embed_dim|missing field.*embed_dim, mean"):
        preset_from_dict(data, "bad.json")


def test_preset_inconsistent_with_arch_fails_at_build():
    preset = preset_from_dict(tiny_dict(num_prefix_tokens=1, num_register_tokens=0), "wrong.json")
    with pytest.raises(ModelError, match=r"wrong.json: .*num_prefix_tokens 1 \(model has 5\)"):
        build_model(preset, device="meta")
    model = build_model("test_tiny_patch14_reg4", device="meta")
    with pytest.raises(ModelError, match="num_register_tokens 0 .model has 4."):
        check_model_matches_preset(model, preset)


def test_user_preset_file_and_unknown_names(tmp_path):
    path = tmp_path / "my_tiny_patch14_x.json"
    path.write_text(json.dumps(tiny_dict(name="my_tiny_patch14_x")))
    preset = get_preset(str(path))
    assert preset.name == "my_tiny_patch14_x" and preset.path == str(path)
    with pytest.raises(ModelError, match="unknown backbone preset 'nope'.*jwth_vitl14_reg4"):
        get_preset("nope")
    with pytest.raises(ModelError, match="not found"):
        get_preset(str(tmp_path / "absent.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        get_preset(str(tmp_path / "broken.json"))


def test_unknown_timm_arch_is_a_model_error():
    preset = preset_from_dict(tiny_dict(timm_arch="vit_nonexistent_patch14"), "x.json")
    with pytest.raises(ModelError, match="no architecture 'vit_nonexistent_patch14'"):
        build_model(preset, device="meta")


def test_digest_tracks_content():
    a = get_preset("test_tiny_patch14_reg4")
    b = preset_from_dict(tiny_dict(native_mpp=0.25), "other.json")
    assert a.digest() == preset_from_dict(tiny_dict(), "elsewhere.json").digest()
    assert a.digest() != b.digest()


def test_whitelist_names_import():
    import importlib

    for module, attr in LAYER_WHITELIST.values():
        assert hasattr(importlib.import_module(module), attr)

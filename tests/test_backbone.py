"""Backbone loading: seeded random init, strict checkpoint loading with one complete error line,
container/prefix unwrapping, and the foreign layouts each family filter maps (original DINOv2,
HF transformers Dinov2, original DINOv3), each checked by identical tokens after a round trip."""

from __future__ import annotations

import hashlib

import warnings

import pytest
import torch
from safetensors.torch import save_file

from jwth_engine.errors import ModelError
from jwth_engine.models import load_backbone

IMAGES = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(*args, **kwargs)


def lively(backbone, seed: int = 3):
    """Random init has LayerScale 1e-5 (blocks ~ identity); give every parameter visible weight so
    a wrong mapping of any block changes the tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.module.named_parameters():
            if name.endswith("gamma") or "gamma_" in name:
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return backbone


def tokens(backbone) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.module(IMAGES)


def timm_state(backbone) -> dict:
    return {k: v.clone() for k, v in backbone.module.model.state_dict().items()}


@pytest.mark.parametrize("preset, t", [("test_tiny_patch14_reg4", 261), ("test_tiny_patch16_rope", 201)])
def test_random_init_is_seeded_and_loud(preset, t):
    with pytest.warns(UserWarning, match="NOT meaningful"):
        a = load_backbone(preset, seed=7)
    b, c = quiet_load(preset, seed=7), quiet_load(preset, seed=8)
    assert a.random_init and a.weights_hash == "random-init-seed-7" and a.weights_source == "random init (seed 7)"
    assert (a.num_tokens, a.num_prefix_tokens, a.embed_dim, a.num_patch_tokens) == (t, 5, 96, t - 5)
    assert not a.module.training
    out = tokens(a)
    assert out.shape == (2, t, 96)
    assert torch.equal(out, tokens(b)) and not torch.equal(out, tokens(c))
    # Seeding is scoped: the caller's RNG stream is left as it was.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    quiet_load(preset, seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("preset", ["test_tiny_patch14_reg4", "test_tiny_patch16_rope"])
def test_safetensors_round_trip(preset, tmp_path):
    source = lively(quiet_load(preset, seed=1))
    path = tmp_path / "w.safetensors"
    save_file(timm_state(source), str(path))
    loaded = load_backbone(preset, str(path), seed=99)  # no warning: real weights
    assert not loaded.random_init and loaded.weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.weights_source == str(path)
    assert torch.equal(tokens(loaded), tokens(source))


def test_mismatches_are_reported_together(tmp_path):
    state = timm_state(quiet_load("test_tiny_patch14_reg4"))
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:200]
    del state["blocks.1.norm1.weight"]
    state["blocks.7.mlp.fc1.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError) as err:
        quiet_load("test_tiny_patch14_reg4", str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "1 missing key(s): blocks.1.norm1.weight" in message
    assert "1 unexpected key(s): blocks.7.mlp.fc1.weight" in message
    assert "blocks.0.attn.qkv.weight checkpoint [200, 96] vs model [288, 96]" in message


def test_long_key_lists_are_truncated(tmp_path):
    state = timm_state(quiet_load("test_tiny_patch14_reg4"))
    path = tmp_path / "half.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.")}, str(path))
    with pytest.raises(ModelError, match=r"missing key\(s\): .*\(\+\d+ more\)"):
        quiet_load("test_tiny_patch14_reg4", str(path))


def test_wrong_family_checkpoint_is_a_model_error(tmp_path):
    path = tmp_path / "v3.safetensors"
    save_file(timm_state(quiet_load("test_tiny_patch16_rope")), str(path))
    with pytest.raises(ModelError, match="does not fit preset test_tiny_patch14_reg4|cannot map checkpoint"):
        quiet_load("test_tiny_patch14_reg4", str(path))


def test_pt_containers_and_prefixes(tmp_path):
    source = lively(quiet_load("test_tiny_patch14_reg4", seed=2))
    state = timm_state(source)
    expected = tokens(source)
    cases = {
        "ddp.pt": {f"module.{k}": v for k, v in state.items()},
        "ckpt.pth": {"epoch": 3, "state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}},
        "dino.pth": {"teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                                 "dino_head.mlp.0.weight": torch.zeros(4, 96)}, "iteration": 10},
        "classifier.bin": {**state, "head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10)},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        loaded = quiet_load("test_tiny_patch14_reg4", str(tmp_path / name))
        assert torch.equal(tokens(loaded), expected), name
    assert any("dino_head" in note for note in quiet_load("test_tiny_patch14_reg4", str(tmp_path / "dino.pth")).notes)


class _NotATensor:
    pass


def test_pickles_beyond_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _NotATensor()}, path)
    with pytest.raises(ModelError, match="weights_only=True.*safetensors"):
        quiet_load("test_tiny_patch14_reg4", str(path))


def test_unsupported_or_missing_files(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported weights format .npz"):
        quiet_load("test_tiny_patch14_reg4", str(tmp_path / "w.npz"))
    with pytest.raises(ModelError, match="not found"):
        quiet_load("test_tiny_patch14_reg4", str(tmp_path / "absent.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        quiet_load("test_tiny_patch14_reg4", str(tmp_path / "junk.safetensors"))


def to_original_dinov2(state: dict, generator: torch.Generator) -> dict:
    """timm no_embed_class + registers -> facebookresearch/dinov2 layout (inverse of timm's filter)."""
    out = dict(state)
    pos = out.pop("pos_embed")
    cls_pos = 0.01 * torch.randn(1, 1, pos.shape[-1], generator=generator)
    out["pos_embed"] = torch.cat([cls_pos, pos], dim=1)        # original keeps a class position
    out["cls_token"] = out["cls_token"] - cls_pos              # timm folds it into the token
    out["register_tokens"] = out.pop("reg_token")
    out["mask_token"] = torch.zeros(1, pos.shape[-1])
    return out


def to_hf_dinov2(original: dict) -> dict:
    """facebookresearch/dinov2 -> HF transformers Dinov2WithRegistersModel names."""
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    out = {}
    for key, value in original.items():
        if key in top:
            out[top[key]] = value
            continue
        _, index, rest = key.split(".", 2)
        prefix = f"encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part
            continue
        rest = (rest.replace("attn.proj.", "attention.output.dense.").replace("ls1.gamma", "layer_scale1.lambda1")
                .replace("ls2.gamma", "layer_scale2.lambda1"))
        out[prefix + rest] = value
    return out


def test_original_and_hf_dinov2_layouts(tmp_path):
    source = lively(quiet_load("test_tiny_patch14_reg4", seed=4))
    expected = tokens(source)
    original = to_original_dinov2(timm_state(source), torch.Generator().manual_seed(0))
    save_file(original, str(tmp_path / "orig.safetensors"))
    loaded = quiet_load("test_tiny_patch14_reg4", str(tmp_path / "orig.safetensors"))
    torch.testing.assert_close(tokens(loaded), expected, rtol=1e-5, atol=1e-5)
    hf = {f"dinov2.{k}": v for k, v in to_hf_dinov2(original).items()}
    hf["classifier.weight"] = torch.zeros(2, 192)
    torch.save(hf, tmp_path / "hf.bin")
    loaded = quiet_load("test_tiny_patch14_reg4", str(tmp_path / "hf.bin"))
    torch.testing.assert_close(tokens(loaded), expected, rtol=1e-5, atol=1e-5)


def test_original_dinov2_at_518px_is_resampled(tmp_path):
    """DINOv2 ships 518-px (37x37) position embeddings; the 224-px preset resamples them."""
    source = quiet_load("test_tiny_patch14_reg4", seed=4)
    original = to_original_dinov2(timm_state(source), torch.Generator().manual_seed(0))
    original["pos_embed"] = torch.randn(1, 1 + 37 * 37, 96)
    save_file(original, str(tmp_path / "orig518.safetensors"))
    loaded = quiet_load("test_tiny_patch14_reg4", str(tmp_path / "orig518.safetensors"))
    assert loaded.module.model.pos_embed.shape == (1, 256, 96)


def test_original_dinov3_layout(tmp_path):
    source = lively(quiet_load("test_tiny_patch16_rope", seed=5))
    original = {}
    for key, value in timm_state(source).items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        original[key] = value
    original["mask_token"] = torch.zeros(1, 96)
    original["rope_embed.periods"] = torch.ones(8)
    save_file(original, str(tmp_path / "dinov3.safetensors"))
    loaded = quiet_load("test_tiny_patch16_rope", str(tmp_path / "dinov3.safetensors"))
    assert torch.equal(tokens(loaded), tokens(source))

"""Properties of the reference heads and of head files (the definitions the kernels are held to)."""

from __future__ import annotations


import pytest
import torch

from jwth_engine.errors import ModelError
from jwth_engine.heads import (HeadMeta, JwthPoolingHead, LinearProbeHead, check_head_matches_backbone,
                               load_head, random_head, save_head)


def _tokens(b, r, p, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + r + p, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("heads,r", [(1, 0), (4, 4), (8, 8)])
def test_attention_rows_sum_to_one(heads, r):
    head = JwthPoolingHead(64, 3, heads, 1 + r).double()
    out = head(_tokens(5, r, 49, 64), need_attn=True)
    assert out.attn.shape == (5, heads, 49)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(5, heads, dtype=torch.float64))
    assert (out.attn >= 0).all()


def test_identical_patch_tokens_give_uniform_attention_and_their_value():
    head = JwthPoolingHead(32, 2, 4, 5).double()
    tokens = _tokens(3, 4, 16, 32)
    tokens[:, 5:] = tokens[:, 5:6]  # every patch token equal
    out = head(tokens, need_attn=True)
    torch.testing.assert_close(out.attn, torch.full_like(out.attn, 1 / 16))
    # With uniform attention over identical tokens the pooled vector is out_proj(v_proj(p)).
    expected = head.out_proj(head.v_proj(tokens[:, 5]))
    torch.testing.assert_close(out.pooled, expected)


def test_registers_are_not_keys():
    head = JwthPoolingHead(32, 2, 4, 5).double()
    tokens = _tokens(2, 4, 10, 32)
    changed = tokens.clone()
    changed[:, 1:5] += 100.0  # registers only
    torch.testing.assert_close(head(tokens).logits, head(changed).logits)
    changed[:, 7] += 1.0      # a patch token does matter
    assert not torch.allclose(head(tokens).logits, head(changed).logits)


def test_linear_probe_ignores_patch_tokens():
    head = LinearProbeHead(32, 3, 5).double()
    tokens = _tokens(4, 4, 20, 32)
    changed = tokens.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])
    torch.testing.assert_close(head(tokens).logits, head(changed).logits)
    torch.testing.assert_close(head(tokens).logits, head.classifier(tokens[:, 0]))


def test_jwth_matches_torch_multihead_attention():
    """Independent check of the maths against torch's own MultiheadAttention."""
    d, h = 48, 4
    head = JwthPoolingHead(d, 2, h, 1).double()
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([head.q_proj.weight, head.k_proj.weight, head.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([head.q_proj.bias, head.k_proj.bias, head.v_proj.bias]))
        mha.out_proj.weight.copy_(head.out_proj.weight)
        mha.out_proj.bias.copy_(head.out_proj.bias)
    tokens = _tokens(3, 0, 25, d)
    ref, weights = mha(tokens[:, :1], tokens[:, 1:], tokens[:, 1:], average_attn_weights=False)
    out = head(tokens, need_attn=True)
    torch.testing.assert_close(out.pooled, ref[:, 0])
    torch.testing.assert_close(out.attn, weights[:, :, 0])


def _meta(**kw):
    base = dict(pooling="jwth", classes=["neg", "pos"], num_heads=4, dim=32, num_prefix_tokens=5,
                backbone_preset="test_tiny_patch14_reg4", backbone_weights_hash="abc", tile_size=224,
                target_mpp=0.5)
    base.update(kw)
    return HeadMeta(**base)


def test_head_file_round_trip(tmp_path):
    head = JwthPoolingHead(32, 2, 4, 5)
    digest = save_head(head, _meta(), tmp_path / "h.safetensors")
    loaded = load_head(tmp_path / "h.safetensors")
    assert loaded.sha256 == digest and loaded.meta.classes == ["neg", "pos"]
    tokens = _tokens(2, 4, 9, 32).float()
    torch.testing.assert_close(loaded.module(tokens).logits, head(tokens).logits)
    assert not list(tmp_path.glob(".jwth-tmp-*"))


def test_head_file_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_head(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="junk.safetensors"):
        load_head(junk)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelError, match="no 'jwth_head' metadata"):
        load_head(tmp_path / "plain.safetensors")
    # metadata that disagrees with the tensors
    head = JwthPoolingHead(32, 2, 4, 5)
    save_head(head, _meta(dim=64), tmp_path / "bad.safetensors")
    with pytest.raises(ModelError, match="do not match"):
        load_head(tmp_path / "bad.safetensors")


def test_head_backbone_compatibility(tmp_path):
    save_head(JwthPoolingHead(32, 2, 4, 5), _meta(), tmp_path / "h.safetensors")
    loaded = load_head(tmp_path / "h.safetensors")
    with pytest.raises(ModelError, match="expects 32-dim"):
        check_head_matches_backbone(loaded, preset="x", dim=64, num_prefix_tokens=5, weights_hash="abc")
    with pytest.raises(ModelError, match="prefix tokens"):
        check_head_matches_backbone(loaded, preset="x", dim=32, num_prefix_tokens=1, weights_hash="abc")
    with pytest.raises(ModelError, match="--weights"):
        check_head_matches_backbone(loaded, preset="x", dim=32, num_prefix_tokens=5, weights_hash="zzz")
    notes = check_head_matches_backbone(loaded, preset="other", dim=32, num_prefix_tokens=5, weights_hash="abc")
    assert notes and "other" in notes[0]


def test_random_head_is_seeded_and_warns():
    kw = dict(dim=32, num_prefix_tokens=5, classes=["a", "b"], num_heads=4, backbone_preset="p",
              backbone_weights_hash="h", tile_size=224, target_mpp=0.5)
    with pytest.warns(UserWarning, match="NOT meaningful"):
        a = random_head("jwth", seed=3, **kw)
    with pytest.warns(UserWarning):
        b = random_head("jwth", seed=3, **kw)
        c = random_head("jwth", seed=4, **kw)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.meta.random_init

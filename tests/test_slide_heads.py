"""Slide heads (heads/mil.py) against hand-computed float64 references, and their files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jwth_engine.errors import ModelError
from jwth_engine.heads import mil
from jwth_engine.heads.mil import GatedABMIL, MaxPool, MeanPool, WSCReducer, build_slide_head
from jwth_engine.heads.slide_io import (SlideHeadMeta, check_features_match, load_slide_head,
                                        save_slide_head)


def _seeded(kind, dim=5, classes=3, **kw):
    torch.manual_seed(0)
    return build_slide_head(kind, dim, classes, **kw).double().eval()


def _softmax(x):
    e = np.exp(x - x.max(0))
    return e / e.sum(0)


def _abmil_by_hand(head: GatedABMIL, bag: np.ndarray):
    p = {k: v.numpy() for k, v in head.state_dict().items()}
    logits_attn = []
    for h in bag:  # one tile at a time, the paper's formula
        v = np.tanh(p["attn_v.weight"] @ h + p["attn_v.bias"])
        u = 1 / (1 + np.exp(-(p["attn_u.weight"] @ h + p["attn_u.bias"])))
        logits_attn.append(float(p["attn_w.weight"][0] @ (v * u) + p["attn_w.bias"][0]))
    a = _softmax(np.array(logits_attn))
    z = (a[:, None] * bag).sum(0)
    return p["classifier.weight"] @ z + p["classifier.bias"], a


def _wsc_by_hand(head: WSCReducer, bag: np.ndarray):
    p = {k: v.numpy() for k, v in head.state_dict().items()}
    gelu = lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))  # noqa: E731
    scores = np.stack([p["score_mlp.3.weight"] @ gelu(p["score_mlp.0.weight"] @ h + p["score_mlp.0.bias"])
                       + p["score_mlp.3.bias"] for h in bag])               # [N, H]
    a = np.stack([_softmax(scores[:, k]) for k in range(scores.shape[1])], 1)
    z = np.mean([(a[:, k:k + 1] * bag).sum(0) for k in range(a.shape[1])], 0)
    return p["classifier.weight"] @ z + p["classifier.bias"], a.mean(1)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_abmil_matches_hand_computation(n):
    head = _seeded("abmil", hidden=4)
    bag = np.random.default_rng(n).normal(size=(n, 5))
    out = head(torch.from_numpy(bag))
    logits, attn = _abmil_by_hand(head, bag)
    np.testing.assert_allclose(out.logits.detach().numpy(), logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.attention.detach().numpy(), attn, rtol=1e-12, atol=1e-12)
    assert out.attention.shape == (n,) and out.logits.shape == (3,)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_wsc_matches_hand_computation(n):
    head = _seeded("wsc", hidden=6, num_heads=3)
    bag = np.random.default_rng(10 + n).normal(size=(n, 5))
    out = head(torch.from_numpy(bag))
    logits, attn = _wsc_by_hand(head, bag)
    np.testing.assert_allclose(out.logits.detach().numpy(), logits, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.attention.detach().numpy(), attn, rtol=1e-10, atol=1e-12)
    # The exposed per-tile weights are exactly the weights of the pooled embedding.
    np.testing.assert_allclose(out.embedding.detach().numpy(), attn @ bag, rtol=1e-10)


def test_baselines_by_hand():
    bag = np.array([[1.0, -2.0, 3.0, 0.0, 5.0], [4.0, 0.0, -1.0, 2.0, 1.0]])
    mean, mx = _seeded("mean"), _seeded("max")
    out = mean(torch.from_numpy(bag))
    np.testing.assert_allclose(out.embedding.numpy(), bag.mean(0))
    np.testing.assert_allclose(out.attention.numpy(), [0.5, 0.5])
    out = mx(torch.from_numpy(bag))
    np.testing.assert_allclose(out.embedding.numpy(), bag.max(0))
    np.testing.assert_allclose(out.attention.numpy(), [2 / 5, 3 / 5])  # tile 1 holds 3 of the 5 maxima
    assert isinstance(mean, MeanPool) and isinstance(mx, MaxPool)


@pytest.mark.parametrize("kind", ["abmil", "wsc", "mean", "max"])
def test_permutation_invariant(kind):
    head = _seeded(kind, dim=8)
    bag = torch.from_numpy(np.random.default_rng(1).normal(size=(37, 8)))
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(2))
    a, b = head(bag), head(bag[perm])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.attention[perm], b.attention, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["abmil", "wsc"])
def test_chunked_bag_of_100k_equals_one_shot(kind, monkeypatch):
    """100k tiles go through the chunked path; the result equals the one-shot softmax."""
    head = _seeded(kind, dim=16).float()
    bag = torch.from_numpy(np.random.default_rng(3).normal(size=(100_000, 16)).astype(np.float32))
    with torch.no_grad():
        chunked = head(bag)
        monkeypatch.setattr(mil, "CHUNK", 1 << 30)
        one_shot = head(bag)
    assert chunked.attention.shape == (100_000,)
    torch.testing.assert_close(chunked.attention.sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.logits, one_shot.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.attention, one_shot.attention, rtol=1e-5, atol=1e-12)


def test_empty_or_misshaped_bag_is_refused():
    head = _seeded("abmil")
    with pytest.raises(ValueError, match="empty bag"):
        head(torch.zeros(0, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        head(torch.zeros(3, 4, dtype=torch.float64))


def _meta(kind="abmil", dim=5):
    return SlideHeadMeta(kind=kind, classes=["a", "b", "c"], dim=dim, feature_kind="cls",
                         encoder="test_tiny_patch14_reg4", encoder_weights_hash="ab" * 32, hidden=4)


@pytest.mark.parametrize("kind", ["abmil", "wsc", "mean", "max"])
def test_save_load_round_trip(kind, tmp_path):
    head = build_slide_head(kind, 5, 3, hidden=4)
    path = tmp_path / "h.safetensors"
    sha = save_slide_head(head, _meta(kind), path)
    loaded = load_slide_head(path)
    assert loaded.sha256 == sha and loaded.meta.kind == kind
    bag = torch.randn(6, 5)
    torch.testing.assert_close(loaded.module(bag).logits, head.eval()(bag).logits)


def test_feature_mismatch_is_one_line():
    meta = _meta()
    with pytest.raises(ModelError, match="x.h5: features are 7-dim but the slide head expects 5"):
        check_features_match(meta, source="x.h5", dim=7, encoder=None, weights_hash=None, feature_kind=None)
    with pytest.raises(ModelError, match="encoder 'uni_v1'"):
        check_features_match(meta, source="x.h5", dim=5, encoder="uni_v1", weights_hash=None, feature_kind=None)
    with pytest.raises(ModelError, match="kind 'mean'"):
        check_features_match(meta, source="x.h5", dim=5, encoder=None, weights_hash=None, feature_kind="mean")
    check_features_match(meta, source="x.h5", dim=5, encoder="test_tiny_patch14_reg4",
                         weights_hash="ab" * 32, feature_kind="cls")


def test_tile_head_file_is_not_a_slide_head(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tile.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"jwth_head": "{}"})
    with pytest.raises(ModelError, match="not a jwth-engine slide head"):
        load_slide_head(path)


def test_metrics_by_hand():
    from jwth_engine.heads.slide_metrics import binary_auroc, classification_report

    # 3 positives x 3 negatives: pairs won 3 (0.9) + 2.5 (0.4, one tie) + 1 (0.2) = 6.5 of 9
    pos = np.array([1, 1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.4, 0.2, 0.4, 0.1, 0.3])
    assert binary_auroc(pos, score) == pytest.approx(6.5 / 9)
    probs = np.stack([1 - score, score], 1)
    rep = classification_report(pos.astype(int), probs, ["neg", "pos"])
    # Predictions (p > 0.5): only the 0.9 tile is positive.
    assert rep["confusion_matrix"] == [[3, 0], [2, 1]]
    assert rep["per_class_recall"] == {"neg": 1.0, "pos": pytest.approx(1 / 3)}
    assert rep["balanced_accuracy"] == pytest.approx((1 + 1 / 3) / 2)


def test_output_unpacks_as_logits_and_attention():
    head = GatedABMIL(8, 2, hidden=4)
    logits, attention = head(torch.randn(5, 8))
    assert logits.shape == (2,) and attention.shape == (5,)
    assert head(torch.randn(5, 8)).embedding.shape == (8,)


def test_in_memory_bags_train_exactly_like_feature_files(tmp_path):
    """fit-slide-head --regions trains in-memory bags (heads/fit_slide.MemoryBags) through the same
    split/train/report code as feature files: the same bags give the same head and report."""
    from jwth_engine.config import SlideTrainingConfig
    from jwth_engine.heads.fit_slide import MemoryBags, fit_bags, fit_slide_head, read_slide_manifest
    from jwth_engine.outputs.features_h5 import write_features_h5

    rng = np.random.default_rng(0)
    bags, lines = [], ["slide_id,label"]
    for i in range(10):
        bag = rng.normal(size=(int(rng.integers(3, 9)), 12)).astype(np.float32) + (i % 2)
        bags.append(torch.from_numpy(bag))
        write_features_h5(tmp_path / f"s{i}.h5", bag, np.zeros((len(bag), 2), np.int64),
                          {"encoder": "e", "feature_kind": "cls", "encoder_weights_hash": "h"})
        lines.append(f"s{i},{'ab'[i % 2]}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = SlideTrainingConfig(epochs=4, folds=2, seed=1)
    from_files = fit_slide_head(manifest, tmp_path, cfg)
    in_memory = fit_bags(read_slide_manifest(manifest), MemoryBags(bags, {"feature_kind": "cls"}), cfg,
                         manifest=manifest, features_dir=tmp_path)
    assert from_files.report["cross_validated"] == in_memory.report["cross_validated"]
    assert from_files.predictions == in_memory.predictions
    for a, b in zip(from_files.module.state_dict().values(), in_memory.module.state_dict().values()):
        assert torch.equal(a, b)
    assert in_memory.report["instances_per_slide"] == from_files.report["instances_per_slide"]

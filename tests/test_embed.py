"""`embed`, `fit-slide-head` and `score --slide-head` on real slides and real tiles (tiny preset,
random seeded weights: the numbers test plumbing and learning, not biology)."""

from __future__ import annotations

import csv
import json
import subprocess

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jwth_engine.embed.run import embed_slide, features_path
from jwth_engine.errors import ConfigError
from jwth_engine.config import SlideTrainingConfig
from jwth_engine.heads.fit_slide import fit_slide_head
from jwth_engine.heads.slide_io import save_slide_head
from jwth_engine.outputs.features_h5 import write_features_h5
from jwth_engine.scoring import score_slide

from _peer_readers import clam_read, trident_read

MODEL = "test_tiny_patch14_reg4"
OPTS = dict(model=MODEL, device="cpu", backend="torch", precision="fp32", batch_size=16, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: torch's thread pool only adds contention for these tiny models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedded(cmu_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("embed")
    torch.set_num_threads(1)
    result = embed_slide(cmu_small, out=out, features="cls,mean,cls+mean", parquet=True, **OPTS)
    scored = score_slide(cmu_small, out=out / "score", **OPTS)
    return out, result, scored


def test_embed_writes_the_coords_score_used(embedded):
    out, result, scored = embedded
    coords, feats, attrs = trident_read(features_path(out, MODEL, "cls", "CMU-1-Small-Region"))
    table = scored.tiles
    np.testing.assert_array_equal(coords[:, 0], table["x"].to_numpy())
    np.testing.assert_array_equal(coords[:, 1], table["y"].to_numpy())
    assert feats.shape == (len(table), 96) and feats.dtype == np.float32 and coords.dtype == np.int64
    assert len(table) == result.num_tiles > 10
    for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                "name", "level0_width", "level0_height", "encoder"):
        assert key in attrs, key
    assert attrs["patch_size_level0"] == table["width"][0].as_py() and attrs["encoder"] == MODEL
    assert attrs["name"] == "CMU-1-Small-Region" and attrs["feature_kind"] == "cls"
    features, clam_coords = clam_read(features_path(out, MODEL, "cls", "CMU-1-Small-Region"))
    assert features.shape == (len(table), 96)
    np.testing.assert_array_equal(clam_coords, coords)


def test_kinds_in_one_pass_agree(embedded):
    out, _, _ = embedded
    _, cls, _ = trident_read(features_path(out, MODEL, "cls", "CMU-1-Small-Region"))
    _, mean, _ = trident_read(features_path(out, MODEL, "mean", "CMU-1-Small-Region"))
    _, both, attrs = trident_read(features_path(out, MODEL, "cls+mean", "CMU-1-Small-Region"))
    np.testing.assert_array_equal(both, np.concatenate([cls, mean], 1))
    assert attrs["feature_kind"] == "cls+mean" and not np.allclose(cls, mean)
    table = pq.read_table(features_path(out, MODEL, "mean", "CMU-1-Small-Region").with_suffix(".parquet"))
    np.testing.assert_array_equal(np.stack(table["features"].to_numpy(zero_copy_only=False)), mean)


def test_coords_reuse_gives_identical_rows(embedded, cmu_small, tmp_path):
    out, _, scored = embedded
    ours = features_path(out, MODEL, "cls", "CMU-1-Small-Region")
    _, reference, _ = trident_read(ours)
    again = embed_slide(cmu_small, out=tmp_path / "trident", coords=str(ours), **OPTS)
    c, f, attrs = trident_read(again.features["cls"])
    np.testing.assert_array_equal(c, trident_read(ours)[0])
    np.testing.assert_allclose(f, reference, rtol=0, atol=1e-6)
    assert attrs["coords_source"] == str(ours)
    # A CLAM coordinates file: patch_level + patch_size at that level (dataset_h5.py:63-66).
    summary = scored.summary["tiles"]
    clam = tmp_path / "CMU-1-Small-Region.h5"
    with h5py.File(clam, "w") as fh:
        fh["coords"] = trident_read(ours)[0]
        fh["coords"].attrs["patch_level"] = summary["read_level"]
        fh["coords"].attrs["patch_size"] = summary["read_size"]
    again = embed_slide(cmu_small, out=tmp_path / "clam", coords=str(tmp_path), **OPTS)
    np.testing.assert_allclose(trident_read(again.features["cls"])[1], reference, rtol=0, atol=1e-6)


def test_bad_coords_file_is_one_line(cmu_small, tmp_path, cli_cmd):
    bad = tmp_path / "c.h5"
    with h5py.File(bad, "w") as fh:
        fh["coords"] = np.array([[10**7, 0]], np.int64)
        fh["coords"].attrs["patch_size_level0"] = 448
    with pytest.raises(ConfigError, match=r"c.h5: coordinate \(10000000, 0\) lies outside the slide"):
        embed_slide(cmu_small, out=tmp_path / "o", coords=str(bad), **OPTS)
    with h5py.File(bad, "w") as fh:
        fh["coords"] = np.zeros((1, 2), np.int64)
    proc = subprocess.run([*cli_cmd, "embed", str(cmu_small), "--out", str(tmp_path / "o"), "--model", MODEL,
                           "--coords", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: 'coords' needs the attribute")
    assert not list((tmp_path / "o").rglob("*.h5"))


# --- slide heads on planted slide-level signal -------------------------------------------------

@pytest.fixture(scope="module")
def lung_vectors(data_dir):
    """Class tokens of real LC25000 tiles (benign lung_n, squamous lung_scc) from the tiny preset."""
    from jwth_engine.backends import select_backend
    from jwth_engine.heads.fit import embed_tiles, load_tile_images
    from jwth_engine.models import load_backbone
    from jwth_engine.pipeline import ModelStage

    torch.set_num_threads(1)
    rows = list(csv.DictReader(open(data_dir / "tiles" / "labels.csv")))
    paths = {c: [data_dir / r["path"] for r in rows if r["label"] == c] for c in ("lung_n", "lung_scc")}
    with pytest.warns(UserWarning, match="random"):
        backbone = load_backbone(MODEL, None, seed=0)
    backend = select_backend(backbone, backend="torch", device="cpu", precision="fp32", max_batch=32, compile=False)
    stage = ModelStage(backend, head=None, tile_size=224, mean=backbone.preset.mean, std=backbone.preset.std)
    out = {}
    for c, p in paths.items():
        out[c] = embed_tiles(load_tile_images(p[:100]), stage, 32)[:, 0].float().numpy()
    return out, backbone.weights_hash


def _planted_cohort(folder, vectors, weights_hash, *, slides=60, seed=0):
    """Bags of 16-40 benign tiles; label `tumour` = 3 squamous tiles planted among them. Tiles for
    training and validation slides are drawn from disjoint halves of each class."""
    rng = np.random.default_rng(seed)
    neg, pos = vectors["lung_n"], vectors["lung_scc"]
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["slide_id,label,split,patient"]
    for i in range(slides):
        split = "val" if i % 3 == 0 else "train"
        half = slice(50, 100) if split == "val" else slice(0, 50)
        label = "tumour" if i % 2 else "benign"
        n = int(rng.integers(16, 41))
        bag = neg[half][rng.integers(0, 50, n)]
        if label == "tumour":
            bag[:3] = pos[half][rng.integers(0, 50, 3)]
        bag = bag[rng.permutation(n)]
        write_features_h5(folder / f"s{i}.h5", bag, np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int64),
                          {"encoder": MODEL, "feature_kind": "cls", "encoder_weights_hash": weights_hash})
        lines.append(f"s{i},{label},{split},p{i}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


@pytest.mark.parametrize("kind", ["abmil", "wsc"])
def test_learns_planted_signal_deterministically(kind, lung_vectors, tmp_path):
    vectors, whash = lung_vectors
    manifest = _planted_cohort(tmp_path / "bags", vectors, whash)
    cfg = SlideTrainingConfig(head=kind, epochs=15, patience=15, lr=1e-3, dropout=0.0, seed=3)
    first = fit_slide_head(manifest, tmp_path / "bags", cfg)
    assert first.report["val"]["balanced_accuracy"] >= 0.85        # chance is 0.5
    assert first.report["val"]["auroc"] >= 0.9
    shas = [save_slide_head(r.module, r.meta, tmp_path / f"{n}.safetensors")
            for n, r in (("a", first), ("b", fit_slide_head(manifest, tmp_path / "bags", cfg)))]
    assert shas[0] == shas[1]
    # The report describes the saved head: its epoch's val metric is what the head scores now.
    chosen = first.report["history"][first.report["chosen_epoch"] - 1]
    assert chosen["val_bacc"] == pytest.approx(first.report["val"]["balanced_accuracy"])


def test_kfold_reports_out_of_fold_metrics(lung_vectors, tmp_path):
    vectors, whash = lung_vectors
    manifest = _planted_cohort(tmp_path / "bags", vectors, whash, slides=30)
    text = manifest.read_text().replace(",val,", ",train,")
    manifest.write_text(text)
    result = fit_slide_head(manifest, tmp_path / "bags",
                            SlideTrainingConfig(epochs=8, patience=8, lr=1e-3, dropout=0.0, folds=3))
    rep = result.report
    assert len(rep["folds"]) == 3 and rep["cross_validated"]["n"] == 30
    assert sum(f["val"]["n"] for f in rep["folds"]) == 30
    assert rep["cross_validated"]["balanced_accuracy"] > 0.7


def test_bad_manifests_are_one_line(lung_vectors, tmp_path, cli_cmd):
    vectors, whash = lung_vectors
    manifest = _planted_cohort(tmp_path / "bags", vectors, whash, slides=6)
    single = tmp_path / "single.csv"
    single.write_text("slide_id,label\ns0,benign\ns2,benign\n")
    missing = tmp_path / "missing.csv"
    missing.write_text("slide_id,label\ns0,benign\nnope,tumour\n")
    write_features_h5(tmp_path / "bags" / "empty.h5", np.zeros((0, 96), np.float32), np.zeros((0, 2), np.int64),
                      {"encoder": MODEL})
    empty = tmp_path / "empty.csv"
    empty.write_text("slide_id,label\ns0,benign\nempty,tumour\n")
    write_features_h5(tmp_path / "bags" / "wide.h5", np.zeros((3, 7), np.float32), np.zeros((3, 2), np.int64), {})
    wide = tmp_path / "wide.csv"
    wide.write_text("slide_id,label\ns0,benign\nwide,tumour\n")
    expected = {single: "a slide head needs at least two classes", missing: "no features for 1 slide(s)",
                empty: "empty.h5: empty bag (no tissue tiles)", wide: "wide.h5: 7-dim features"}
    for path, message in expected.items():
        proc = subprocess.run([*cli_cmd, "fit-slide-head", str(path), "--features", str(tmp_path / "bags"),
                               "-o", str(tmp_path / "h.safetensors")], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()
        assert len(last) == 1 and message in last[0], last
    assert not (tmp_path / "h.safetensors").exists()
    del manifest


def test_score_slide_head_reproduces_fit_prediction(embedded, lung_vectors, cmu_small, tmp_path, cli_cmd):
    """fit-slide-head on a cohort that includes the real slide's embed output; `score --slide-head`
    on that slide gives the prediction fit-slide-head reported for it."""
    out, _, _ = embedded
    vectors, whash = lung_vectors
    bags = tmp_path / "bags"
    manifest = _planted_cohort(bags, vectors, whash, slides=12)
    real = features_path(out, MODEL, "cls", "CMU-1-Small-Region")
    (bags / "CMU-1-Small-Region.h5").write_bytes(real.read_bytes())
    manifest.write_text(manifest.read_text() + "CMU-1-Small-Region,tumour,train,pcmu\n")
    head = tmp_path / "slide.safetensors"
    proc = subprocess.run([*cli_cmd, "fit-slide-head", str(manifest), "--features", str(bags), "--head", "abmil",
                           "-o", str(head), "--epochs", "3", "--seed", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bal.acc" in proc.stdout and "confusion" in proc.stdout
    report = json.loads((tmp_path / "slide.report.json").read_text())
    assert report["chosen_epoch"] >= 1 and "auroc" in report["val"]
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "slide.predictions.csv"))}
    fitted = rows["CMU-1-Small-Region"]

    scored = score_slide(cmu_small, out=tmp_path / "scored", slide_head=str(head), **OPTS)
    sh = scored.summary["slide_head"]
    assert sh["prediction"] == fitted["prediction"]
    for c in ("benign", "tumour"):
        assert sh["probs"][c] == pytest.approx(float(fitted[f"prob_{c}"]), abs=1e-5)
    attention = scored.tiles["slide_attention"].to_numpy()
    assert attention.shape == (scored.summary["tiles"]["scored"],)
    assert attention.sum() == pytest.approx(1.0, abs=1e-5)
    on_disk = pq.read_table(tmp_path / "scored" / "CMU-1-Small-Region.tiles.parquet")
    np.testing.assert_array_equal(on_disk["slide_attention"].to_numpy(), attention)


def test_slide_head_from_another_encoder_is_refused(embedded, cmu_small, tmp_path, cli_cmd):
    from jwth_engine.heads.mil import build_slide_head
    from jwth_engine.heads.slide_io import SlideHeadMeta

    meta = SlideHeadMeta(kind="abmil", classes=["a", "b"], dim=1024, feature_kind="cls", encoder="uni_vitl16_v1",
                         encoder_weights_hash="0" * 64)
    head = tmp_path / "uni.safetensors"
    save_slide_head(build_slide_head("abmil", 1024, 2), meta, head)
    proc = subprocess.run([*cli_cmd, "score", str(cmu_small), "--model", MODEL, "--out", str(tmp_path / "o"),
                           "--slide-head", str(head), "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {head}: features are 96-dim but the slide head expects 1024 (uni_vitl16_v1 cls)")
    assert not (tmp_path / "o" / "CMU-1-Small-Region.summary.json").exists()


def test_bulk_embed_records_failures_and_resumes(cmu_small, tiny_svs, tmp_path, cli_cmd):
    """Many slides go through screen's ledger: a missing slide fails alone (exit 1), a rerun skips
    finished slides, and asking for another feature kind needs --reconfigure."""
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,slide_id\n{cmu_small},cmu\n{tiny_svs},small\n{tmp_path / 'gone.svs'},gone\n")
    out = tmp_path / "emb"
    base = [*cli_cmd, "embed", str(manifest), "--out", str(out), "--model", MODEL, "--device", "cpu",
            "--backend", "torch", "--precision", "fp32", "--batch-size", "16", "--no-progress"]
    proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "2 embedded, 1 failed" in proc.stdout and "gone.svs: file not found" in proc.stderr
    cmu = out / f"features_{MODEL}" / "cmu.h5"
    coords, feats, _ = trident_read(cmu)
    assert len(coords) > 10 and feats.shape[1] == 96
    assert trident_read(out / f"features_{MODEL}" / "small.h5")[1].shape == (0, 96)   # no tissue: empty bag
    summary = json.loads((out / "slides" / "cmu" / "cmu.summary.json").read_text())
    assert summary["features"]["cls"]["rows"] == len(coords)
    before = cmu.stat().st_mtime_ns
    proc = subprocess.run(base, capture_output=True, text=True)
    assert "0 done, 0 failed, 3 skipped" in proc.stdout and cmu.stat().st_mtime_ns == before
    proc = subprocess.run([*base, "--features", "cls,mean"], capture_output=True, text=True)
    assert proc.returncode == 2 and "features cls -> cls,mean" in proc.stderr

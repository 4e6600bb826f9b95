"""Mixed-magnification regions: nesting on real slides, sequence layout, MEM loss and masking, the
region encoder on planted structure, AB-MIL over regions, and bad input at the command line."""

from __future__ import annotations

import subprocess

import h5py
import numpy as np
import pytest
import torch

from jwth_engine.errors import ConfigError, MppError
from jwth_engine.regions.encoder import EncoderConfig, RegionEncoder, load_region_encoder, save_region_encoder
from jwth_engine.regions.mem import PretrainConfig, mem_loss, mem_mask, pretrain, slot_weights
from jwth_engine.config import SlideTrainingConfig
from jwth_engine.heads.fit_slide import MemoryBags, SlideRow, fit_bags
from jwth_engine.regions.mil import region_bags
from jwth_engine.regions.planning import RegionLayout, parse_magnifications, plan_regions, read_region_tiles
from jwth_engine.slide import open_slide, resolve_mpp

MAGS = (5.0, 10.0, 20.0)


def _assemble(tiles: np.ndarray, n: int) -> np.ndarray:
    T = tiles.shape[1]
    return tiles.reshape(n, n, T, T, 3).transpose(0, 2, 1, 3, 4).reshape(n * T, n * T, 3).astype(np.float64)


def _box_down(image: np.ndarray, f: int) -> np.ndarray:
    h, w = image.shape[0] // f, image.shape[1] // f
    return image.reshape(h, f, w, f, 3).mean(axis=(1, 3))


# (slide fixture, --mpp, whether all magnifications come from one pyramid level)
SLIDES = [("cmu_small", None, True), ("tcga_jp2k", 0.25, True), ("ndpi", None, False)]


@pytest.mark.parametrize("fixture,mpp,shared_level", SLIDES)
def test_tiles_nest_exactly_on_real_slides(request, fixture, mpp, shared_level):
    path = request.getfixturevalue(fixture)
    layout = RegionLayout(MAGS, 1, 224)
    with open_slide(path) as slide:
        plan = plan_regions(slide, slide_mpp=resolve_mpp(slide.info, mpp), layout=layout)
        assert len({r.level for r in plan.reads}) == (1 if shared_level else 3)
        coords = plan.tile_coords()
        spans = plan.slot_spans0()
        mags = layout.slots()[0]
        # Coordinates: the 10x and 20x tiles tile their 5x tile exactly, in integers.
        for k, n in ((1, 2), (2, 4)):
            sub = coords[:, mags == k]
            assert (spans[mags == k] * n == spans[0]).all()
            grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)[:, ::-1]
            np.testing.assert_array_equal(sub - coords[:, :1], np.broadcast_to(grid * spans[mags == k][0], sub.shape))
        # Pixels, on a region with tissue in the middle of the slide.
        index = len(plan) // 2
        tiles = read_region_tiles(slide, plan, index)
        t5, t10, t20 = tiles[:1], tiles[1:5], tiles[5:]
        down20, down10 = _box_down(_assemble(t20, 4), 4), _box_down(_assemble(t10, 2), 2)
        if shared_level:
            # One decoded block, area-filtered: a 5x pixel is the mean of its 20x pixels, up to rounding
            # (twice, where a non-integer downsample makes the 20x tiles themselves resampled).
            for down in (down20, down10):
                assert np.abs(down - t5[0]).max() <= 1.5
                assert np.abs(down - t5[0]).mean() <= 0.3
        else:
            # Separately compressed pyramid levels: equal within resampling (and JPEG) tolerance.
            ref = t5[0].astype(float)
            assert np.abs(down20 - ref).mean() < 0.25 * np.abs(ref - ref.mean()).mean()
            assert np.corrcoef(down20.ravel(), ref.ravel())[0, 1] > 0.95
        if plan.reads[2].level == 0 and plan.reads[2].tile_span0 == 224:
            # A 20x tile at level 0 is exactly the slide's pixels at its coordinates.
            x, y = coords[index, 5]
            np.testing.assert_array_equal(t20[0], slide.read_region((int(x), int(y)), 0, (224, 224)))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_sequence_length_matches_formula(cmu_small, r):
    layout = RegionLayout(MAGS, r, 224)
    assert layout.length == r * r * (1 + 4 + 16)
    mags, pos, rows, cols = layout.slots()
    assert [int((mags == k).sum()) for k in range(3)] == [r * r, 4 * r * r, 16 * r * r]
    with open_slide(cmu_small) as slide:
        plan = plan_regions(slide, slide_mpp=resolve_mpp(slide.info, None), layout=layout)
        assert plan.tile_coords().shape == (len(plan), layout.length, 2)
        assert read_region_tiles(slide, plan, 0).shape == (layout.length, 224, 224, 3)


def test_single_magnification_r1_is_the_plain_tile_grid(cmu_small):
    from jwth_engine.tiling import plan_tiles

    with open_slide(cmu_small) as slide:
        mpp = resolve_mpp(slide.info, None)
        plan = plan_regions(slide, slide_mpp=mpp, layout=RegionLayout((20.0,), 1, 224))
        grid = plan_tiles(slide, slide_mpp=mpp, target_mpp=0.5, tile_size=224)
        np.testing.assert_array_equal(plan.tile_coords()[:, 0], grid.coords)


def test_bad_layouts_and_magnifications(cmu_small):
    with pytest.raises(ConfigError):
        RegionLayout((5.0, 7.0), 1, 224)         # 7/5 is not a whole number
    with pytest.raises(ConfigError):
        parse_magnifications("5,five")
    with open_slide(cmu_small) as slide, pytest.raises(MppError, match="40x"):
        plan_regions(slide, slide_mpp=resolve_mpp(slide.info, None), layout=RegionLayout((10.0, 20.0, 40.0), 1, 224))
    with pytest.raises(ConfigError, match="at most 1024"):
        RegionEncoder(RegionLayout(MAGS, 7, 224), EncoderConfig(in_dim=8))


def test_mem_weights_balance_magnifications_and_masks_are_seeded():
    layout = RegionLayout(MAGS, 2, 224)
    w = slot_weights(layout)
    mags = torch.from_numpy(layout.slots()[0])
    for k in range(3):
        assert float(w[mags == k].sum()) == pytest.approx(1 / 3, abs=1e-6)
    # Hidden weight per magnification: ratio / K in expectation, not in proportion to tile counts.
    masks = mem_mask(20000, layout.length, 0.5, torch.Generator().manual_seed(1))
    assert (masks.sum(1) == 42).all()
    hidden = (masks.float() * w).mean(0)
    for k in range(3):
        assert float(hidden[mags == k].sum()) == pytest.approx(0.5 / 3, rel=0.02)
    a = mem_mask(8, layout.length, 0.5, torch.Generator().manual_seed(7))
    b = mem_mask(8, layout.length, 0.5, torch.Generator().manual_seed(7))
    c = mem_mask(8, layout.length, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The loss is the weighted all-slot loss in expectation: perfect predictions cost 0, opposite 2.
    x = torch.randn(len(masks), layout.length, 4)
    assert float(mem_loss(x, x, masks, w)) == pytest.approx(0.0, abs=1e-5)
    assert float(mem_loss(-x, x, masks, w)) == pytest.approx(2.0, rel=0.01)


def _planted(n: int, layout: RegionLayout, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Each region's slots are linear views of one 6-d latent: hidden slots follow from visible ones."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(layout.length, 6, dim, generator=torch.Generator().manual_seed(123))
    offset = torch.randn(layout.length, dim, generator=torch.Generator().manual_seed(321)) * 0.5
    z = torch.randn(n, 6, generator=g)
    return torch.einsum("nk,lkd->nld", z, basis) + offset + 0.05 * torch.randn(n, layout.length, dim, generator=g)


@pytest.mark.parametrize("dim,heads,n", [(32, 4, 22), (64, 4, 85), (48, 3, 2), (16, 1, 337)])
def test_single_query_attention_equals_multihead_attention(dim, heads, n):
    from jwth_engine.regions.encoder import single_query_attention

    torch.manual_seed(dim + n)
    attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double().eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.4)
    y = torch.randn(5, n, dim, dtype=torch.float64) * 2
    with torch.no_grad():
        ref = attn(y[:, :1], y, y, need_weights=False)[0]
        ours = single_query_attention(attn, y)
    assert ours.shape == ref.shape
    assert torch.linalg.norm(ours - ref) / torch.linalg.norm(ref) < 1e-12


@pytest.mark.parametrize("r,depth", [(1, 1), (2, 2), (3, 3)])
def test_class_token_fast_path_equals_the_full_forward(r, depth):
    # class_token() computes the last block at the class token only; it must be the same function.
    layout = RegionLayout((5.0, 10.0, 20.0), r, 224)
    torch.manual_seed(r)
    model = RegionEncoder(layout, EncoderConfig(in_dim=40, dim=32, depth=depth, heads=4)).double().eval()
    for p in model.parameters():            # away from the zero-initialised tables
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6, layout.length, 40, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)[1]
        fast = model.class_token(x)
        mean = model.region_embedding(x, "mean")
    assert torch.linalg.norm(fast - ref) / torch.linalg.norm(ref) < 1e-12
    assert torch.allclose(mean, model(x)[0].mean(dim=1))
    assert torch.linalg.norm(model.region_embedding(x, "cls") - ref) / torch.linalg.norm(ref) < 1e-12


def test_encoder_learns_planted_structure_far_better_than_the_mean():
    torch.set_num_threads(1)
    layout = RegionLayout(MAGS, 1, 224)
    seqs = _planted(1000, layout)
    cfg = PretrainConfig(epochs=20, batch_size=64, lr=2e-3, val_fraction=0.2, seed=0)
    model, report = pretrain(seqs, layout, cfg)
    val = report["val"]
    assert val["masked_cosine"] > 0.75
    assert val["masked_cosine"] > val["mean_embedding_cosine"] + 0.3
    assert report["loss_history"][-1] < 0.5 * report["loss_history"][0]


def test_pretraining_resumes_to_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    layout = RegionLayout((10.0, 20.0), 1, 224)
    seqs = _planted(200, layout, dim=16)
    cfg = PretrainConfig(epochs=4, batch_size=32, seed=3, encoder={"dim": 32, "depth": 1, "heads": 2})
    straight, _ = pretrain(seqs, layout, cfg)
    ckpt = tmp_path / "enc.ckpt"
    pretrain(seqs, layout, cfg, checkpoint=ckpt, stop_after_epoch=2)
    resumed, report = pretrain(seqs, layout, cfg, checkpoint=ckpt, resume=True)
    assert len(report["loss_history"]) == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    save_region_encoder(resumed, tmp_path / "enc.safetensors")
    loaded, meta = load_region_encoder(tmp_path / "enc.safetensors")
    x = seqs[:5]
    assert torch.allclose(loaded.region_embedding(x, "cls"), resumed.region_embedding(x, "cls"))
    assert meta["layout"]["sequence_length"] == layout.length


def test_abmil_over_regions_learns_a_planted_slide_label():
    torch.set_num_threads(1)
    layout = RegionLayout(MAGS, 1, 224)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=32).astype(np.float32)
    slides, labels = [], []
    for s in range(24):
        seqs = _planted(int(rng.integers(6, 14)), layout, seed=100 + s).numpy()
        label = s % 2
        if label:   # a few regions of positive slides carry the signal at 5x and 10x
            hit = rng.choice(len(seqs), size=3, replace=False)
            seqs[np.ix_(hit, np.arange(5))] += 3.0 * direction
        slides.append(seqs)
        labels.append(label)
    torch.manual_seed(0)
    encoder = RegionEncoder(layout, EncoderConfig(in_dim=32)).eval()   # untrained: the head must find it
    bags = MemoryBags(region_bags(encoder, slides, "mean"), {"feature_kind": "region_mean"})
    rows = [SlideRow(f"s{i}", ("neg", "pos")[y], None, f"p{i}") for i, y in enumerate(labels)]
    cfg = SlideTrainingConfig(epochs=30, patience=30, lr=1e-3, folds=4, seed=0)
    result = fit_bags(rows, bags, cfg, manifest="planted", features_dir="memory")
    cv = result.report["cross_validated"]
    assert cv["n"] == 24 and cv["auroc"] >= 0.9 and cv["balanced_accuracy"] >= 0.8
    assert result.meta.feature_kind == "region_mean" and result.meta.dim == encoder.cfg.dim


# --- command line: the whole path on a real slide, and bad input -------------------------------------

def _run(cli_cmd, *args):
    return subprocess.run([*cli_cmd, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_embed_regions_writes_region_sequences(cli_cmd, cmu_small, tmp_path):
    out = tmp_path / "feats"
    proc = _run(cli_cmd, "embed-regions", cmu_small, "--out", out, "--model", "test_tiny_patch14_reg4",
                "--device", "cpu", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        R = f["features"].shape[0]
        assert R > 0 and f["features"].shape == (R, 21, 96) and f["coords"].shape == (R, 21, 2)
        assert np.isfinite(f["features"][()]).all()
        np.testing.assert_array_equal(f["magnification"][()], [0] + [1] * 4 + [2] * 16)
        np.testing.assert_array_equal(f["position"][()], [0, 0, 1, 2, 3, *range(16)])
        boxes, coords = f["region_boxes"][()], f["coords"][()]
        np.testing.assert_array_equal(coords[:, 0], boxes[:, :2])
    # The same slide with one magnification and r = 1 is a plain (issue 13) tile feature file.
    proc = _run(cli_cmd, "embed-regions", cmu_small, "--out", tmp_path / "plain", "--magnifications", "20",
                "--model", "test_tiny_patch14_reg4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    from jwth_engine.outputs.features_h5 import read_features_h5

    plain = read_features_h5(tmp_path / "plain" / "CMU-1-Small-Region.h5")
    assert plain.features.shape[1] == 96 and plain.coords.shape == (plain.features.shape[0], 2)


def test_bad_input_is_one_line_and_exit_2(cli_cmd, cmu_small, tmp_path):
    out = tmp_path / "out"
    proc = _run(cli_cmd, "embed-regions", cmu_small, "--out", out, "--magnifications", "10,20,40",
                "--model", "test_tiny_patch14_reg4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {cmu_small}: magnification 40x")
    assert not out.exists()             # nothing written, not even the folder
    proc = _run(cli_cmd, "embed", cmu_small, "--out", out, "--magnifications", "5,10,40", "--region-tiles", "1",
                "--model", "test_tiny_patch14_reg4")
    assert proc.returncode == 2 and "magnification 40x" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()
    proc = _run(cli_cmd, "embed-regions", cmu_small, "--out", out, "--region-tiles", "7",
                "--model", "test_tiny_patch14_reg4")
    assert proc.returncode == 2 and "at most 1024" in proc.stderr
    # Mixed region layouts in one features folder.
    layout_a, layout_b = RegionLayout(MAGS, 1, 224), RegionLayout(MAGS, 2, 224)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, layout in (("a", layout_a), ("b", layout_b)):
        with h5py.File(folder / f"{name}.h5", "w") as f:
            f["features"] = np.zeros((2, layout.length, 8), np.float32)
            f["coords"] = np.zeros((2, layout.length, 2), np.int64)
            f["magnification"], f["position"] = layout.slots()[:2]
            f.attrs["layout"] = __import__("json").dumps(layout.to_dict())
    proc = _run(cli_cmd, "pretrain-regions", folder, "-o", tmp_path / "enc.safetensors")
    assert proc.returncode == 2
    assert "mixed region layouts" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "enc.safetensors").exists()


def test_many_slides_one_bad_is_recorded_and_the_rest_embedded(cli_cmd, cmu_small, fixtures_dir, tmp_path):
    """Several slides: a bad one is a `failed:` line naming it, the others are written, exit 1; run
    again, the written ones are skipped and the bad one fails again (as bulk `embed` does)."""
    bad = fixtures_dir / "unopenable.tiff"
    out = tmp_path / "feats"
    args = ("embed-regions", bad, cmu_small, "--out", out, "--model", "test_tiny_patch14_reg4", "--device", "cpu")
    proc = _run(cli_cmd, *args)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and str(bad) in failed[0], proc.stderr
    assert "1 embedded, 1 failed (listed above), 0 skipped" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["CMU-1-Small-Region.h5"]
    proc = _run(cli_cmd, *args)
    assert proc.returncode == 1, proc.stderr
    assert "exists, skipped" in proc.stderr and "0 embedded, 1 failed (listed above), 1 skipped" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["CMU-1-Small-Region.h5"]


def _region_file(path, layout, feats):
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = np.zeros((*feats.shape[:2], 2), np.int64)
        f["magnification"], f["position"] = layout.slots()[:2]
        f.attrs["layout"] = __import__("json").dumps(layout.to_dict())


def test_fit_slide_head_regions_beside_the_20x_tiles(cli_cmd, tmp_path):
    """`fit-slide-head --regions`: the region head is saved, reported beside the 20x-tile head of the
    same slides; missing encoder, mismatched encoder and missing slides are one line, exit 2."""
    import json

    from jwth_engine.heads.slide_io import load_slide_head

    layout = RegionLayout(MAGS, 1, 224)
    folder = tmp_path / "regions"
    folder.mkdir()
    lines = ["slide_id,label"]
    for s in range(8):
        _region_file(folder / f"s{s}.h5", layout, _planted(4 + s % 3, layout, seed=200 + s).numpy())
        lines.append(f"s{s},{'ab'[s % 2]}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    save_region_encoder(RegionEncoder(layout, EncoderConfig(in_dim=32)), tmp_path / "enc.safetensors")
    head = tmp_path / "head.safetensors"
    base = ["fit-slide-head", manifest, "--features", folder, "-o", head, "--regions", "--epochs", "3"]
    proc = _run(cli_cmd, *base, "--region-encoder", tmp_path / "enc.safetensors", "--embedding", "cls", "--folds", "2")
    assert proc.returncode == 0, proc.stderr
    assert "slide head over regions_cls, 8 slides" in proc.stdout
    assert "slide head over tiles_20x, 8 slides" in proc.stdout
    report = json.loads((tmp_path / "head.report.json").read_text())
    assert report["bags"] == "regions_cls" and report["cross_validated"]["n"] == 8
    assert report["baseline"]["bags"] == "tiles_20x" and report["baseline"]["cross_validated"]["n"] == 8
    assert report["baseline"]["instances_per_slide"] == {"min": 16 * 4, "median": 16 * 5.0, "max": 16 * 6}
    loaded = load_slide_head(head)
    assert loaded.meta.kind == "abmil" and loaded.sha256 == report["sha256"]
    meta = loaded.meta
    assert meta.feature_kind == "region_cls" and meta.dim == 64
    assert (tmp_path / "head.predictions.csv").read_text().count("\n") == 9

    def refused(*extra):
        out = tmp_path / "refused.safetensors"
        proc = _run(cli_cmd, *base[:5], out, *base[6:], *extra)
        assert proc.returncode == 2, proc.stderr
        assert not out.exists() and not (tmp_path / "refused.report.json").exists()
        return proc.stderr.strip().splitlines()[-1]

    assert "--regions needs --region-encoder" in refused()
    save_region_encoder(RegionEncoder(layout, EncoderConfig(in_dim=16)), tmp_path / "enc16.safetensors")
    assert "encoder was trained on 5x/10x/20x r=1 tile=224 L=21 D=16" in refused("--region-encoder",
                                                                                 tmp_path / "enc16.safetensors")
    (folder / "s7.h5").unlink()
    assert "no region features for 1 slide(s)" in refused("--region-encoder", tmp_path / "enc.safetensors")

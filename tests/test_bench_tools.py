"""The measuring tools: the null backbone, `bench --pooling both`, scored-only screening
throughput, the benchmarks' verdict logic, and the fast HSV of tissue detection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jwth_engine.backends.null_backend import NullBackend, null_backbone
from jwth_engine.errors import ConfigError
from jwth_engine.models import get_preset
from jwth_engine.screen.run import ScreenReport
from jwth_engine.slide import open_slide
from jwth_engine.tissue import rgb_to_hsv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _provenance import provenance, rotation, spread, verdict  # noqa: E402

TINY = "test_tiny_patch14_reg4"


def test_null_backend_returns_the_presets_token_shape():
    preset = get_preset("jwth_vitl14_reg4")
    backend = NullBackend(null_backbone(preset), torch.device("cpu"), max_batch=4, seed=0)
    tokens = backend(torch.zeros(3, 3, 224, 224))
    assert tokens.shape == (3, 5 + 256, 1024) and tokens.dtype == torch.float32
    assert torch.equal(tokens, backend(torch.ones(3, 3, 224, 224)))   # fixed: no model runs
    with pytest.raises(ValueError, match="max batch"):
        backend(torch.zeros(5, 3, 224, 224))
    with pytest.raises(ConfigError, match="224x224"):
        backend(torch.zeros(1, 3, 112, 112))


def test_score_with_null_backend_says_scores_are_meaningless(cli_cmd, cmu_small, tmp_path):
    proc = subprocess.run([*cli_cmd, "score", str(cmu_small), "--model", TINY, "--backend", "null", "--device", "cpu",
                           "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["backend"]["name"] == "null" and summary["status"] == "scored"
    assert any("scores are meaningless" in note for note in summary["notes"])
    assert summary["model"]["weights_hash"] == "null-backbone"


def test_null_backbone_refuses_weights_and_other_backends(cli_cmd, cmu_small, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    proc = subprocess.run([*cli_cmd, "score", str(cmu_small), "--model", TINY, "--backend", "null",
                           "--weights", str(weights), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--backend null runs no backbone" in proc.stderr
    # cuCIM's own cuFile messages may precede it on a machine without a GPU driver; ours is one line.
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
        ["error: --backend null runs no backbone; --weights cannot be used with it"], proc.stderr
    proc = subprocess.run([*cli_cmd, "bench", str(cmu_small), "--model", TINY, "--backbone", "null",
                           "--backend", "torch"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--backbone null runs no backbone" in proc.stderr


def test_bench_pooling_both_reports_both_heads_side_by_side(cli_cmd, cmu_small, tmp_path):
    out = tmp_path / "both.json"
    proc = subprocess.run([*cli_cmd, "bench", str(cmu_small), "--model", TINY, "--device", "cpu", "--pooling", "both",
                           "--repeats", "2", "--batch-size", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    pb, e2e = result["per_batch"], result["end_to_end"]
    assert pb["batches"] == 4 and pb["tiles"] == result["grid"]["tiles"] == 56
    for name in ("jwth", "linear-probe"):
        for scope in ("per_batch", "per_tile"):
            for what in ("head", "tile"):
                lat = pb[scope][f"{what}_{name}"]
                assert 0 < lat["p50_ms"] <= lat["p99_ms"], (scope, what, name, lat)
        assert len(e2e[name]["values"]) == 2 and e2e[name]["min"] <= e2e[name]["median"] <= e2e[name]["max"]
    # The whole tile is preprocess + backbone + head, batch by batch.
    assert pb["per_batch"]["tile_jwth"]["p50_ms"] >= pb["per_batch"]["head_jwth"]["p50_ms"]
    assert isinstance(e2e["resolvable"], bool) and "jwth_slowdown_vs_probe" in e2e
    assert result["config"]["heads"]["jwth"]["kernel"].startswith("native-cpu")
    assert "end to end tiles/s" in proc.stdout and "jwth - probe" in proc.stdout


def test_screen_throughput_counts_scored_slides_only():
    report = ScreenReport(Path("."), 1, "h", scheduled=5, skipped=0, seconds=36.0)
    report.done += ["a", "b", "blank"]
    report.no_tissue.append("blank")
    report.failed["bad"] = "no MPP"
    report.tiles_scored = 720
    assert report.scored == 2
    assert report.slides_per_hour == pytest.approx(200.0)       # 2 scored in 36 s, not 4 finished
    assert report.tiles_per_second == pytest.approx(20.0)
    empty = ScreenReport(Path("."), 1, "h", scheduled=1, skipped=0, seconds=5.0)
    empty.done.append("blank")
    empty.no_tissue.append("blank")
    assert empty.slides_per_hour is None and empty.tiles_per_second is None


def test_verdicts_can_fail_and_can_be_unresolvable():
    assert verdict(spread([2.1, 2.4, 2.2]), 2.0) == "met"
    assert verdict(spread([1.5, 1.9, 1.7]), 2.0) == "not met"
    assert verdict(spread([1.8, 2.3, 2.1]), 2.0) == "not resolvable"
    assert verdict(spread([0.9, 1.1]), 1.0, higher_is_better=False) == "not resolvable"
    stat = spread([3.0, 1.0, 2.0])
    assert stat["statistic"] == "median of 3" and (stat["min"], stat["median"], stat["max"]) == (1.0, 2.0, 3.0)
    prov = provenance(["bench.py", "--x"])
    assert prov["command"].endswith("bench.py --x") and prov["git"]["commit"]
    assert isinstance(prov["git"]["dirty"], bool) and len(prov["machine"]["load_average_start"]) == 3


def test_rotation_puts_every_arm_in_every_place_and_after_every_other():
    arms = ["raw", "whole", "python", "cucim"]
    orders = [rotation(arms, p) for p in range(8)]
    assert all(sorted(order) == sorted(arms) for order in orders)
    assert {order.index("cucim") for order in orders} == {0, 1, 2, 3}
    # Across consecutive passes (the last arm of one pass precedes the first of the next), the arm
    # run right before raw is not always the same one.
    sequence = [name for order in orders for name in order]
    assert len({sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == "raw"}) > 1


def test_rgb_to_hsv_equals_skimage_bitwise(cmu_small):
    from skimage.color import rgb2hsv

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (97, 131, 3), dtype=np.uint8),
              (rng.integers(0, 4, (64, 64, 3)) * 85).astype(np.uint8),      # many ties between channels
              np.zeros((3, 3, 3), np.uint8), np.full((2, 5, 3), 255, np.uint8)]
    with open_slide(cmu_small) as slide:
        images.append(slide.thumbnail(512)[0][..., :3])
    for image in images:
        want = rgb2hsv(image.astype(np.float32) / 255.0)
        got = rgb_to_hsv(image)
        for channel in range(3):
            assert got[channel].dtype == np.float32
            assert np.array_equal(got[channel], want[..., channel]), (image.shape, channel)


def test_libjpeg_direct_arms_decode_nvimgcodecs_pixels(cmu_small, tmp_path):
    """bench_jpeg_decoder.py compares nvImageCodec's CPU JPEG decode with libjpeg-turbo called
    directly in three ways; the comparison means something only if all decode the same pixels."""
    import bench_jpeg_decoder as bench

    try:
        lib = bench.build_libjpeg_direct(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    slide, decoder, streams, tile, rgb_stored = bench.tissue_streams(str(cmu_small))
    try:
        assert rgb_stored and len(streams) > 10
        direct = bench.DirectDecoder(lib, streams, tile, rgb_stored)
        assert bench.max_deltas(decoder._engine, decoder.colour_spec, direct, streams, tile) == {
            "rows1": 0, "all_rows": 0, "ext_pattern": 0}
        # Asked for the wrong colour handling, the direct decode differs: the check can fail.
        wrong = bench.DirectDecoder(lib, streams[:3], tile, rgb_stored=False)
        assert max(bench.max_deltas(decoder._engine, decoder.colour_spec, wrong, streams[:3], tile).values()) > 50
    finally:
        decoder.close()
        slide.close()

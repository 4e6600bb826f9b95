"""bench --plot and fit-head's training pictures: PNGs checked by what they draw."""

from __future__ import annotations

import subprocess

import numpy as np

from jwth_engine.outputs.figures import read_png
from jwth_engine.outputs.plots import bench_plot, confusion_matrix_plot, head_latencies, stage_throughputs


def _bench_result(with_heads: bool) -> dict:
    result = {"slide": "/x/CMU.svs", "config": {"model": "m", "device": "cpu", "backend": {"name": "torch", "precision": "bf16"}},
              "decode": {"pipeline": {"tiles_per_s": 900.0}, "openslide": {"tiles_per_s": 200.0}},
              "preprocess": {"tiles_per_s": 5000.0}, "backbone": {"tiles_per_s": 30.0},
              "head": {"tiles_per_s": 9000.0}, "end_to_end": {"tiles_per_s": 29.0}}
    if with_heads:
        result["poolings"] = {"jwth": {"head": {"tiles_per_s": 8000.0}},
                              "linear-probe": {"head": {"tiles_per_s": 500000.0}}}
    return result


def test_bench_plot_draws_stages_and_head_latency():
    result = _bench_result(with_heads=True)
    assert [s[0] for s in stage_throughputs(result)] == ["decode (pipeline)", "OpenSlide 1 thread", "preprocess",
                                                          "backbone", "head", "end to end"]
    assert head_latencies(result) == [("jwth", 125.0), ("linear-probe", 2.0)]
    with_heads = bench_plot(result)
    without = bench_plot(_bench_result(with_heads=False))
    assert with_heads.shape == without.shape == (520, 1200, 3)
    red = lambda img: ((img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)).sum()   # end-to-end bar
    assert red(with_heads) > 200 and red(without) > 200
    # the head-latency panel adds its green bar on the right only when the result compares heads
    green = lambda img: ((img[..., 1] > 130) & (img[..., 0] < 90) & (img[..., 2] < 90))[:, 800:].sum()
    assert green(with_heads) > 100 and green(without) == 0


def test_confusion_matrix_shading_follows_counts():
    image = confusion_matrix_plot(np.array([[9, 1], [0, 10]]), ["a", "b"], title="t", size=400)
    assert image.shape == (400, 400, 3)
    # axes at [0.22, 0.18, 0.72, 0.68] of 400 px: 288 x 272 px, square cells of 136 px centred
    def cell(i, j):
        x, y = 88 + 8 + 68 + 136 * j, 56 + 68 + 136 * i - 35       # above the count's text
        return np.median(image[y - 5:y + 5, x - 5:x + 5].reshape(-1, 3), axis=0)
    for i in range(2):
        r, g, b = cell(i, i)
        assert b > r + 60 and r < 120           # 90 % and 100 % of the row: dark blue
    assert (cell(1, 0) > 240).all()             # no tile: white
    r, g, b = cell(0, 1)
    assert 150 < r < 240 and b > r             # 10 %: pale blue


def test_bench_cli_writes_the_plot(cli_cmd, cmu_small, tmp_path):
    plot = tmp_path / "bench.png"
    proc = subprocess.run([*cli_cmd, "bench", str(cmu_small), "--model", "test_tiny_patch14_reg4", "--device", "cpu",
                           "--repeats", "1", "--no-baseline", "--no-sequential", "--min-tissue", "0.9",
                           "--plot", str(plot)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    image = read_png(plot)
    assert image.shape == (520, 1200, 3) and image.std() > 20


def test_fit_head_writes_curves_and_confusion(cli_cmd, data_dir, tmp_path):
    head = tmp_path / "h.safetensors"
    proc = subprocess.run([*cli_cmd, "fit-head", str(data_dir / "tiles/labels.csv"), "--root", str(data_dir),
                           "--model", "test_tiny_patch14_reg4", "--device", "cpu", "--epochs", "3",
                           "--where", "label_type=tissue_class", "-o", str(head)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    curves, confusion = read_png(tmp_path / "h.curves.png"), read_png(tmp_path / "h.confusion.png")
    assert curves.shape == (420, 1000, 3) and confusion.shape == (520, 520, 3)
    blue_line = ((curves[..., 2] > 150) & (curves[..., 0] < 80)).sum()
    assert blue_line > 50

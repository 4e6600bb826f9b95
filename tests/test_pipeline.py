"""Streaming pipeline: equals the sequential reference, reads each stored tile once, stays bounded,
and stops cleanly on errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from jwth_engine.errors import SlideError
from jwth_engine.pipeline import (GridReader, ModelStage, PipelineStats, TilePrefetcher, plan_reads,
                                  run_sequential, run_streaming)
from jwth_engine.pipeline.queues import BoundedQueue, Closed
from jwth_engine.slide import Slide, open_slide
from jwth_engine.tiling import plan_tiles
from jwth_engine.tissue import detect_tissue

from _gpu import gpu_skip

TINY = "test_tiny_patch14_reg4"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- fixtures -------------------------------------------------------------------------------------

def _stage(pooling: str = "jwth") -> ModelStage:
    from jwth_engine.backends import select_backend
    from jwth_engine.heads import random_head
    from jwth_engine.heads.native import make_head_runner
    from jwth_engine.models import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: expected here
        backbone = load_backbone(TINY, seed=0)
        head = random_head(pooling, dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                           classes=["negative", "positive"], num_heads=4, backbone_preset=TINY,
                           backbone_weights_hash=backbone.weights_hash, tile_size=224, target_mpp=0.5, seed=0)
    backend = select_backend(backbone, device="cpu", max_batch=64, log=lambda _: None)
    preset = backbone.preset
    return ModelStage(backend, make_head_runner(head.module), preset.input_size, preset.mean, preset.std)


@pytest.fixture(scope="module")
def stage() -> ModelStage:
    return _stage()


@pytest.fixture(scope="module")
def cmu(cmu_small):
    slide = open_slide(cmu_small)
    yield slide
    slide.close()


@pytest.fixture(scope="module")
def cmu_grid(cmu):
    return plan_tiles(cmu, slide_mpp=0.499, target_mpp=0.5, tile_size=224, tissue=detect_tissue(cmu),
                      min_tissue=0.25)


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("jwth-prefetch", "jwth-upload") and t.is_alive()]


class CountingSlide(Slide):
    """A real Slide that reads through another one, counting (and optionally failing) regions."""

    def __init__(self, inner: Slide, *, fail_after: int | None = None, delay: float = 0.0):
        super().__init__(inner.path, inner.info)
        self.inner = inner
        self.fail_after = fail_after
        self.delay = delay
        self.locations: list[tuple[int, tuple[int, int], tuple[int, int]]] = []
        self._lock = threading.Lock()

    def _read(self, location, level, size):
        with self._lock:
            if self.fail_after is not None and len(self.locations) >= self.fail_after:
                raise SlideError(self.path, f"cannot decode region at ({location[0]}, {location[1]}) "
                                            f"level {level}: injected failure")
            self.locations.append((level, tuple(location), tuple(size)))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.read_region(location, level, size)


# --- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 5, 32, 200])
@pytest.mark.parametrize("num_workers,prefetch", [(0, 1), (2, 2), (3, 4)])
def test_streaming_equals_sequential(stage, cmu, cmu_grid, batch_size, num_workers, prefetch):
    ref, ref_seconds = run_sequential(cmu, cmu_grid, stage, batch_size=batch_size)
    seen = []
    stats = PipelineStats()
    t0 = time.perf_counter()
    probs, seconds = run_streaming(cmu, cmu_grid, stage, batch_size=batch_size, num_workers=num_workers,
                                   prefetch=prefetch, progress=seen.append, stats=stats)
    wall = time.perf_counter() - t0
    assert len(cmu_grid.coords) > 20
    assert probs.shape == ref.shape == (len(cmu_grid.coords), 2)
    assert probs.dtype == np.float32
    assert np.array_equal(probs, ref)  # same tiles, same order, same batches: bit for bit
    assert sum(seen) == len(cmu_grid.coords)
    assert seen == [min(batch_size, len(cmu_grid.coords) - s) for s in range(0, len(cmu_grid.coords), batch_size)]
    for key in ("decode", "preprocess", "backbone", "head"):
        assert seconds[key] > 0, key                   # each stage did work, and it was timed
    assert 0 <= seconds["input_wait"] <= wall
    assert seconds["backbone"] + seconds["head"] <= wall * 1.05   # one model thread: within the wall time
    assert set(ref_seconds) <= set(seconds)
    assert stats.tiles == len(cmu_grid.coords) and stats.read_plan["mode"] == "stored-tiles"
    assert not _pipeline_threads()


def test_streaming_linear_probe_equals_sequential(cmu, cmu_grid):
    probe = _stage("linear-probe")
    ref, _ = run_sequential(cmu, cmu_grid, probe, batch_size=16)
    probs, _ = run_streaming(cmu, cmu_grid, probe, batch_size=16)
    assert np.array_equal(probs, ref)


def test_batch_observers_see_every_row_once_in_order(cmu, cmu_grid):
    """Observers get each batch's tokens and head output in grid order; asking for attention and
    pooled vectors does not change the probabilities."""
    plain = _stage()
    ref, _ = run_streaming(cmu, cmu_grid, plain, batch_size=7)
    seen_rows, pooled, attn, probs_seen = [], [], [], []

    def observe(first_row, tokens, head_output, probs):
        seen_rows.append((first_row, tokens.shape[0]))
        pooled.append(head_output.pooled.clone())
        attn.append(head_output.attn.clone())
        probs_seen.append(probs.clone())

    stage = _stage()
    stage.observers, stage.need_attn, stage.need_pooled = (observe,), True, True
    probs, _ = run_streaming(cmu, cmu_grid, stage, batch_size=7, num_workers=2)
    n = len(cmu_grid.coords)
    assert np.array_equal(probs, ref)
    assert [r for r, _ in seen_rows] == list(range(0, n, 7))
    assert sum(k for _, k in seen_rows) == n
    assert np.array_equal(torch.cat(probs_seen).numpy(), probs)
    attn = torch.cat(attn)
    assert attn.shape == (n, stage.head.num_heads, 256)   # 224 / 14 = 16 x 16 patch tokens
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:2]), atol=1e-5)
    assert torch.cat(pooled).shape == (n, 96)


def test_prefetched_tiles_equal_tile_reads(cmu, cmu_grid):
    """What the model sees: every tile equals a plain read_region of its coordinates, in grid order."""
    r = cmu_grid.read_size
    with TilePrefetcher(cmu, cmu_grid, batch_size=7, num_workers=2) as prefetcher:
        got = []
        for batch in prefetcher:
            got.append(batch.array.copy())
            batch.release()
    tiles = np.concatenate(got)
    for (x, y), tile in zip(cmu_grid.coords, tiles):
        assert np.array_equal(tile, cmu.read_region((int(x), int(y)), cmu_grid.level, (r, r)))


# --- read locality --------------------------------------------------------------------------------

def _all_tiles_grid(slide, slide_mpp, target_mpp, tile_size):
    return plan_tiles(slide, slide_mpp=slide_mpp, target_mpp=target_mpp, tile_size=tile_size, tissue=None,
                      min_tissue=0.0)


LOCALITY_CASES = [
    # (fixture, reader, slide mpp, target mpp, tile size, expected plan mode)
    ("cmu_small", "auto", 0.499, 0.5, 224, "stored-tiles"),          # cuCIM, JPEG 240 px tiles
    ("cmu_small", "openslide", 0.499, 0.5, 224, "stored-tiles"),     # OpenSlide, level 0
    ("cmu_small", "auto", 0.499, 0.5, 97, "stored-tiles"),           # odd size, 4 tiles per stored tile
    ("tcga_jp2k", "auto", 0.25, 0.5, 224, "stored-tiles"),           # JPEG 2000, level 1, downsample 2.0005
    ("tcga_jp2k", "auto", 0.25, 0.25, 300, "stored-tiles"),          # tiles larger than stored tiles
    ("ndpi", "auto", 0.228, 0.46, 224, "stored-tiles"),              # OpenSlide NDPI, 8-row strips
    ("ndpi", "auto", 0.228, 3.7, 64, "stored-tiles"),                # NDPI JPEG-scaled level
    ("tiny_svs", "auto", 0.499, 0.499, 14, "stored-tiles"),          # image smaller than one stored tile
]


@pytest.mark.parametrize("case", LOCALITY_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}-{c[4]}")
def test_locality_equals_tile_reads_and_decodes_once(request, case):
    name, reader, slide_mpp, target_mpp, tile_size, mode = case
    with open_slide(request.getfixturevalue(name), reader=reader) as inner:
        slide = CountingSlide(inner)
        grid = _all_tiles_grid(slide, slide_mpp, target_mpp, tile_size)
        local = GridReader(slide, grid, num_workers=2, locality="auto")
        assert local.plan.mode == mode, local.plan.reason
        got = np.empty((len(grid), grid.read_size, grid.read_size, 3), np.uint8)
        for start in range(0, len(grid), 6):
            local.read_into(start, got[start:start + 6])
        reads = list(slide.locations)
        per_tile = GridReader(inner, grid, num_workers=0, locality="off")
        want = np.empty_like(got)
        per_tile.read_into(0, want)
    assert np.array_equal(got, want)
    # Each decode unit (whole stored tiles) is requested once per pass...
    assert len(reads) == len(set(reads)) == local.counters.regions
    # ... so no more pixels are decoded than by tile reads, usually far fewer.
    assert local.counters.decode_ratio <= per_tile.counters.decode_ratio
    uw, uh = local.plan.unit
    tw, th = inner.info.level_tile_sizes[grid.level]
    assert uw % tw == 0 and uh % th == 0


def test_locality_falls_back_where_regions_are_not_exact(fixtures_dir, cmu_small):
    with open_slide(fixtures_dir / "boxes.tiff", reader="openslide") as slide:
        # level 2 of boxes.tiff has downsample 4.016: OpenSlide renders it at sub-pixel offsets
        plan = plan_reads(slide.info, 2, 16)
        assert plan.mode == "per-tile" and "sub-pixel" in plan.reason
        with pytest.raises(ValueError, match="sub-pixel"):
            plan_reads(slide.info, 2, 16, locality="on")
        assert plan_reads(slide.info, 1, 16).mode == "stored-tiles"   # downsample 2: exact
        grid = plan_tiles(slide, slide_mpp=1.0, target_mpp=4.0, tile_size=16, tissue=None, min_tissue=0.0)
        assert grid.level == 2
        a, b = GridReader(slide, grid), GridReader(slide, grid, locality="off")
        out_a = np.empty((len(grid), 16, 16, 3), np.uint8)
        out_b = np.empty_like(out_a)
        a.read_into(0, out_a)
        b.read_into(0, out_b)
        assert a.plan.mode == "per-tile" and np.array_equal(out_a, out_b)
    with open_slide(cmu_small) as slide:
        assert plan_reads(slide.info, 0, 224, locality="off").mode == "per-tile"
        with pytest.raises(ValueError, match="locality"):
            plan_reads(slide.info, 0, 224, locality="maybe")


def test_synthetic_pyramid_locality_and_bounded_units(tmp_path):
    """The benchmark's synthetic slide generator, small: cuCIM and OpenSlide read it, locality is
    exact on it, and the decode units held never exceed a few stored-tile rows."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from synthetic_slide import write_slide
    finally:
        sys.path.pop(0)
    path = tmp_path / "synthetic.tiff"
    info = write_slide(path, width=6000, height=3000, mpp=0.5, fraction=0.3, seed=1, min_level_side=512,
                       log=lambda _: None)
    assert info["levels"] == 3
    for reader in ("cucim", "openslide"):
        with open_slide(path, reader=reader) as slide:
            assert slide.info.level_tile_sizes[0] == (256, 256)
            assert slide.info.mpp == pytest.approx((0.5, 0.5))
            tissue = detect_tissue(slide)
            assert 0.1 < tissue.tissue_fraction < 0.6
            grid = plan_tiles(slide, slide_mpp=0.5, target_mpp=0.5, tile_size=224, tissue=tissue, min_tissue=0.25)
            local, ref = GridReader(slide, grid), GridReader(slide, grid, locality="off")
            a = np.empty((len(grid), 224, 224, 3), np.uint8)
            b = np.empty_like(a)
            for start in range(0, len(grid), 16):
                local.read_into(start, a[start:start + 16])
            ref.read_into(0, b)
            assert np.array_equal(a, b)
            assert local.counters.decode_ratio < ref.counters.decode_ratio
            units_per_row = -(-6000 // 256)
            # rows one tile row spans (2) + the next row's first, plus one batch of look-ahead
            assert local.counters.max_units_held <= 3 * units_per_row + 16 * 4


# --- bounded memory -------------------------------------------------------------------------------

class SlowStage(ModelStage):
    """The tiny model, slowed down, recording how far the reader ran ahead at each batch."""

    def __init__(self, base: ModelStage, prefetcher_ref: list, delay: float):
        super().__init__(base.backend, base.head, base.tile_size, base.mean, base.std)
        self.prefetcher_ref = prefetcher_ref
        self.delay = delay
        self.consumed = 0
        self.ahead: list[int] = []

    def embed(self, images):
        time.sleep(self.delay)
        self.consumed += 1
        self.ahead.append(self.prefetcher_ref[0].stats.batches - self.consumed)
        return super().embed(images)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_queues_stay_bounded(stage, cmu, cmu_grid, prefetch):
    holder: list = []
    slow = SlowStage(stage, holder, delay=0.03)
    prefetcher = TilePrefetcher(cmu, cmu_grid, batch_size=2, num_workers=1, prefetch=prefetch)
    holder.append(prefetcher)
    stats = PipelineStats()
    probs, _ = run_streaming(cmu, cmu_grid, slow, batch_size=2, prefetcher=prefetcher, stats=stats)
    ref, _ = run_sequential(cmu, cmu_grid, stage, batch_size=2)
    assert np.array_equal(probs, ref)
    assert stats.batches > 10
    # the model is the bottleneck, so the reader fills the queue, and never more
    assert stats.queue_high_water == prefetch == stats.queue_capacity
    assert stats.buffers_high_water <= stats.buffers == prefetch + 2
    # batches decoded but not yet consumed: the queue plus the one the reader is handing over
    assert max(slow.ahead) <= prefetch + 1
    assert max(slow.ahead[3:]) >= prefetch - 1


def test_bounded_queue_close_wakes_waiters():
    q = BoundedQueue(1)
    assert q.put("a")
    results = []
    producer = threading.Thread(target=lambda: results.append(q.put("b")))
    producer.start()
    time.sleep(0.05)
    assert producer.is_alive()        # blocked: the queue is full
    assert q.close() == ["a"]
    producer.join(2)
    assert not producer.is_alive() and results == [False]
    with pytest.raises(Closed):
        q.get()
    assert q.high_water == 1
    with pytest.raises(ValueError):
        BoundedQueue(0)


# --- errors ---------------------------------------------------------------------------------------

def _run_with_deadline(fn, seconds: float = 120.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    worker = threading.Thread(target=target)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "pipeline hung"
    return box


@pytest.mark.parametrize("locality", ["auto", "off"])
@pytest.mark.parametrize("fail_after", [0, 9])
def test_reader_error_mid_slide_stops_cleanly(stage, cmu, cmu_grid, locality, fail_after):
    slide = CountingSlide(cmu, fail_after=fail_after)
    seen = []
    box = _run_with_deadline(lambda: run_streaming(slide, cmu_grid, stage, batch_size=4, num_workers=2,
                                                   locality=locality, progress=seen.append))
    error = box.get("error")
    assert isinstance(error, SlideError), box
    message = str(error)
    assert "\n" not in message and message.startswith(str(cmu.path)) and "injected failure" in message
    assert not _pipeline_threads()
    assert sum(seen) < len(cmu_grid.coords)   # stopped mid-slide, after the batches before the error


def test_unreadable_slide_error(stage, fixtures_dir):
    with open_slide(fixtures_dir / "unreadable.svs") as slide:
        grid = plan_tiles(slide, slide_mpp=0.499, target_mpp=0.499, tile_size=8, tissue=None, min_tissue=0.0)
        assert len(grid) == 4
        box = _run_with_deadline(lambda: run_streaming(slide, grid, stage, batch_size=2))
    error = box.get("error")
    assert isinstance(error, SlideError) and "unreadable.svs" in str(error), box
    assert not _pipeline_threads()


def test_model_error_stops_reader(stage, cmu, cmu_grid):
    class Broken(ModelStage):
        def embed(self, images):
            raise RuntimeError("backbone failed")

    broken = Broken(stage.backend, stage.head, stage.tile_size, stage.mean, stage.std)
    slow_slide = CountingSlide(cmu, delay=0.002)
    box = _run_with_deadline(lambda: run_streaming(slow_slide, cmu_grid, broken, batch_size=2, prefetch=2))
    assert isinstance(box.get("error"), RuntimeError)
    assert not _pipeline_threads()
    # the reader stopped early instead of decoding the whole slide
    assert len(slow_slide.locations) < len(cmu_grid.coords)


# --- prefetching the next slide -------------------------------------------------------------------

def test_prefetcher_started_before_scoring(stage, cmu, cmu_grid, tcga_jp2k):
    with open_slide(tcga_jp2k) as other:
        other_grid = plan_tiles(other, slide_mpp=0.25, target_mpp=0.5, tile_size=224, tissue=None, min_tissue=0.5)
        prefetcher = TilePrefetcher(other, other_grid, batch_size=8, prefetch=2).start()
        # "the current slide" scores while the next one is being read
        run_streaming(cmu, cmu_grid, stage, batch_size=8)
        deadline = time.time() + 30
        while len(prefetcher.queue) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert len(prefetcher.queue) == 2          # read ahead, and stopped at the bound
        probs, _ = run_streaming(other, other_grid, stage, batch_size=8, prefetcher=prefetcher)
        ref, _ = run_sequential(other, other_grid, stage, batch_size=8)
        assert np.array_equal(probs, ref)
        with pytest.raises(ValueError, match="another slide, grid or batch size"):
            run_streaming(other, other_grid, stage, batch_size=4,
                          prefetcher=TilePrefetcher(other, other_grid, batch_size=8))
    assert not _pipeline_threads()


# --- GPU (skips at run time without one) ----------------------------------------------------------

def test_streaming_gpu_matches_sequential(cmu, cmu_grid):
    if not torch.cuda.is_available():
        gpu_skip("no CUDA GPU")
    from jwth_engine import _native

    if not _native.cuda_compiled():
        gpu_skip("jwth_engine._C built without CUDA kernels")
    from jwth_engine.backends import select_backend
    from jwth_engine.heads import random_head
    from jwth_engine.heads.native import make_head_runner
    from jwth_engine.models import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(TINY, seed=0)
        head = random_head("jwth", dim=backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                           classes=["a", "b"], num_heads=4, backbone_preset=TINY,
                           backbone_weights_hash=backbone.weights_hash, tile_size=224, target_mpp=0.5, seed=0)
    backend = select_backend(backbone, device="cuda", precision="fp32", max_batch=16, compile=False,
                             log=lambda _: None)
    gpu = ModelStage(backend, make_head_runner(head.module).to(backend.device), 224,
                     backbone.preset.mean, backbone.preset.std)
    ref, _ = run_sequential(cmu, cmu_grid, gpu, batch_size=16)
    stats = PipelineStats()
    probs, seconds = run_streaming(cmu, cmu_grid, gpu, batch_size=16, stats=stats)
    np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-6)
    assert stats.device_queue_high_water <= 2 and seconds["backbone"] > 0
    assert not _pipeline_threads()


# --- the bench command ----------------------------------------------------------------------------

def test_bench_cli(cli_cmd, cmu_small, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([*cli_cmd, "bench", str(cmu_small), "--model", TINY, "--batch-size", "16",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline efficiency" in proc.stdout
    result = json.loads(out.read_text())
    assert result["schema"] == "jwth-engine/bench/v1"
    s = result["summary"]
    assert s["tiles"] > 20 and s["end_to_end_tiles_per_s"] > 0 and s["backbone_tiles_per_s"] > 0
    # Efficiency is end to end over backbone-only, pass by pass (backbone passes on both sides).
    eff, bb, e2e = result["pipeline_efficiency"], result["backbone"]["passes"], result["end_to_end"]
    assert len(eff["passes"]) == 1 and len(bb) == 2 and s["pipeline_efficiency"] == eff["median"] == eff["passes"][0]
    assert eff["passes"][0] == pytest.approx(e2e["passes"][0] / ((bb[0] + bb[1]) / 2), rel=0.01)
    assert e2e["passes"][0] == pytest.approx(s["tiles"] / e2e["wall_s"][0], rel=0.01)
    assert 0.1 < s["pipeline_efficiency"] <= 1.5      # the pipeline cannot beat its own slowest stage by much
    assert s["decode_vs_openslide"] > 0 and s["openslide_tiles_per_s"] > 0
    assert 1.0 <= s["decoded_to_needed_px"] < result["decode"]["per_tile_regions"]["decoded_to_needed_px"]
    assert s["peak_rss_mb"] > 0 and s["slides_per_hour"] > 0
    assert result["sequential"]["matches_streaming_bitwise"] is True
    for stage in ("preprocess", "backbone", "head", "end_to_end"):
        assert result[stage]["tiles_per_s"] > 0 and result[stage]["p99_ms"] >= result[stage]["p50_ms"]
    assert result["machine"]["cpu"] and "torch" in result["versions"]
    assert result["config"]["cucim_cache_mb"] == "0"


def test_bench_cli_errors(cli_cmd, tmp_path):
    proc = subprocess.run([*cli_cmd, "bench", str(tmp_path / "missing.svs"), "--model", TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "file not found" in proc.stderr

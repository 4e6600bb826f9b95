"""The region path's area filter on tensors (blocks decoded on the GPU stay there) equals Pillow's on
the host bit for bit: on random blocks, and through whole regions of real slides into the backbone.

These run on the CPU with CPU tensors: the torch code is device-agnostic, and the GPU run of the
same path is tests/test_raw_decode.py::test_gpu_region_blocks_match_cpu."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from jwth_engine.regions import resample
from jwth_engine.regions.blocks import BlockSource
from jwth_engine.regions.planning import RegionLayout, plan_regions, read_region_tiles
from jwth_engine.regions.resample import box_resample
from jwth_engine.slide import open_slide, resolve_mpp

MAGS = (5.0, 10.0, 20.0)


def _both(block: np.ndarray, box, size: int) -> tuple[np.ndarray, np.ndarray]:
    host = box_resample(block, box, size)
    tensor = box_resample(torch.from_numpy(block), box, size)
    assert isinstance(host, np.ndarray) and isinstance(tensor, torch.Tensor)
    return host, tensor.numpy()


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 6, 7, 8])
def test_whole_pixel_reduce_on_tensors_equals_pillow(factor):
    """Integer factors (Pillow's Image.reduce, whose 3x3 and 5x5 rounding is not the exact mean)."""
    rng = np.random.default_rng(factor)
    for _ in range(4):
        size = int(rng.integers(3, 48))
        side = size * factor + int(rng.integers(0, 6))
        block = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        left, top = (int(v) for v in rng.integers(0, side - size * factor + 1, 2))
        host, tensor = _both(block, (left, top, left + size * factor, top + size * factor), size)
        np.testing.assert_array_equal(tensor, host)
    if factor == 3:
        # Where Pillow's fixed point is not the rounded mean: 5 ones among 9 pixels give 0, not
        # round(5/9) = 1. The tensor path must follow Pillow, not the mean.
        block = np.zeros((3, 3, 3), np.uint8)
        block[:, :, 0] = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
        host, tensor = _both(block, (0, 0, 3, 3), 1)
        assert host[0, 0, 0] == 0
        np.testing.assert_array_equal(tensor, host)


def test_sub_pixel_box_resize_on_tensors_equals_pillow():
    """Boxes with fractional corners and extents (non-integer downsamples, region corners between a
    coarse level's pixels), down- and upscaling."""
    rng = np.random.default_rng(7)
    for _ in range(250):
        size = int(rng.integers(2, 64))
        extent = size * float(rng.uniform(0.4, 6.0))
        side = int(np.ceil(extent)) + int(rng.integers(1, 4))
        block = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        left, top = (float(v) for v in rng.uniform(0, side - extent, 2))
        host, tensor = _both(block, (left, top, left + extent, top + extent), size)
        assert host.shape == (size, size, 3)
        np.testing.assert_array_equal(tensor, host)


# (slide fixture, --mpp): CMU-1 one level at whole pixels; TCGA level 1, downsample 4.0003 (sub-pixel
# boxes); the NDPI three levels, one per magnification.
SLIDES = [("cmu_small", None), ("tcga_jp2k", 0.25), ("ndpi", None)]


@pytest.mark.parametrize("fixture,mpp", SLIDES)
def test_region_tiles_from_tensor_blocks_equal_host(request, fixture, mpp):
    """Whole regions read with the blocks as tensors (as a GPU-decoded source gives them) equal the
    host path's tiles, with the sub-pixel path taken where the slide needs it."""
    with open_slide(request.getfixturevalue(fixture)) as slide:
        plan = plan_regions(slide, slide_mpp=resolve_mpp(slide.info, mpp), layout=RegionLayout(MAGS, 1, 224),
                            min_tissue=0.0)
        tensors = BlockSource(slide)
        tensors.device = torch.device("cpu")
        spy = mock.patch.object(resample, "_resize_box_torch", wraps=resample._resize_box_torch)
        with spy as resized:
            for index in np.linspace(0, len(plan) - 1, min(len(plan), 4)).astype(int):
                ours = read_region_tiles(slide, plan, int(index), blocks=tensors)
                theirs = read_region_tiles(slide, plan, int(index))
                assert isinstance(ours, torch.Tensor) and isinstance(theirs, np.ndarray)
                np.testing.assert_array_equal(ours.numpy(), theirs)
        assert (resized.call_count > 0) == (fixture != "cmu_small"), resized.call_count


def test_embed_regions_from_tensor_blocks_equals_host(cmu_small):
    """The backbone gets the same tiles either way: identical region features."""
    from jwth_engine.backends import select_backend
    from jwth_engine.models import load_backbone
    from jwth_engine.pipeline import ModelStage
    from jwth_engine.regions.embed import embed_regions

    with pytest.warns(UserWarning, match="random"):
        backbone = load_backbone("test_tiny_patch14_reg4", None, seed=0)
    backend = select_backend(backbone, backend="torch", device="cpu", precision="fp32", max_batch=16, compile=False)
    stage = ModelStage(backend, head=None, tile_size=224, mean=backbone.preset.mean, std=backbone.preset.std)
    with open_slide(cmu_small) as slide:
        plan = plan_regions(slide, slide_mpp=resolve_mpp(slide.info, None), layout=RegionLayout(MAGS, 1, 224))
        features = {}
        for name in ("host", "tensor"):
            blocks = BlockSource(slide)
            if name == "tensor":
                blocks.device = torch.device("cpu")
            got: dict = {}
            embed_regions(slide, plan, stage, batch_size=16, num_workers=2, blocks=blocks,
                          sink=lambda i, f: got.__setitem__(i, f))
            features[name] = np.stack([got[i] for i in range(len(plan))])
        assert len(plan) > 1
        np.testing.assert_array_equal(features["tensor"], features["host"])

"""Write a large synthetic pyramidal TIFF (JPEG tiles, mostly background, tissue-like regions).

    PYTHONPATH=python python benchmarks/synthetic_slide.py /tmp/synthetic_100k.tiff \
        --width 100000 --height 80000

The file is written tile by tile from generators (tifffile's tile-iterator writing), so memory
stays at a few tens of MB whatever the size: nothing ever holds a level in memory. Layout:
a generic tiled pyramidal BigTIFF that cuCIM and OpenSlide both read, with levels as successive
top-level directories (reduced ones marked `subfiletype=1`), 256 x 256 JPEG tiles (RGB, 4:2:0),
resolution tags in centimetres giving the MPP, downsample 4 between levels down to a level whose
longest side is <= 2048 px.

Content: a low-resolution tissue map (random overlapping ellipses roughened by noise) decides, per
32 x 32 px block of level 0, whether a pixel is tissue. Tissue pixels come from a small set of
pre-rendered H&E-like textures (pink eosin background, purple nuclei, noise); background is near
white. Every level is rendered from the same map, so tissue detection on the thumbnail finds the
same regions the level-0 tiles contain. Writing 100k x 80k px (about 160k tiles) takes a few
minutes on two cores and about 1 GB of disk; keep it on /tmp and delete it afterwards.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256
BLOCK = 32             # level-0 px per tissue-map cell
BACKGROUND = 244       # glass is not pure white after JPEG; keep it near-white and unsaturated


def tissue_map(width: int, height: int, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean map, one cell per BLOCK x BLOCK level-0 px, about `fraction` of it tissue."""
    rng = np.random.default_rng(seed)
    mw, mh = math.ceil(width / BLOCK), math.ceil(height / BLOCK)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    field = np.full((mh, mw), -1e3, np.float32)  # far from every piece: never tissue
    # Tissue pieces: ellipses of 3-15 % of the slide's short side, like sections and cores.
    short = min(mw, mh)
    for _ in range(max(4, int(60 * fraction) + 4)):
        cx, cy = rng.uniform(0.05, 0.95) * mw, rng.uniform(0.05, 0.95) * mh
        a, b = rng.uniform(0.03, 0.15, size=2) * short
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = ((xx - cx) * c + (yy - cy) * s) / a
        v = (-(xx - cx) * s + (yy - cy) * c) / b
        field = np.maximum(field, 1.0 - (u * u + v * v))
    # Rough edges: noise on a 4-cell grid, upsampled by repetition (it only matters near an edge).
    coarse = rng.normal(0, 0.25, size=(mh // 4 + 1, mw // 4 + 1)).astype(np.float32)
    field += np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:mh, :mw]
    # Pick the threshold that gives the requested tissue fraction.
    threshold = float(np.quantile(field, 1.0 - fraction))
    return field > threshold


def textures(count: int, seed: int) -> list[np.ndarray]:
    """H&E-like 256 x 256 RGB textures: eosin pink with hematoxylin-purple nuclei."""
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    out = []
    for _ in range(count):
        base = np.array([232, 168, 204], np.float32) + rng.normal(0, 6, 3)
        img = np.empty((TILE, TILE, 3), np.float32)
        img[:] = base
        img += rng.normal(0, 9, (TILE, TILE, 1))          # stroma grain
        for _ in range(int(rng.integers(40, 90))):       # nuclei
            cx, cy = rng.uniform(0, TILE, 2)
            r = rng.uniform(3, 8)
            d = (xx - cx) ** 2 + (yy - cy) ** 2
            img[d < r * r] = np.array([112, 64, 160], np.float32) + rng.normal(0, 10, 3)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


class Renderer:
    """Renders any tile of any level from the tissue map and the textures."""

    def __init__(self, tmap: np.ndarray, textures_: list[np.ndarray], width: int, height: int):
        self.tmap, self.textures = tmap, textures_
        self.width, self.height = width, height
        self.white = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)

    def tile(self, level_ds: int, col: int, row: int) -> np.ndarray | None:
        """The tile's pixels, or None for an all-background tile."""
        x0, y0 = col * TILE * level_ds, row * TILE * level_ds
        # tissue map sample for each pixel of the tile (nearest cell)
        xs = (x0 + np.arange(TILE) * level_ds) // BLOCK
        ys = (y0 + np.arange(TILE) * level_ds) // BLOCK
        mh, mw = self.tmap.shape
        inside_x, inside_y = xs < mw, ys < mh
        if not inside_x.any() or not inside_y.any():
            return None
        sub = self.tmap[np.minimum(ys, mh - 1)][:, np.minimum(xs, mw - 1)]
        sub &= inside_y[:, None] & inside_x[None, :]
        if not sub.any():
            return None
        tex = self.textures[(col * 7919 + row * 104729 + level_ds) % len(self.textures)]
        if sub.all():
            return tex
        return np.where(sub[..., None], tex, self.white)


def write_slide(path: str | Path, *, width: int, height: int, mpp: float = 0.5, fraction: float = 0.12,
                quality: int = 85, seed: int = 0, min_level_side: int = 2048, log=print) -> dict:
    import tifffile

    t0 = time.perf_counter()
    renderer = Renderer(tissue_map(width, height, fraction=fraction, seed=seed), textures(24, seed), width, height)
    levels = [1]
    while max(width, height) // levels[-1] > min_level_side:
        levels.append(levels[-1] * 4)
    stats = {"tiles": 0, "background_tiles": 0}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, ds in enumerate(levels):
            lw, lh = math.ceil(width / ds), math.ceil(height / ds)
            cols, rows = math.ceil(lw / TILE), math.ceil(lh / TILE)

            def tiles(ds=ds, cols=cols, rows=rows):
                for row in range(rows):
                    for col in range(cols):
                        stats["tiles"] += 1
                        tile = renderer.tile(ds, col, row)
                        if tile is None:
                            stats["background_tiles"] += 1
                            yield renderer.white
                        else:
                            yield tile

            tif.write(
                tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                compression="jpeg", compressionargs={"level": quality}, resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                resolutionunit="CENTIMETER", subfiletype=0 if index == 0 else 1,
                metadata=None, maxworkers=2,
            )
            log(f"level {index}: {lw} x {lh} ({cols * rows} tiles), {time.perf_counter() - t0:.0f} s")
    size = Path(path).stat().st_size
    return {"path": str(path), "width": width, "height": height, "mpp": mpp, "levels": len(levels),
            "downsamples": levels, "tissue_fraction": float(renderer.tmap.mean()), "bytes": size,
            "seconds": round(time.perf_counter() - t0, 1), **stats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--width", type=int, default=100_000)
    parser.add_argument("--height", type=int, default=80_000)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tissue-fraction", type=float, default=0.12)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = write_slide(args.path, width=args.width, height=args.height, mpp=args.mpp,
                       fraction=args.tissue_fraction, quality=args.quality, seed=args.seed,
                       log=lambda m: print(m, file=sys.stderr))
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())

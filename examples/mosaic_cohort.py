"""A small labelled slide cohort for trying `embed` -> `fit-slide-head` -> `score --slide-head`.

    python examples/mosaic_cohort.py ../shared/data/tiles/labels.csv cohort/ --slides 24

Each slide is a tiled TIFF (JPEG, 0.5 µm/px in its resolution tags) whose level 0 is a mosaic of
`--grid` x `--grid` real LC25000 lung tiles (224 px, the model's tile size at 0.5 µm/px, so
jwth-engine's tile grid falls exactly on the mosaic cells). Every slide is benign lung (`lung_n`);
slides labelled `tumour` have `--planted` squamous carcinoma tiles (`lung_scc`) in random cells.
Writes `cohort/slides/*.tiff` and `cohort/labels.csv` (slide_id,label,patient,planted: the level-0
x:y of the planted tiles, to check a head's per-tile attention against). Tiles for even and
odd slides come from disjoint halves of each class, so a patient split does not share tiles.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

CELL = 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labels_csv", type=Path, help="tiles/labels.csv of the shared test data")
    parser.add_argument("out", type=Path)
    parser.add_argument("--slides", type=int, default=24)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--planted", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tifffile
    from PIL import Image

    rows = list(csv.DictReader(open(args.labels_csv)))
    root = args.labels_csv.parent.parent
    pools = {c: [root / r["path"] for r in rows if r["label"] == c] for c in ("lung_n", "lung_scc")}
    rng = np.random.default_rng(args.seed)
    (args.out / "slides").mkdir(parents=True, exist_ok=True)
    lines = ["slide_id,label,patient,planted"]
    for i in range(args.slides):
        label = "tumour" if i % 2 else "benign"
        half = {c: p[(i // 2) % 2::2] for c, p in pools.items()}
        cells = [half["lung_n"][j] for j in rng.integers(0, len(half["lung_n"]), args.grid ** 2)]
        planted = []
        if label == "tumour":
            for cell in rng.choice(args.grid ** 2, args.planted, replace=False):
                cells[cell] = half["lung_scc"][rng.integers(0, len(half["lung_scc"]))]
                planted.append(f"{cell % args.grid * CELL}:{cell // args.grid * CELL}")
        side = args.grid * CELL
        image = np.empty((side, side, 3), np.uint8)
        for k, path in enumerate(cells):
            r, c = divmod(k, args.grid)
            with Image.open(path) as tile:
                image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = np.asarray(
                    tile.convert("RGB").resize((CELL, CELL)))
        sid = f"mosaic{i:02d}"
        tifffile.imwrite(args.out / "slides" / f"{sid}.tiff", image, tile=(256, 256), photometric="rgb",
                         compression="jpeg", compressionargs={"level": 90}, resolution=(2e4, 2e4),
                         resolutionunit="CENTIMETER", metadata=None)
        lines.append(f"{sid},{label},p{i},{' '.join(planted)}")
    (args.out / "labels.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.slides} slides and {args.out / 'labels.csv'}")


if __name__ == "__main__":
    main()

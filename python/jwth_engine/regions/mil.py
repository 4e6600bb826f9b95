"""`fit-slide-head --regions`: slide heads over region embeddings, beside the same head over the
slides' tiles of one magnification alone (the baseline the region encoder has to beat on the same
slides, split and seed).

Bags: `regions_<embedding>` = the region encoder's embedding of every region of a slide (the class
token, "cls", or the mean of the contextualised tiles, "mean"); `tiles_<m>x` = the backbone
embeddings of every tile at magnification m of the same regions (their m-x slots). Both are trained,
validated and reported by heads/fit_slide.py (patient-level splits or folds, early stopping, metrics
of the head as saved); the saved head is the region head.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import SlideTrainingConfig
from ..errors import ConfigError
from ..heads.fit_slide import FitResult, MemoryBags, fit_bags, read_slide_manifest
from .encoder import RegionEncoder, load_region_encoder
from .io import RegionFeatures, read_region_features


def region_bags(encoder: RegionEncoder, features: Sequence[np.ndarray], kind: str,
                batch_size: int = 512) -> list[torch.Tensor]:
    """[R, dim] per slide: the encoder's region embedding of every region."""
    bags = []
    encoder.eval()
    with torch.no_grad():   # not inference_mode: the bags are then trained on
        for seqs in features:
            x = torch.from_numpy(np.ascontiguousarray(seqs, np.float32))
            bags.append(torch.cat([encoder.region_embedding(x[s:s + batch_size], kind)
                                   for s in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, encoder.cfg.dim))
    return bags


def tile_bags(features: Sequence[np.ndarray], slots: np.ndarray) -> list[torch.Tensor]:
    """[R * n, D] per slide: the backbone embeddings of the chosen slots of every region."""
    return [torch.from_numpy(np.ascontiguousarray(f[:, slots].reshape(-1, f.shape[-1]), np.float32)) for f in features]


def _read_manifest_regions(rows, features_dir, manifest) -> list[RegionFeatures]:
    from pathlib import Path

    folder = Path(features_dir)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: --features folder not found")
    missing = [f"{r.slide_id}.h5" for r in rows if not (folder / f"{r.slide_id}.h5").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{folder}: no region features for {len(missing)} slide(s) of {manifest}: {shown}")
    files = [read_region_features(folder / f"{r.slide_id}.h5") for r in rows]
    for f in files:
        if f.layout != files[0].layout:
            raise ConfigError(f"{f.path}: mixed region layouts in {folder}: {f.layout.describe()} "
                              f"and {files[0].layout.describe()}")
        if len(f.features) == 0:
            raise ConfigError(f"{f.path}: no regions (no tissue); drop the slide from {manifest}")
    return files


def fit_region_heads(manifest: str | os.PathLike, features_dir: str | os.PathLike, cfg: SlideTrainingConfig, *,
                     log: Callable[[str], None] = lambda _: None) -> tuple[FitResult, FitResult]:
    """(region head, baseline head on the `cfg.baseline_magnification` tiles of the same regions)."""
    if not cfg.region_encoder:
        raise ConfigError(f"{manifest}: --regions needs --region-encoder (a region encoder from pretrain-regions)")
    rows = read_slide_manifest(manifest)
    files = _read_manifest_regions(rows, features_dir, manifest)
    encoder, enc_meta = load_region_encoder(cfg.region_encoder)
    layout, in_dim = files[0].layout, files[0].features.shape[2]
    if layout != encoder.layout or in_dim != encoder.cfg.in_dim:
        raise ConfigError(f"{cfg.region_encoder}: encoder was trained on {encoder.layout.describe()} "
                          f"D={encoder.cfg.in_dim}, the features are {layout.describe()} D={in_dim}")
    feats = [f.features for f in files]
    backbone = (enc_meta.get("training", {}).get("backbone") or [{}])[0]
    attrs = {"encoder": str(backbone.get("model", "unknown")),
             "encoder_weights_hash": str(backbone.get("weights_hash", "")),
             "patch_size": layout.tile_size}
    mag = cfg.baseline_magnification
    stores = {f"regions_{cfg.embedding}": MemoryBags(region_bags(encoder, feats, cfg.embedding),
                                                     {**attrs, "feature_kind": f"region_{cfg.embedding}"}),
              f"tiles_{mag:g}x": MemoryBags(tile_bags(feats, files[0].slots_at(mag)),
                                            {**attrs, "feature_kind": f"region_tiles_{mag:g}x"})}
    results = []
    for name, store in stores.items():
        log(f"{name}: {sum(store.sizes) // (4 * store.dim)} instances over {len(rows)} slides")
        result = fit_bags(rows, store, cfg, manifest=manifest, features_dir=features_dir, log=log)
        result.report["bags"] = name
        results.append(result)
    region, baseline = results
    region.report.update({"layout": layout.to_dict(), "region_encoder": str(cfg.region_encoder)})
    region.meta.training.update({"bags": region.report["bags"], "layout": layout.to_dict(),
                                 "region_encoder": str(cfg.region_encoder)})
    region.report["baseline"] = {k: v for k, v in baseline.report.items() if k not in ("history", "folds")}
    return region, baseline

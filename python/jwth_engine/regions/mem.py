"""Masked-embedding-modelling (MEM) pretraining of the region encoder.

Per region a fixed share of the slots (`mask_ratio`, 0.5 recommended) is hidden, uniformly over the
whole sequence; the encoder sees the rest, the decoder predicts the hidden backbone embeddings and the
loss is 1 - cosine similarity at the hidden slots. Slot weights make each magnification count
equally in expectation rather than each embedding: a slot of magnification k weighs 1 / (K * n_k^2),
so every magnification's weights sum to 1/K, and since each slot is hidden with probability
`mask_ratio` the expected hidden weight per magnification is mask_ratio / K; dividing by the hidden
share makes the loss an unbiased estimate of the weighted all-slot loss. Without the weights the 20x
slots (16 of every 21) would dominate.

Determinism: every random draw of epoch e (order, masks) comes from a generator seeded with
(seed, e), and the model from `seed`, so a run resumed from its checkpoint ends with the same weights
as one that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelError
from .encoder import EncoderConfig, RegionEncoder
from .planning import RegionLayout

CHECKPOINT_SCHEMA = "jwth-engine/region-encoder-checkpoint/v1"


def slot_weights(layout: RegionLayout) -> torch.Tensor:
    """[L] float32: 1 / (K * n_k^2) for a slot of magnification k (each magnification sums to 1/K)."""
    K = len(layout.magnifications)
    return torch.cat([torch.full((n * n,), 1.0 / (K * n * n)) for n in layout.tiles_per_side])


def masked_count(length: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--mask-ratio must be within (0, 1), got {ratio}")
    return min(length - 1, max(1, round(ratio * length)))


def mem_mask(batch: int, length: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """bool [batch, length], True = hidden; exactly `masked_count` per row, uniform over slots."""
    n = masked_count(length, ratio)
    order = torch.argsort(torch.rand(batch, length, generator=generator), dim=1)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask.scatter_(1, order[:, :n], True)
    return mask


def mem_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-magnification weighted (1 - cosine) over hidden slots, divided by the hidden share; mean over regions."""
    share = mask[0].float().mean()
    per_slot = (1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)) * weights
    return ((per_slot * mask).sum(dim=1) / share).mean()


def masked_cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> float:
    """Weighted mean cosine similarity at the hidden slots (the metric the report quotes)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    w = weights * mask
    return float((cos * w).sum() / w.sum())


@dataclass
class PretrainConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    mask_ratio: float = 0.5
    val_fraction: float = 0.1
    seed: int = 0
    encoder: dict = field(default_factory=dict)   # EncoderConfig fields except in_dim


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_regions(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n >= 10 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def evaluate(model: RegionEncoder, seqs: torch.Tensor, mean_slots: torch.Tensor, cfg: PretrainConfig,
             batch_size: int = 256) -> dict:
    """Masked cosine of the encoder vs predicting each slot's training-mean embedding, same masks."""
    weights = slot_weights(model.layout)
    g = _epoch_generator(cfg.seed, -1)
    preds, baselines, masks = [], [], []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            x = seqs[start:start + batch_size]
            mask = mem_mask(len(x), x.shape[1], cfg.mask_ratio, g)
            preds.append(masked_cosine(model.reconstruct(x, mask), x, mask, weights) * len(x))
            baselines.append(masked_cosine(mean_slots.expand_as(x), x, mask, weights) * len(x))
            masks.append(len(x))
    n = max(1, sum(masks))
    return {"masked_cosine": sum(preds) / n, "mean_embedding_cosine": sum(baselines) / n}


def _optimizer(model: RegionEncoder, cfg: PretrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def _lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of `base`."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(seqs: torch.Tensor, layout: RegionLayout, cfg: PretrainConfig, *,
             checkpoint: str | os.PathLike | None = None, resume: bool = False,
             stop_after_epoch: int | None = None, log: Callable[[str], None] | None = None) -> tuple[RegionEncoder, dict]:
    """Train a RegionEncoder on `seqs` [N, L, D] float32 with MEM; returns (model, report).

    `checkpoint`: written (atomically) after every epoch; with `resume`, training continues from it.
    `stop_after_epoch` ends early after that epoch (for tests of resumption).
    """
    if seqs.dim() != 3 or seqs.shape[1] != layout.length:
        raise ConfigError(f"region sequences have shape {list(seqs.shape)}; layout {layout.describe()} needs L={layout.length}")
    torch.manual_seed(cfg.seed)
    model = RegionEncoder(layout, EncoderConfig(in_dim=int(seqs.shape[2]), **cfg.encoder))
    opt = _optimizer(model, cfg)
    train_idx, val_idx = split_regions(len(seqs), cfg.val_fraction, cfg.seed)
    train, val = seqs[torch.from_numpy(train_idx)], seqs[torch.from_numpy(val_idx)]
    if len(train) == 0:
        raise ConfigError("no regions to pretrain on")
    weights = slot_weights(layout)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    start_epoch, history = 0, []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start_epoch, history = load_checkpoint(checkpoint, model, opt, cfg, len(seqs))
        if log:
            log(f"resumed from {checkpoint} after epoch {start_epoch}")
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        g = _epoch_generator(cfg.seed, epoch)
        order = torch.randperm(len(train), generator=g)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = train[idx]
            mask = mem_mask(len(x), layout.length, cfg.mask_ratio, g)
            for group in opt.param_groups:
                group["lr"] = _lr_at(epoch * steps_per_epoch + b, total, cfg.lr)
            loss = mem_loss(model.reconstruct(x, mask), x, mask, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total_loss += float(loss.detach()) * len(x)
        history.append(round(total_loss / len(train), 6))
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs}: MEM loss {history[-1]:.4f}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, opt, cfg, epoch + 1, history, len(seqs))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    mean_slots = train.mean(dim=0, keepdim=True)
    report = {"regions": len(seqs), "train_regions": len(train), "val_regions": len(val),
              "loss_history": history, "train_s": round(time.perf_counter() - t0, 3), "config": asdict(cfg)}
    report["val"] = evaluate(model, val, mean_slots, cfg) if len(val) else None
    report["train_eval"] = evaluate(model, train, mean_slots, cfg)
    return model.eval(), report


# --- checkpoints: model + optimizer state in one safetensors file ------------------------------------

def save_checkpoint(path, model: RegionEncoder, opt: torch.optim.Optimizer, cfg: PretrainConfig,
                    epochs_done: int, history: list, num_regions: int) -> None:
    from safetensors.torch import save

    from ..outputs.atomic import atomic_write_bytes

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    scalars = {}
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt.{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{key}"] = float(value)
    meta = {"schema": CHECKPOINT_SCHEMA, "epochs_done": epochs_done, "history": history, "config": asdict(cfg),
            "num_regions": num_regions, "opt_scalars": scalars}
    atomic_write_bytes(path, save(tensors, metadata={"jwth": json.dumps(meta)}))


def load_checkpoint(path, model: RegionEncoder, opt: torch.optim.Optimizer, cfg: PretrainConfig,
                    num_regions: int) -> tuple[int, list]:
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("jwth", "{}"))
    if meta.get("schema") != CHECKPOINT_SCHEMA:
        raise ModelError(f"{path}: not a region-encoder checkpoint")
    if meta["config"] != asdict(cfg) or meta["num_regions"] != num_regions:
        raise ConfigError(f"{path}: checkpoint was made with other settings or data "
                          f"({meta['num_regions']} regions, {meta['config']}); remove it or drop --resume")
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    for pid in range(len(list(model.parameters()))):
        entry = {}
        for key in ("exp_avg", "exp_avg_sq"):
            name = f"opt.{pid}.{key}"
            if name in tensors:
                entry[key] = tensors[name]
        step = meta["opt_scalars"].get(f"{pid}.step")
        if entry and step is not None:
            entry["step"] = torch.tensor(step)
            state["state"][pid] = entry
    opt.load_state_dict(state)
    return int(meta["epochs_done"]), list(meta["history"])

"""Plots as PNG (matplotlib Agg, headless): `bench --plot` and `fit-head`'s training pictures."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .figures import figure_rgb, new_figure, write_png

_STAGES = (("decode (pipeline)", ("decode", "pipeline")), ("decode (per tile)", ("decode", "per_tile_regions")),
           ("OpenSlide 1 thread", ("decode", "openslide")), ("preprocess", ("preprocess",)),
           ("backbone", ("backbone",)), ("head", ("head",)), ("end to end", ("end_to_end",)))
_POOLING_KEYS = ("poolings", "pooling_comparison", "heads")


def _get(result: dict, path: Sequence[str]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def _per_tile(result: dict) -> dict:
    """`bench --pooling both`: per-tile p50 latencies (ms) of its stages and heads, if that is the result."""
    block = _get(result, ("per_batch", "per_tile"))
    return block if isinstance(block, dict) else {}


def stage_throughputs(result: dict) -> list[tuple[str, float]]:
    out = []
    for label, path in _STAGES:
        stage = _get(result, path)
        if isinstance(stage, dict) and stage.get("tiles_per_s"):
            out.append((label, float(stage["tiles_per_s"])))
    per_tile = _per_tile(result)
    for key in ("preprocess", "backbone"):      # a --pooling both result: from per-tile latencies
        if (per_tile.get(key) or {}).get("p50_ms"):
            out.append((key, 1e3 / float(per_tile[key]["p50_ms"])))
    e2e = result.get("end_to_end") if per_tile else None
    for name in ("jwth", "linear-probe"):
        if isinstance(e2e, dict) and (e2e.get(name) or {}).get("median"):
            out.append((f"end to end ({name})", float(e2e[name]["median"])))
    return out


def head_latencies(result: dict) -> list[tuple[str, float]]:
    """(pooling, µs per tile) of the heads a bench result compared (`bench --pooling both`), if any."""
    per_tile = _per_tile(result)
    found = [(name, 1e3 * float(per_tile[f"head_{name}"]["p50_ms"])) for name in ("jwth", "linear-probe")
             if (per_tile.get(f"head_{name}") or {}).get("p50_ms")]
    if found:
        return found
    for key in _POOLING_KEYS:
        block = result.get(key)
        if not isinstance(block, dict):
            continue
        out = []
        for name, value in block.items():
            if not isinstance(value, dict):
                continue
            head = value.get("head", value)
            if isinstance(head, dict) and head.get("per_tile_us"):
                out.append((name, float(head["per_tile_us"])))
            elif isinstance(head, dict) and head.get("tiles_per_s"):
                out.append((name, 1e6 / float(head["tiles_per_s"])))
        if out:
            return out
    return []


def bench_plot(result: dict, width: int = 1200, height: int = 520) -> np.ndarray:
    """Stage throughputs (log scale; end to end highlighted) and, when the result compares heads,
    JWTH vs linear-probe per-tile latency."""
    stages = stage_throughputs(result)
    if not stages:
        raise ValueError("the bench result has no stage throughputs (expected decode/backbone/head/end_to_end)")
    heads = head_latencies(result)
    fig = new_figure(width, height)
    grid = fig.add_gridspec(1, 2 if heads else 1, width_ratios=[3, 1.4] if heads else [1], wspace=0.45,
                            left=0.16, right=0.97, top=0.86, bottom=0.12)
    ax = fig.add_subplot(grid[0, 0])
    labels = [s[0] for s in stages][::-1]
    values = [s[1] for s in stages][::-1]
    colours = ["#d62728" if label.startswith("end to end") else "#1f77b4" for label in labels]
    bars = ax.barh(labels, values, color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("tiles per second (log scale)")
    for bar, value in zip(bars, values):
        ax.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2, f"{value:,.1f}", va="center", fontsize=9)
    ax.set_xlim(min(values) / 2, max(values) * 4)
    config = result.get("config", {})
    backend = config.get("backend", {}) if isinstance(config.get("backend"), dict) else {}
    fig.suptitle(f"bench: {os.path.basename(str(result.get('slide', '')))} · {config.get('model', '?')} on "
                 f"{config.get('device', '?')} ({backend.get('name', '?')} {backend.get('precision', '')})",
                 fontsize=12, x=0.02, ha="left")
    if heads:
        hx = fig.add_subplot(grid[0, 1])
        hx.bar([h[0] for h in heads], [h[1] for h in heads], color=["#2ca02c", "#9467bd", "#8c564b"][:len(heads)])
        hx.set_ylabel("head latency per tile (µs)")
        hx.set_title("head: JWTH vs linear probe", fontsize=10)
        for i, (_, v) in enumerate(heads):
            hx.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    return figure_rgb(fig, width, height)


def write_bench_plot(result: dict, dest: str | os.PathLike) -> None:
    write_png(bench_plot(result), dest)


def training_curves(history: list[dict], *, title: str, width: int = 1000, height: int = 420) -> np.ndarray:
    """Loss and balanced accuracy (train, validation) per epoch; the kept epoch marked."""
    epochs = [h["epoch"] + 1 for h in history]
    fig = new_figure(width, height)
    loss_ax = fig.add_subplot(1, 2, 1)
    loss_ax.plot(epochs, [h["loss"] for h in history], color="#1f77b4")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    acc_ax = fig.add_subplot(1, 2, 2)
    acc_ax.plot(epochs, [h["train_bacc"] for h in history], label="train", color="#1f77b4")
    val = [h.get("val_bacc") for h in history]
    if any(v is not None for v in val):
        acc_ax.plot(epochs, [np.nan if v is None else v for v in val], label="validation", color="#d62728")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("balanced accuracy")
    acc_ax.legend(loc="lower right")
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.14, wspace=0.28)
    return figure_rgb(fig, width, height)


def confusion_matrix_plot(matrix: np.ndarray, classes: Sequence[str], *, title: str, size: int = 520) -> np.ndarray:
    """Counts with row-normalised shading (rows: true class, columns: predicted)."""
    matrix = np.asarray(matrix, np.int64)
    fig = new_figure(size, size)
    ax = fig.add_axes([0.22, 0.18, 0.72, 0.68])
    rows = matrix.sum(axis=1, keepdims=True)
    shade = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=11,
                    color="white" if shade[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), labels=list(classes), rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    return figure_rgb(fig, size, size)

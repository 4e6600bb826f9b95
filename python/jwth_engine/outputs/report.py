"""Self-contained HTML: one slide's report, and a screening run's index of slides.

Everything is inside the file: images as data: URIs, styles inline, the index's sort script inline;
no fonts, scripts or images are fetched, so a report can be mailed or archived as one file. The
templates (templates/*.html, Jinja2 with autoescaping) hold the layout; this module only prepares
what they show from a slide summary (the same dict NAME.summary.json holds).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .atomic import atomic_write_bytes

_TEMPLATES = Path(__file__).with_name("templates")


def _environment():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(str(_TEMPLATES)), autoescape=select_autoescape(["html"]),
                       trim_blocks=True, lstrip_blocks=True)


def data_uri(data: bytes) -> str:
    """An image as a data: URI; PNG or JPEG, told apart by their signatures."""
    if data.startswith(b"\x89PNG"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    else:
        raise ValueError("data_uri: expected PNG or JPEG bytes")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass
class ReportImages:
    """Pictures to embed: the heat map and the attention panels (caption, bytes), PNG or JPEG (photos
    of tissue embed as JPEG: a tenth of the size, and the report stays small enough to mail)."""

    heatmap_png: bytes | None = None
    heatmap_class: str | None = None
    heatmap_missing: str = "No heat map was drawn for this run (score with --heatmap or --report)."
    attention: list[tuple[str, bytes]] = field(default_factory=list)
    attention_class: str | None = None
    attention_grid: int | None = None
    attention_top: int = 0
    attention_bottom: int = 0


def random_parts(summary: dict) -> list[str]:
    parts = []
    if summary.get("model", {}).get("random_init"):
        parts.append("backbone weights")
    if summary.get("head", {}).get("random_init"):
        parts.append("head")
    return parts


def _backend_text(backend) -> str:
    if isinstance(backend, dict):
        main = " ".join(str(backend[k]) for k in ("name", "precision") if backend.get(k))
        reason = backend.get("reason")
        return f"{main} ({reason})" if reason else main
    return str(backend)


def render_report(summary: dict, images: ReportImages) -> str:
    slide = summary.get("slide", {})
    scores = summary.get("scores") if summary.get("status") == "scored" else {}
    first = next(iter(scores.values()), {}) if scores else {}
    attention = None
    if images.attention:
        attention = {"class_name": images.attention_class, "grid": images.attention_grid,
                     "top": images.attention_top, "bottom": images.attention_bottom,
                     "panels": [{"caption": caption, "uri": data_uri(png)} for caption, png in images.attention]}
    context = {
        "name": slide.get("name", "slide"), "slide": slide, "created": summary.get("created", ""),
        "versions": summary.get("versions", {}), "random_parts": random_parts(summary),
        "notes": summary.get("notes", []), "status": summary.get("status"),
        "prediction": summary.get("prediction"), "scores": scores or {}, "top_k": first.get("k", ""),
        "tiles": summary.get("tiles", {}),
        "heatmap_uri": data_uri(images.heatmap_png) if images.heatmap_png else None,
        "heatmap_class": images.heatmap_class, "heatmap_missing": images.heatmap_missing,
        "attention": attention, "model": summary.get("model", {}), "head": summary.get("head", {}),
        "backend_text": _backend_text(summary.get("backend")), "settings": summary.get("settings", {}),
        "timings": summary.get("timings_s", {}),
        "throughput": (summary.get("throughput") or {}).get("tiles_per_s"),
    }
    return _environment().get_template("report.html").render(**context)


def write_report(summary: dict, images: ReportImages, dest: str | os.PathLike) -> None:
    atomic_write_bytes(dest, render_report(summary, images).encode("utf-8"))


# --- screening index --------------------------------------------------------------------------------

def _cell(value, *, num: bool = False, href: str | None = None, digits: int = 4) -> dict:
    if value is None or value == "":
        return {"text": "", "sort": "", "num": num, "href": href}
    if num and isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return {"text": text, "sort": value, "num": num, "href": href}


def render_screen_index(rows: list[dict], score_columns: list[str], *, title: str,
                        report_links: dict[str, str]) -> str:
    """`rows` are the run's summary table rows (summary.csv's); `report_links` maps slide_id to the
    report's path relative to the index."""
    columns = [{"label": "slide", "type": "text"}, {"label": "status", "type": "text"},
               {"label": "prediction", "type": "text"}]
    columns += [{"label": c.removeprefix("score_"), "type": "num"} for c in score_columns]
    columns += [{"label": "tiles", "type": "num"}, {"label": "time (s)", "type": "num"},
                {"label": "error", "type": "text"}]
    body = []
    for row in rows:
        status = row.get("status") or ""
        result = row.get("result")
        shown = "no tissue" if result == "no_tissue" else status
        cells = [_cell(row.get("slide_id"), href=report_links.get(row.get("slide_id"))), _cell(shown),
                 _cell(row.get("prediction"))]
        cells += [_cell(row.get(c), num=True) for c in score_columns]
        cells += [_cell(row.get("tiles_scored"), num=True), _cell(row.get("seconds"), num=True, digits=1),
                  _cell(row.get("error"))]
        body.append({"status": status, "cells": cells})
    counts = {}
    for row in rows:
        counts[row.get("status")] = counts.get(row.get("status"), 0) + 1
    return _environment().get_template("index.html").render(
        title=title, columns=columns, rows=body,
        counts=", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0]))) or "no slides",
        updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def write_screen_index(rows: list[dict], score_columns: list[str], dest: str | os.PathLike, *, title: str,
                       report_links: dict[str, str]) -> None:
    atomic_write_bytes(dest, render_screen_index(rows, score_columns, title=title,
                                                 report_links=report_links).encode("utf-8"))

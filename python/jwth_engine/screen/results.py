"""`DIR/summary.csv` and `DIR/summary.parquet`: one row per slide of the ledger, rewritten
atomically (a reader never sees half a table) while the run goes on and once at its end."""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from ..outputs.atomic import atomic_path, atomic_write_bytes
from ..outputs.report import write_screen_index
from .layout import ScreenLayout
from .ledger import Ledger, SlideRow

FIXED_COLUMNS = ("slide_id", "path", "status", "result", "prediction")
TAIL_COLUMNS = ("tiles_scored", "tiles_candidates", "mpp_used", "reader", "seconds", "attempts",
                "finished", "error_kind", "error")
_FLOATS = {"mpp_used", "seconds"}
_INTS = {"tiles_scored", "tiles_candidates", "attempts"}


def result_from_summary(summary: dict) -> dict:
    """The part of a slide summary JSON that goes into the run's summary table."""
    scored = summary.get("status") == "scored"
    scores = summary.get("scores") if scored else {}
    return {
        "result": summary.get("status"),
        "prediction": summary.get("prediction"),
        "classes": list(summary.get("classes") or []),
        "scores": {cls: {"mean": v["mean"], "topk_mean": v["topk_mean"]} for cls, v in (scores or {}).items()},
        "tiles_scored": summary.get("tiles", {}).get("scored"),
        "tiles_candidates": summary.get("tiles", {}).get("candidates"),
        "mpp_used": summary.get("slide", {}).get("mpp_used"),
        "reader": summary.get("slide", {}).get("reader"),
    }


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def table_rows(slides: list[SlideRow]) -> tuple[list[str], list[dict], set[str]]:
    """(column names, rows, score columns) for these ledger rows."""
    classes: list[str] = []
    extra_names: list[str] = []
    for row in slides:
        for cls in (row.result or {}).get("classes", []):
            if cls not in classes:
                classes.append(cls)
        for name in row.extra:
            if name not in extra_names:
                extra_names.append(name)
    score_cols = [c for cls in classes for c in (f"score_{cls}_mean", f"score_{cls}_topk")]
    reserved = set(FIXED_COLUMNS) | set(TAIL_COLUMNS) | set(score_cols)
    extra_cols = {name: (f"extra_{name}" if name in reserved else name) for name in extra_names}
    columns = [*FIXED_COLUMNS, *score_cols, *TAIL_COLUMNS, *extra_cols.values()]

    rows = []
    for s in slides:
        done = s.status == "done" and s.result is not None
        result = s.result if done else {}
        out = dict.fromkeys(columns)
        out.update(slide_id=s.slide_id, path=s.path, status=s.status, result=result.get("result"),
                   prediction=result.get("prediction"), tiles_scored=result.get("tiles_scored"),
                   tiles_candidates=result.get("tiles_candidates"), mpp_used=result.get("mpp_used"),
                   reader=result.get("reader"), seconds=round(s.seconds, 3) if s.seconds else s.seconds,
                   attempts=s.attempts, finished=_iso(s.finished_at) if s.status in ("done", "failed") else None,
                   error_kind=s.error_kind if s.status == "failed" else None,
                   error=s.error if s.status == "failed" else None)
        for cls, value in result.get("scores", {}).items():
            out[f"score_{cls}_mean"] = value["mean"]
            out[f"score_{cls}_topk"] = value["topk_mean"]
        for name, column in extra_cols.items():
            out[column] = s.extra.get(name)
        rows.append(out)
    return columns, rows, set(score_cols)


def write_results(ledger: Ledger, layout: ScreenLayout) -> int:
    """Rewrite summary.csv and summary.parquet from the ledger; returns the number of rows."""
    columns, rows, score_cols = table_rows(ledger.slides())

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write_bytes(layout.summary_csv, text.getvalue().encode())

    fields = []
    for name in columns:
        kind = pa.float64() if name in _FLOATS or name in score_cols else pa.int64() if name in _INTS else pa.string()
        fields.append(pa.field(name, kind))
    schema = pa.schema(fields)
    table = pa.Table.from_pylist(
        [{k: (str(v) if v is not None and schema.field(k).type == pa.string() else v) for k, v in row.items()}
         for row in rows], schema=schema)
    with atomic_path(layout.summary_parquet) as tmp:
        pq.write_table(table, tmp)
    write_index(layout, rows, [c for c in columns if c in score_cols])
    return len(rows)


def write_index(layout: ScreenLayout, rows: list[dict], score_columns: list[str]) -> None:
    """DIR/index.html: the table as a sortable page, each slide linked to its report when it has one."""
    links = {}
    for row in rows:
        report = layout.slide_dir(row["slide_id"]) / f"{row['slide_id']}.report.html"
        if row.get("status") == "done" and report.is_file():
            links[row["slide_id"]] = report.relative_to(layout.root).as_posix()
    write_screen_index(rows, score_columns, layout.root / "index.html", title=layout.root.name, report_links=links)


class ResultsWriter:
    """Rewrites the tables at most every `interval_s` seconds while a run goes on."""

    def __init__(self, ledger: Ledger, layout: ScreenLayout, interval_s: float = 5.0):
        self.ledger, self.layout, self.interval_s = ledger, layout, interval_s
        self.dirty = True
        self._last = 0.0

    def changed(self) -> None:
        self.dirty = True

    def maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or (self.dirty and now - self._last >= self.interval_s):
            write_results(self.ledger, self.layout)
            self.dirty = False
            self._last = now

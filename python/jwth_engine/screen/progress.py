"""What a screening run tells its user while it works, on stderr: a live rich panel on a terminal
(slides done and failed, slides/h, ETA, what each worker is scoring), or one plain line per
finished slide when stderr is a file or a pipe."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def rate_and_eta(finished: int, remaining: int, elapsed_s: float) -> tuple[float | None, float | None]:
    """(slides per hour, seconds to go) from what this run has finished so far."""
    if finished <= 0 or elapsed_s <= 0:
        return None, None
    per_hour = finished / elapsed_s * 3600.0
    return per_hour, remaining / per_hour * 3600.0


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ScreenDisplay:
    """`live=None` means: a live panel when `stream` is a terminal, plain lines otherwise."""

    def __init__(self, total: int, skipped: int, *, live: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total = total              # slides this run has to score
        self.skipped = skipped          # already done (or failed) before this run
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self.workers: list[dict] = []
        self._live = None
        self._console = None

    # --- events ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream, stderr=self.stream is sys.stderr)
            self._live = Live(self._render(), console=self._console, refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._line(f"screening {self.total} slides ({self.skipped} already finished)")

    def slide_done(self, slide_id: str, seconds: float | None, detail: str = "") -> None:
        self.done += 1
        self._event(f"done    {slide_id}  {format_duration(seconds)}{'  ' + detail if detail else ''}")

    def slide_failed(self, slide_id: str, error: str) -> None:
        self.failed += 1
        self._event(f"FAILED  {slide_id}: {error}")

    def note(self, text: str) -> None:
        self._event(text)

    def update(self, workers: list[dict]) -> None:
        self.workers = workers
        if self._live is not None:
            self._live.update(self._render())

    def stop(self) -> None:
        self.workers = []        # the pool is closing; the final panel shows the totals only
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    # --- rendering ------------------------------------------------------------------------------
    def counts_line(self) -> str:
        finished = self.done + self.failed
        rate, eta = rate_and_eta(finished, self.total - finished, time.monotonic() - self.started)
        rate_text = f"{rate:.1f} slides/h" if rate is not None else "? slides/h"
        return (f"{finished}/{self.total}  done {self.done}  failed {self.failed}  "
                f"{rate_text}  ETA {format_duration(eta)}  elapsed {format_duration(time.monotonic() - self.started)}")

    def _event(self, text: str) -> None:
        finished = self.done + self.failed
        if self._live is not None:
            self._console.print(text)
            self._live.update(self._render())
        else:
            self._line(f"[{finished}/{self.total}] {text}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_row(ProgressBar(total=max(self.total, 1), completed=self.done + self.failed, width=40),
                      self.counts_line())
        for w in self.workers:
            if w.get("slide"):
                progress = w.get("progress")
                tiles = f"{progress[0]}/{progress[1]} tiles" if progress else ""
                table.add_row(f"  {w['worker']}", f"{w['slide']}  {tiles}  {format_duration(w.get('seconds'))}")
            else:
                table.add_row(f"  {w['worker']}", "idle" if w.get("ready") else "starting")
        return table

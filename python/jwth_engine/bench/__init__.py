"""Measurements behind `jwth-engine bench SLIDE` (slide.py): each stage of the scoring pipeline
alone, then end to end. Above `pipeline/` and `scoring/`: it measures them, they never import it."""

from .slide import BENCH_SCHEMA, PeakMemory, bench_slide, format_table

__all__ = ["BENCH_SCHEMA", "PeakMemory", "bench_slide", "format_table"]

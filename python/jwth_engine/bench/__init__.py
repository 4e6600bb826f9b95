"""Measurements behind `jwth-engine bench SLIDE` (slide.py): each stage of the scoring pipeline
alone, then end to end. Above `pipeline/` and `scoring/`: it measures them, they never import it."""

from .pooling import POOLING_SCHEMA, bench_pooling, format_pooling_table
from .slide import BENCH_SCHEMA, PeakMemory, bench_slide, format_table

__all__ = ["BENCH_SCHEMA", "POOLING_SCHEMA", "PeakMemory", "bench_pooling", "bench_slide", "format_pooling_table",
           "format_table"]

"""Writers for everything a run leaves on disk (all atomic: temp file + fsync + rename)."""

from .atomic import atomic_path, atomic_write_bytes, remove_stale_temps, sha256_file
from .summary import SUMMARY_SCHEMA, aggregate_scores, build_summary, write_summary_json
from .tiles import prob_column, tiles_table, write_tiles_parquet

__all__ = [
    "SUMMARY_SCHEMA", "aggregate_scores", "atomic_path", "atomic_write_bytes", "build_summary",
    "prob_column", "remove_stale_temps", "sha256_file", "tiles_table", "write_summary_json",
    "write_tiles_parquet",
]

"""Writers for everything a run leaves on disk (all atomic: temp file + fsync + rename)."""

from .atomic import atomic_path, atomic_write_bytes, is_disk_full, remove_stale_temps, sha256_file
from .slide_outputs import (SlideOutputs, SlideOutputWriter, load_slide_outputs, recover_slide_outputs,
                            slide_output_paths, verify_slide_outputs)
from .summary import SUMMARY_SCHEMA, aggregate_scores, build_summary, write_summary_json
from .tiles import prob_column, tiles_table, write_tiles_parquet

__all__ = [
    "SUMMARY_SCHEMA", "SlideOutputWriter", "SlideOutputs", "aggregate_scores", "atomic_path",
    "atomic_write_bytes", "build_summary", "is_disk_full", "load_slide_outputs", "prob_column",
    "recover_slide_outputs", "remove_stale_temps", "sha256_file", "slide_output_paths", "tiles_table",
    "verify_slide_outputs", "write_summary_json", "write_tiles_parquet",
]

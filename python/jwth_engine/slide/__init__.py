"""Slide readers behind one interface.

`open_slide(path)` checks the file, picks cuCIM (TIFF-based formats, after a crash-isolated probe)
or OpenSlide (everything else, and whatever cuCIM cannot decode), and returns a `Slide` whose
`info.reader` / `info.reader_note` say which and why. `resolve_mpp` turns the slide's metadata and
an optional `--mpp` into the one microns-per-pixel value the pipeline uses, or a one-line error.

Reader libraries are imported on first use, never when this package is imported.
"""

from .base import Slide, SlideInfo, level0_to_level, level_to_level0
from .factory import OPENSLIDE_ONLY, READERS, open_slide
from .mpp import MPP_MAX, MPP_MIN, resolve_mpp
from .probe import ProbeResult, probe_slide

__all__ = [
    "MPP_MAX",
    "MPP_MIN",
    "OPENSLIDE_ONLY",
    "READERS",
    "ProbeResult",
    "Slide",
    "SlideInfo",
    "level0_to_level",
    "level_to_level0",
    "open_slide",
    "probe_slide",
    "resolve_mpp",
]

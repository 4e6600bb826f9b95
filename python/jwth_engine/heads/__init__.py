"""Slide-tile heads: JWTH attention pooling and the linear probe.

`reference.py` is the readable PyTorch definition; `native.py` runs the same maths through the
fused kernels in `csrc/` (the default path); `io.py` reads and writes head files.
"""

from .io import (HeadMeta, LoadedHead, check_head_matches_backbone, load_head, random_head, read_head_meta,
                 save_head)
from .reference import HeadOutput, JwthPoolingHead, LinearProbeHead, build_head

__all__ = [
    "HeadMeta", "HeadOutput", "JwthPoolingHead", "LinearProbeHead", "LoadedHead", "build_head",
    "check_head_matches_backbone", "load_head", "random_head", "read_head_meta", "save_head",
]

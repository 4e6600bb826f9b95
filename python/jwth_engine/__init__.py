"""jwth-engine: high-throughput whole-slide scoring with JWTH attention-pooling heads.

    >>> import jwth_engine
    >>> result = jwth_engine.score_slide("slide.svs", model="jwth_vits14_reg4", out="results/")
    >>> result.summary["scores"], result.tiles.num_rows
    >>> config = jwth_engine.RunConfig.from_kwargs(model="jwth_vits14_reg4", batch_size=16)
    >>> result = jwth_engine.score_slide("slide.svs", config=config)

Heavy modules (torch, cuCIM, timm) load on first use, not at import.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("jwth-engine")
except metadata.PackageNotFoundError:  # running from a source checkout
    __version__ = "0.0.0+source"

__all__ = ["__version__", "RunConfig", "score_slide", "open_slide"]


def __getattr__(name: str):
    if name == "score_slide":
        from .scoring import score_slide

        return score_slide
    if name == "RunConfig":
        from .config import RunConfig

        return RunConfig
    if name == "open_slide":
        from .slide import open_slide

        return open_slide
    raise AttributeError(name)

"""Scoring orchestration, shared by `score`, `screen`, `bench` and `fit-head`:

    model.py   load_scoring_model  preset + weights -> backbone -> backend, head       (once)
    slide.py   SlideScorer         prepare (open, tissue, tiles, decode) -> finish       (per slide)
    api.py     score_slide         the public API: the steps above once, from a RunConfig or kwargs
    fit.py     fit_head            train a head on labelled tiles with a frozen backbone
    export.py  export_onnx, build_engine   backbone artifacts for the runtimes
"""

from .api import score_slide
from .model import ScoringModel, load_scoring_model
from .slide import PreparedSlide, ScoreResult, SlideScorer, check_out_dir, open_for_scoring, output_paths

__all__ = ["PreparedSlide", "ScoreResult", "ScoringModel", "SlideScorer", "check_out_dir", "load_scoring_model",
           "open_for_scoring", "output_paths", "score_slide"]

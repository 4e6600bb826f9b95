"""Where the declarative specs in `engine/` live at run time.

`engine/` is shipped as the package-data package `jwth_engine._specs` (see setup.py). Running from
a source checkout (PYTHONPATH=python) there is no such package, so we fall back to the repo folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def spec_root() -> Path:
    # The installed data package sits beside this module (the wheel is not zip-safe). It has no
    # __init__.py, so importlib.resources would see a namespace package and return a
    # MultiplexedPath rather than a folder: look for the folder directly.
    installed = Path(__file__).resolve().parent / "_specs"
    if (installed / "presets").is_dir():
        return installed
    source_tree = Path(__file__).resolve().parents[2] / "engine"
    if source_tree.is_dir():
        return source_tree
    raise FileNotFoundError("jwth_engine's spec files (engine/) are not installed; reinstall the package")


def spec_path(*parts: str) -> Path:
    return spec_root().joinpath(*parts)

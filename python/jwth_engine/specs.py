"""Where the declarative specs in `engine/` live at run time.

`engine/` is shipped as the package-data package `jwth_engine._specs` (see setup.py). Running from
a source checkout (PYTHONPATH=python) there is no such package, so we fall back to the repo folder.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path


@lru_cache(maxsize=1)
def spec_root() -> Path:
    try:
        root = Path(str(resources.files("jwth_engine._specs")))
        if root.is_dir():
            return root
    except ModuleNotFoundError:
        pass
    source_tree = Path(__file__).resolve().parents[2] / "engine"
    if source_tree.is_dir():
        return source_tree
    raise FileNotFoundError("jwth_engine's spec files (engine/) are not installed; reinstall the package")


def spec_path(*parts: str) -> Path:
    return spec_root().joinpath(*parts)

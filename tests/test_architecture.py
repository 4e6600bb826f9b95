"""The package's structure, read from its source with `ast` (nothing imported, nothing run):

* layers import downward only: cli -> scoring / screen / bench -> pipeline -> heads / backends /
  models / slide -> outputs / errors, every import counted, function-level ones included;
* no cycle between the packages of one layer;
* every setting has one default, declared in config.py: no function re-declares a config field's
  default as a literal, and no command-line option declares a default of its own.
"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from jwth_engine.config import GROUPS, TrainingConfig

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "jwth_engine"

# Top to bottom; a module may import its own layer or a lower one. Top-level modules are placed
# by what they are: the public API (package __init__) sits with the CLI; runtime composes the
# backends' probes; tissue / tiling / preprocess / _native sit with the readers and backends.
LAYERS = [
    {"jwth_engine", "cli"},
    {"scoring", "screen", "bench", "embed", "regions"},
    {"pipeline", "runtime"},
    {"heads", "backends", "models", "slide", "tissue", "tiling", "preprocess", "_native", "_C"},
    {"outputs", "errors", "config", "specs", "lifetime"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(absolute jwth_engine module, line) of every import in the file, at any depth."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == "jwth_engine":
                # `from . import x` / `from .. import config`: each name is a module
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((target, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "jwth_engine"]


def _unit(module: str) -> str:
    """The layer unit of a module: its first component below jwth_engine (or jwth_engine itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _graph() -> list[tuple[str, str, str, int]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target, line in _imports(path):
            edges.append((source, target, str(path.relative_to(PACKAGE.parent)), line))
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(RANK) == set(), "place these modules in a layer (here and in README's Development section)"


def test_imports_run_downward_only():
    upward = [f"{where}:{line}: {source} imports {target}"
              for source, target, where, line in _graph()
              if RANK[_unit(target)] < RANK[_unit(source)]]
    assert upward == []


def test_no_cycle_between_packages_of_a_layer():
    deps: dict[str, set[str]] = {}
    for source, target, _, _ in _graph():
        a, b = _unit(source), _unit(target)
        if a != b and a != "jwth_engine":
            deps.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in deps.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(a for a in deps if reaches(a, a, {a}))
    assert cycles == []


def test_graph_parser_sees_function_level_imports(tmp_path):
    """The check above can fail: an upward import inside a function is seen."""
    probe = PACKAGE / "pipeline" / "streaming.py"
    targets = {t for t, _ in _imports(probe)}
    assert "jwth_engine.tiling" in targets and "jwth_engine.config" in targets
    fake = tmp_path / "jwth_engine" / "pipeline" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..scoring import score_slide\n")
    assert _imports(fake, tmp_path / "jwth_engine") == [("jwth_engine.scoring", 2)]


# --- one default per setting ------------------------------------------------------------------------

SETTINGS = {f.name: f.default for cls in (*GROUPS.values(), TrainingConfig) for f in fields(cls)}


def _library_files():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "config.py"]


def test_settings_are_declared_once():
    """A parameter named like a setting never spells out the setting's default as a literal (it
    refers to the config, e.g. `TilingConfig.min_tissue`), and no click option re-declares a
    setting's default (cli/options.py generates those options from config). A same-named option
    with another meaning and default (export-onnx's --precision fp32) is a different setting."""
    redeclared = []
    for path in _library_files():
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                positional = a.posonlyargs + a.args
                defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
                for arg, default in [*zip(positional, defaults), *zip(a.kwonlyargs, a.kw_defaults)]:
                    if (arg.arg in SETTINGS and isinstance(default, ast.Constant)
                            and default.value is not None and default.value == SETTINGS[arg.arg]):
                        redeclared.append(f"{where}:{node.lineno}: {node.name}({arg.arg}={default.value!r})")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "option":
                flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                names = {f.lstrip("-").replace("-", "_") for f in flags} & set(SETTINGS)
                for k in node.keywords:
                    if (k.arg == "default" and isinstance(k.value, ast.Constant)
                            and any(k.value.value == SETTINGS[n] for n in names)):
                        redeclared.append(f"{where}:{node.lineno}: click option {flags} re-declares its default")
    assert redeclared == []


@pytest.mark.parametrize("literal", ["jwth_vitl14_reg4"])
def test_default_preset_named_once(literal):
    holders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if f'"{literal}"' in p.read_text()]
    assert holders == ["jwth_engine/config.py"]


def test_defaults_check_can_fail(tmp_path):
    """The AST rule flags a literal re-declaration (so the test above is not vacuous)."""
    tree = ast.parse("def plan(min_tissue: float = 0.25, batch_size=32): pass")
    args = tree.body[0].args
    flagged = [a.arg for a, d in zip(args.args, args.defaults) if d.value == SETTINGS[a.arg]]
    assert flagged == ["min_tissue", "batch_size"]

"""Click options generated from the configuration's declarations (jwth_engine.config): the name,
type, choices, default and help of each option are those of its config field, so a setting is
declared once and every command that takes its group gets the same option. Bounds are checked
by the config itself (one check, the same for the API), not by click."""

from __future__ import annotations

from dataclasses import fields

import click

from ..config import GROUPS, RunConfig, flag_of

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}


def _option(f):
    meta = f.metadata
    if meta["negate_flag"]:
        # A None default ("let the backend decide") that the user can only turn off.
        return click.option(meta["negate_flag"], f"no_{f.name}", is_flag=True, help=meta["help"])
    if meta["kind"] is bool and f.default is False:
        return click.option(flag_of(f.name), f.name, is_flag=True, help=meta["help"] or None)
    if meta["choices"] is not None:
        kind = click.Choice(list(meta["choices"]))
    elif meta["path"]:
        kind = click.Path(exists=True, dir_okay=False)
    else:
        kind = _CLICK_TYPES[meta["kind"]]
    return click.option(flag_of(f.name), f.name, type=kind, default=f.default, metavar=meta["metavar"],
                        show_default=f.default is not None, help=meta["help"] or None)


def config_options(*groups, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None):
    """Decorator: one option per field of the given config groups (classes or RunConfig group
    names), less `exclude`, or only the fields named in `only`."""
    classes = [GROUPS[g] if isinstance(g, str) else g for g in groups]
    decorators = [_option(f) for cls in classes for f in fields(cls)
                  if f.metadata["cli"] and f.name not in exclude and (only is None or f.name in only)]

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def pop_settings(kwargs: dict, cls) -> dict:
    """Take the fields of `cls` (a config group) out of a command's keyword arguments."""
    out = {}
    for f in fields(cls):
        if f.metadata["negate_flag"] and f"no_{f.name}" in kwargs:
            out[f.name] = False if kwargs.pop(f"no_{f.name}") else None
        elif f.name in kwargs:
            out[f.name] = kwargs.pop(f.name)
    return out


def run_config(kwargs: dict, **extra) -> RunConfig:
    """The RunConfig of a command's options (removed from `kwargs`), plus `extra` settings."""
    settings = {}
    for cls in GROUPS.values():
        settings.update(pop_settings(kwargs, cls))
    return RunConfig.from_kwargs(**settings, **extra)

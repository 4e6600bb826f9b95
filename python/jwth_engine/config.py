"""The run configuration: one frozen, grouped object per run, built once at the edge (CLI or API
call) and passed down. It is the only owner of defaults, of their checks and of their resolution.

    >>> from jwth_engine.config import RunConfig
    >>> config = RunConfig.from_kwargs(model="jwth_vits14_reg4", batch_size=16)
    >>> config.runtime.batch_size, config.to_dict()["tiling"]["min_tissue"]
    (16, 0.25)

Groups: `model` (what decides the network), `runtime` (how fast it runs), `tiling` (which pixels
are scored), `aggregation` (tile probabilities -> slide score), `output` (where results go).
Each field is declared once, with `setting(...)`: its default, its check (choices, bounds) and its
command-line help. The CLI generates its options from these declarations (cli/options.py), the
summary and the screening ledger store `to_dict()`, and `from_dict()` reads it back exactly. To add
an option, add a field to a group (or a group to `GROUPS`); nothing else re-declares it.

Some defaults depend on files: the backbone preset, the head kind, the tile size and the target
resolution come from the head file's metadata when a head is given, else from the preset, else
from the built-in defaults below. `RunConfig.model_name` and `RunConfig.resolve` apply that rule;
they take the head metadata and the preset as plain data, so this module imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import ConfigError

CONFIG_SCHEMA = "jwth-engine/run-config/v1"

DEFAULT_PRESET = "jwth_vitl14_reg4"
DEFAULT_POOLING = "jwth"
DEFAULT_CLASSES = ("negative", "positive")

POOLINGS = ("jwth", "linear-probe")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "null")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
READERS = ("auto", "cucim", "openslide")
DECODES = ("auto", "gpu", "cpu", "cucim", "openslide")   # slide/decoding.py resolves them


def setting(default: Any, *, help: str = "", choices: tuple | None = None, min: float | None = None,
            max: float | None = None, min_exclusive: bool = False, kind: type | None = None,
            flag: str | None = None, metavar: str | None = None, path: bool = False,
            cli: bool = True, negate_flag: str | None = None) -> Any:
    """A config field: default, check and CLI description in one place.

    `kind` is the value's type when it is not None (int, float, str, bool); `path` marks a file
    the CLI checks exists; `flag` overrides the option name derived from the field name;
    `negate_flag` turns a None-default bool into a `--no-x` switch that sets False; `cli=False`
    keeps a field out of the generated options."""
    return field(default=default, metadata={
        "help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
        "kind": kind if kind is not None else type(default), "flag": flag, "metavar": metavar,
        "path": path, "cli": cli, "negate_flag": negate_flag,
    })


def flag_of(name: str) -> str:
    """The command-line option of a config field (its `flag`, else --field-name)."""
    for group in (*GROUPS.values(), TrainingConfig):
        for f in fields(group):
            if f.name == name:
                return f.metadata["flag"] or f.metadata["negate_flag"] or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


class _Group:
    """Checks every field against its declaration when the (frozen) group is built."""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _checked(f, value):
    meta, name = f.metadata, f.name
    if value is None:
        if f.default is not None:
            raise ConfigError(f"{name} must be given (default {f.default!r}), got None", field=name)
        return None
    kind = meta["kind"]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}", field=name)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{name} must be an integer, got {value!r}", field=name)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}", field=name)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value}", field=name)
    elif kind is str:
        if hasattr(value, "__fspath__"):
            value = str(value.__fspath__())
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}", field=name)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}", field=name)
    low, high = meta["min"], meta["max"]
    if low is not None and (value <= low if meta["min_exclusive"] else value < low):
        raise ConfigError(f"{name} must be {'>' if meta['min_exclusive'] else '>='} {low:g}, got {value}",
                          field=name)
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {high:g}, got {value}", field=name)
    return value


@dataclass(frozen=True)
class ModelConfig(_Group):
    """What decides the network: backbone, weights, head. Changing any of these changes scores."""

    model: str | None = setting(None, kind=str, metavar="PRESET|FILE.json",
                                help=f"Backbone preset name or preset JSON (default: the head's preset, else "
                                     f"{DEFAULT_PRESET}). `jwth-engine doctor` lists them.")
    weights: str | None = setting(None, kind=str, path=True,
                                  help="Backbone checkpoint (.safetensors, or .pt/.pth/.bin loaded with weights_only).")
    head: str | None = setting(None, kind=str, path=True,
                               help="Head file (.safetensors from fit-head). Without it a random head is used.")
    pooling: str | None = setting(None, kind=str, choices=POOLINGS,
                                  help=f"Head kind when no --head is given (default {DEFAULT_POOLING}).")
    seed: int = setting(0, help="Seed of random weights/heads.")


@dataclass(frozen=True)
class RuntimeConfig(_Group):
    """How the network runs: only speed and numerics within the backends' tolerances."""

    device: str = setting("auto", choices=DEVICES)
    backend: str = setting("auto", choices=BACKENDS,
                           help="Backbone runtime; auto = TensorRT with a GPU when installed, else torch; null = no "
                                "backbone (fixed tokens: feed-rate benchmarks only, scores meaningless).")
    precision: str = setting("auto", choices=PRECISIONS, help="auto = bf16 (GPU and CPU); fp32 forces full precision.")
    compile: bool | None = setting(None, kind=bool, negate_flag="--no-compile",
                                   help="Disable torch.compile / CUDA graphs in the torch backend.")
    batch_size: int = setting(32, min=1, help="Tiles per backbone batch.")
    num_workers: int = setting(2, min=0, flag="--workers", help="Decode threads.")


@dataclass(frozen=True)
class TilingConfig(_Group):
    """Which pixels are scored: resolution, tile size, tissue threshold, reader."""

    mpp: float | None = setting(None, kind=float, min=0, min_exclusive=True,
                                help="Override the slide's microns per pixel at level 0.")
    tile_size: int | None = setting(None, kind=int, min=16,
                                    help="Model input size in px (default: head's, else preset's, 224).")
    target_mpp: float | None = setting(None, kind=float, min=0.01,
                                       help="Resolution the tiles are cut at (default: head's, else preset's, 0.5).")
    min_tissue: float = setting(0.25, min=0.0, max=1.0, help="Tiles with a smaller tissue fraction are not scored.")
    reader: str = setting("auto", choices=READERS,
                          help="Slide reader (metadata, tissue thumbnail, and tiles when not decoded raw).")
    decode: str = setting("auto", choices=DECODES,
                          help="Tile decoder: gpu/cpu = stored tiles batch-decoded by nvImageCodec; cucim/openslide = "
                               "that reader; auto = gpu with a GPU model, else cpu, else the reader.")


@dataclass(frozen=True)
class AggregationConfig(_Group):
    """Tile probabilities -> slide scores."""

    top_k: int = setting(16, min=1, help="Slide score also reports the mean of the k highest tile probabilities.")


@dataclass(frozen=True)
class OutputConfig(_Group):
    """Where results go: `out` None = return them without writing."""

    out: str | None = setting(None, kind=str, cli=False, help="Output folder (created).")


@dataclass(frozen=True)
class TrainingConfig(_Group):
    """`fit-head` only: how the head is trained (the backbone, runtime and tiling come from RunConfig)."""

    num_heads: int = setting(8, min=1, help="Attention heads of the JWTH pooling (must divide the embedding dim).")
    epochs: int = setting(50, min=1)
    lr: float = setting(1e-3, min=0.0, min_exclusive=True, help="AdamW learning rate.")
    val_fraction: float = setting(0.2, min=0.0, max=0.9, help="Share of each class held out for validation.")


@dataclass(frozen=True)
class SlideTrainingConfig(_Group):
    """`fit-slide-head` only: how a slide head is trained on per-slide feature files (heads/fit_slide.py)."""

    head: str = setting("abmil", choices=("abmil", "wsc", "mean", "max"),
                        help="Slide head: gated attention MIL, Whole Slide Concepts reducer, mean or max pooling.")
    hidden: int = setting(128, min=1, help="Width of the attention MLP (abmil, wsc).")
    num_heads: int = setting(4, min=1, help="Attention heads of the wsc reducer.")
    dropout: float = setting(0.25, min=0.0, max=0.9)
    lr: float = setting(2e-4, min=0.0, min_exclusive=True, help="AdamW learning rate.")
    weight_decay: float = setting(1e-4, min=0.0)
    epochs: int = setting(50, min=1, help="Most epochs (early stopping may end sooner).")
    patience: int = setting(10, min=1, help="Stop after this many epochs without a better validation balanced accuracy.")
    bags_per_step: int = setting(1, min=1, help="Bags whose gradients are summed per optimiser step.")
    val_fraction: float = setting(0.2, min=0.0, max=0.9,
                                  help="Share of each class's patients held out for early stopping (no `split` column).")
    folds: int | None = setting(None, kind=int, min=2, help="K-fold cross-validation by patient.")
    seed: int = setting(0, help="Seed of initialisation, shuffling and splits.")
    cache_gb: float = setting(8.0, min=0.0, help="Keep the bags in memory when they fit in this much; "
                                                 "else read each bag when needed.")
    regions: bool = setting(False, help="Bags of region embeddings (region HDF5 from embed-regions, encoded by "
                                        "--region-encoder), reported beside the same head on the tiles of "
                                        "--baseline-magnification alone.")
    region_encoder: str | None = setting(None, kind=str, path=True, metavar="ENC.safetensors",
                                         help="Region encoder from pretrain-regions (--regions).")
    embedding: str = setting("mean", choices=("mean", "cls"),
                             help="Region embedding (--regions): mean of the contextualised tiles, or the "
                                  "compressed class token.")
    baseline_magnification: float = setting(20.0, min=0.0, min_exclusive=True,
                                            help="Magnification whose tiles alone form the baseline bags (--regions).")


GROUPS: dict[str, type] = {"model": ModelConfig, "runtime": RuntimeConfig, "tiling": TilingConfig,
                           "aggregation": AggregationConfig, "output": OutputConfig}


def _field_groups() -> dict[str, str]:
    owner: dict[str, str] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            if f.name in owner:
                raise TypeError(f"config field {f.name} is declared in both {owner[f.name]} and {group}")
            owner[f.name] = group
    return owner


FIELD_GROUP = _field_groups()    # field name -> group name; field names are unique across groups


def field_default(name: str) -> Any:
    """The one default of a config field (for help texts and signatures that must show it)."""
    cls = GROUPS[FIELD_GROUP[name]]
    return next(f.default for f in fields(cls) if f.name == name)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "RunConfig":
        """Flat keyword arguments (`batch_size=16, model=...`), as `score_slide` and the CLI take them."""
        unknown = sorted(set(kwargs) - set(FIELD_GROUP))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        grouped: dict[str, dict] = {name: {} for name in GROUPS}
        for key, value in kwargs.items():
            grouped[FIELD_GROUP[key]][key] = value
        return cls(**{name: GROUPS[name](**values) for name, values in grouped.items()})

    @classmethod
    def given(cls, config: "RunConfig | None", settings: Mapping) -> "RunConfig":
        """How the API's entry points take settings: a RunConfig, or its fields as keyword arguments."""
        if config is None:
            return cls.from_kwargs(**settings)
        if settings:
            raise ConfigError(f"pass either config or settings, not both (got {', '.join(sorted(settings))})")
        return config

    def with_values(self, **kwargs) -> "RunConfig":
        """A copy with some fields changed (checked like any other)."""
        unknown = sorted(set(kwargs) - set(FIELD_GROUP))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        groups = {}
        for name in GROUPS:
            changes = {k: v for k, v in kwargs.items() if FIELD_GROUP[k] == name}
            groups[name] = replace(getattr(self, name), **changes) if changes else getattr(self, name)
        return RunConfig(**groups)

    def flat(self) -> dict:
        return {k: v for name in GROUPS for k, v in getattr(self, name).to_dict().items()}

    def to_dict(self) -> dict:
        return {"schema": CONFIG_SCHEMA, **{name: getattr(self, name).to_dict() for name in GROUPS}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "RunConfig":
        """The inverse of `to_dict`; unknown groups or fields are an error, missing ones default."""
        data = dict(data)
        schema = data.pop("schema", CONFIG_SCHEMA)
        if schema != CONFIG_SCHEMA:
            raise ConfigError(f"configuration schema {schema!r} is not {CONFIG_SCHEMA!r}")
        unknown = sorted(set(data) - set(GROUPS))
        if unknown:
            raise ConfigError(f"unknown configuration group(s): {', '.join(unknown)}")
        groups = {}
        for name, values in data.items():
            extra = sorted(set(values) - {f.name for f in fields(GROUPS[name])})
            if extra:
                raise ConfigError(f"unknown setting(s) in {name}: {', '.join(extra)}")
            groups[name] = GROUPS[name](**values)
        return cls(**groups)

    # --- defaults that depend on files: head metadata -> preset -> built-in ------------------------

    def model_name(self, head_meta=None) -> str:
        """The backbone preset (name or JSON path) to load: --model, else the head's, else the default."""
        if self.model.model:
            return self.model.model
        return _meta(head_meta, "backbone_preset") or DEFAULT_PRESET

    def needs_preset(self, head_meta=None) -> bool:
        """Whether `resolve` needs the preset (a setting left to it by both the config and the head)."""
        return not ((self.tiling.tile_size or _meta(head_meta, "tile_size"))
                    and (self.tiling.target_mpp or _meta(head_meta, "target_mpp")))

    def resolve(self, head_meta=None, preset=None) -> "ResolvedConfig":
        """Fill the file-dependent defaults. `head_meta`: the head file's metadata (HeadMeta or its
        dict) or None; `preset`: the loaded preset (`name`, `input_size`, `native_mpp`), which may
        be None when `needs_preset` says so."""
        head_pooling = _meta(head_meta, "pooling")
        pooling = self.model.pooling
        if head_pooling is not None and pooling is not None and pooling != head_pooling:
            raise ConfigError(f"{self.model.head}: head file is a {head_pooling} head but pooling "
                              f"{pooling} was given", field="pooling")
        if preset is None and self.needs_preset(head_meta):
            raise ValueError("resolve: the preset is needed to fill tile_size / target_mpp")
        tile_size = self.tiling.tile_size or _meta(head_meta, "tile_size") or preset.input_size
        target_mpp = self.tiling.target_mpp or _meta(head_meta, "target_mpp") or preset.native_mpp
        return ResolvedConfig(config=self, preset=preset.name if preset is not None else self.model_name(head_meta),
                              pooling=head_pooling or pooling or DEFAULT_POOLING, tile_size=int(tile_size),
                              target_mpp=float(target_mpp))


def _meta(head_meta, key: str):
    if head_meta is None:
        return None
    return head_meta.get(key) if isinstance(head_meta, Mapping) else getattr(head_meta, key, None)


@dataclass(frozen=True)
class ResolvedConfig:
    """A RunConfig with its file-dependent defaults filled in: what a run actually used."""

    config: RunConfig
    preset: str
    pooling: str
    tile_size: int
    target_mpp: float

    def to_dict(self) -> dict:
        return {"preset": self.preset, "pooling": self.pooling, "tile_size": self.tile_size,
                "target_mpp": self.target_mpp}

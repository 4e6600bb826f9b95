"""The run configuration: defaults, checks, resolution, exact serialisation, and errors in the
API's words that the CLI turns into flags."""

from __future__ import annotations

import json
import subprocess

import pytest

from jwth_engine.config import (DEFAULT_PRESET, RunConfig, TilingConfig, TrainingConfig, field_default,
                                flag_of)
from jwth_engine.errors import ConfigError
from jwth_engine.heads import HeadMeta


def test_defaults_and_groups():
    config = RunConfig()
    assert config.runtime.batch_size == field_default("batch_size") == 32
    assert config.tiling.min_tissue == TilingConfig.min_tissue == 0.25
    assert config.aggregation.top_k == 16 and config.model.model is None and config.output.out is None
    flat = RunConfig.from_kwargs(model="m", batch_size=8, min_tissue=0.5, top_k=3, out="o")
    assert (flat.model.model, flat.runtime.batch_size, flat.tiling.min_tissue, flat.aggregation.top_k,
            flat.output.out) == ("m", 8, 0.5, 3, "o")


def test_round_trip_is_exact():
    config = RunConfig.from_kwargs(model="test_tiny_patch14_reg4", weights="/w.safetensors", pooling="linear-probe",
                                   seed=3, device="cpu", backend="torch", precision="fp32", compile=False,
                                   batch_size=7, num_workers=0, mpp=0.25, tile_size=224, target_mpp=1.0,
                                   min_tissue=0.0, reader="openslide", top_k=1, out="results")
    data = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(data) == config
    assert RunConfig.from_dict(data).to_dict() == config.to_dict()
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(min_tissue=1.5), "min_tissue must be <= 1, got 1.5"),
    (dict(min_tissue=-0.1), "min_tissue must be >= 0, got -0.1"),
    (dict(top_k=0), "top_k must be >= 1, got 0"),
    (dict(num_workers=-1), "num_workers must be >= 0"),
    (dict(mpp=0), "mpp must be > 0"),
    (dict(device="tpu"), "device must be one of auto, cpu, cuda; got 'tpu'"),
    (dict(batch_size="8"), "batch_size must be an integer"),
    (dict(min_tissue=float("nan")), "min_tissue must be finite"),
    (dict(batchsize=8), "unknown setting"),
])
def test_checked_once_at_construction_in_the_apis_words(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        RunConfig.from_kwargs(**kwargs)
    assert "--" not in str(info.value)
    if info.value.field:
        assert info.value.cli_message(flag_of(info.value.field)).startswith(flag_of(info.value.field))


def test_from_dict_rejects_unknown_keys():
    data = RunConfig().to_dict()
    data["runtime"]["turbo"] = True
    with pytest.raises(ConfigError, match="unknown setting.*turbo"):
        RunConfig.from_dict(data)
    with pytest.raises(ConfigError, match="schema"):
        RunConfig.from_dict({**RunConfig().to_dict(), "schema": "jwth-engine/run-config/v0"})


class _Preset:
    name, input_size, native_mpp = "p", 256, 0.75


def test_resolution_head_then_preset_then_builtin():
    head = HeadMeta(pooling="linear-probe", classes=["a", "b"], num_heads=0, dim=96, num_prefix_tokens=5,
                    backbone_preset="from_head", backbone_weights_hash="x", tile_size=224, target_mpp=0.5)
    config = RunConfig()
    assert config.model_name() == DEFAULT_PRESET and config.model_name(head) == "from_head"
    assert RunConfig.from_kwargs(model="mine").model_name(head) == "mine"
    r = config.resolve(head, _Preset())
    assert (r.pooling, r.tile_size, r.target_mpp) == ("linear-probe", 224, 0.5)
    r = config.resolve(None, _Preset())
    assert (r.preset, r.pooling, r.tile_size, r.target_mpp) == ("p", "jwth", 256, 0.75)
    r = RunConfig.from_kwargs(tile_size=128, target_mpp=2.0).resolve(head, _Preset())
    assert (r.tile_size, r.target_mpp) == (128, 2.0)
    assert not config.needs_preset(head) and config.needs_preset(None)
    with pytest.raises(ConfigError, match="pooling jwth was given") as info:
        RunConfig.from_kwargs(head="h.safetensors", pooling="jwth").resolve(head, _Preset())
    assert "--pooling jwth" in info.value.cli_message(flag_of("pooling"))


def test_training_config_checks():
    assert TrainingConfig().epochs == 50
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        TrainingConfig(epochs=0)
    with pytest.raises(ConfigError, match="val_fraction must be <= 0.9"):
        TrainingConfig(val_fraction=0.95)


def test_score_slide_takes_config_or_kwargs_not_both(cmu_small):
    import jwth_engine

    with pytest.raises(ConfigError, match="either config or settings"):
        jwth_engine.score_slide(cmu_small, config=RunConfig(), batch_size=8)
    with pytest.raises(ConfigError, match="^batch_size must be >= 1"):
        jwth_engine.score_slide(cmu_small, batch_size=0)


def test_cli_names_the_flag(cli_cmd, cmu_small, tmp_path):
    proc = subprocess.run([*cli_cmd, "score", str(cmu_small), "--batch-size", "0", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --batch-size must be >= 1, got 0"
    assert not (tmp_path / "o").exists()
    proc = subprocess.run([*cli_cmd, "score", str(cmu_small), "--min-tissue", "2", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.stderr.strip().splitlines()[-1] == "error: --min-tissue must be <= 1, got 2.0"

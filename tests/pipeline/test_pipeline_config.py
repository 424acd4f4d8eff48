"""pipeline.config: defaults, YAML + --set overrides, unknown keys, type errors, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, build_config, config_to_dict, dump_config, load_config
from pipeline_helpers import REPO


def test_defaults_are_valid_and_follow_the_paper():
    cfg = build_config()
    assert isinstance(cfg, Config)
    assert cfg.data.split == [0.7, 0.1, 0.2]
    assert cfg.augment.dropout_max == 0.2 and cfg.augment.noise_std == 1.5 and cfg.augment.pepper_p == 0.3
    assert cfg.method.name == "myow" and cfg.method.k == 5 and cfg.optim.batch_size == 512
    assert cfg.metrics.port == 0 and cfg.metrics.host == "127.0.0.1"


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  batch_size: 64\nmethod:\n  name: byol\n")
    cfg = load_config(path, ["optim.lr=2e-5", "data.split=[0.8, 0.1, 0.1]", "run.dir=null",
                             "model.projector=[64, 16]", "train.epochs=1e3", "data.path=s3://bucket/x.zarr"])
    assert cfg.optim.lr == pytest.approx(2e-5)  # PyYAML reads 2e-5 as a string: still a float here
    assert cfg.optim.batch_size == 64 and cfg.method.name == "byol"
    assert cfg.data.split == [0.8, 0.1, 0.1] and cfg.run.dir is None
    assert cfg.model.projector == [64, 16] and cfg.train.epochs == 1000
    assert cfg.data.path == "s3://bucket/x.zarr"


def test_byol_forces_mining_weight_zero():
    assert build_config(overrides=["method.name=byol", "method.mining_weight=1.0"]).effective_mining_weight == 0.0
    assert build_config(overrides=["method.mining_weight=0.5"]).effective_mining_weight == 0.5


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("optim.lr=fast", "config key 'optim.lr': expected a number"),
    ("optim.batch_size=1.5", "config key 'optim.batch_size': expected an integer"),
    ("augment.structured=maybe", "config key 'augment.structured'"),
    ("data.split=0.7", "config key 'data.split': expected a list"),
    ("optim=3", "config key 'optim'"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("data.split=[0.5, 0.1, 0.1]", "sum to 1"),
    ("method.name=vicreg", "method.name"),
    ("optim.name=lars", "optim.name"),
    ("augment.dropout_max=1.5", "augment.dropout_max"),
    ("no_equals_sign", "expected key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_and_bad_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_round_trip_through_yaml_and_dict(tmp_path: Path):
    cfg = build_config(overrides=["optim.lr=0.01", "data.min_time_gap_s=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert build_config(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["reach_myow", "reach_byol", "reach_supervised", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.method.name in ("myow", "byol", "supervised")


def test_reach_byol_differs_from_myow_only_by_method_name():
    myow = config_to_dict(load_config(REPO / "configs" / "reach_myow.yaml"))
    byol = config_to_dict(load_config(REPO / "configs" / "reach_byol.yaml"))
    assert myow["method"].pop("name") == "myow" and byol["method"].pop("name") == "byol"
    assert myow == byol

"""Hydra composition, run-config translation and setting checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from scenarios.spec import TaskSpec
from server.config import compose_config, overrides_from_run_config, task_spec, validate_config
from strategies.factory import build_strategy


def test_compose_defaults() -> None:
    cfg = compose_config(["output_dir=/tmp/unused"])

    assert cfg.scenario.name == "fraud"
    assert cfg.strategy.name == "fedavg"
    assert cfg.nodes == 5
    assert cfg.train.lr == cfg.scenario.train.lr


@pytest.mark.parametrize("scenario", ["fraud", "maintenance", "imaging", "recommendations"])
def test_compose_each_scenario(scenario: str) -> None:
    cfg = compose_config([f"scenario={scenario}", "rounds=2"])

    assert cfg.scenario.name == scenario
    assert cfg.rounds == 2


def test_unknown_group_option_lists_choices() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["scenario=frad"])

    message = str(error.value)
    assert "frad" in message
    assert "fraud" in message
    assert "maintenance" in message


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["roundz=3"])

    assert "roundz" in str(error.value)


def test_typo_on_command_line_fails() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.train", "scenario=maintenence"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode != 0
    assert "maintenence" in result.stderr
    assert "Available options" in result.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [("nodes=0", "nodes"), ("rounds=0", "rounds"), ("train.fraction=1.5", "train.fraction"), ("train.lr=0", "train.lr")],
)
def test_validate_names_bad_setting(override: str, key: str) -> None:
    cfg = compose_config([override])

    with pytest.raises(ValueError) as error:
        validate_config(cfg)

    assert f"Invalid setting {key}=" in str(error.value)


def test_unknown_strategy_lists_valid_names() -> None:
    cfg = compose_config([])
    cfg.strategy.name = "fedmagic"

    with pytest.raises(ValueError) as error:
        build_strategy(cfg, sink=None)

    assert "fedmagic" in str(error.value)
    assert "fedavg" in str(error.value)


def test_run_config_to_overrides() -> None:
    run_config = {"scenario": "imaging", "strategy": "fedavg", "overrides": "rounds=2 'nodes=3'", "output-dir": ""}

    assert overrides_from_run_config(run_config) == ["scenario=imaging", "strategy=fedavg", "rounds=2", "nodes=3"]


def test_task_spec_round_trip(tmp_path) -> None:
    cfg = compose_config(["scenario=maintenance", "nodes=3", "seed=7", f"data.root={tmp_path}"])

    spec = task_spec(cfg)
    again = TaskSpec.from_json(spec.to_json())

    assert again == spec
    assert spec.partition.num_nodes == 3
    assert spec.partition.seed == 7
    assert spec.data_root == str(tmp_path)
    assert spec.round_seed(2, 1) != spec.round_seed(2, 0)
    assert spec.round_seed(2, 1) != spec.round_seed(3, 1)

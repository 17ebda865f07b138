"""Sweep presets, per-job failure records and quiet console mode, without starting Ray."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from server.config import CONF_DIR
from server.console import quiet_console
from server.jobs import FAILED_NAME, FailedJobs, sweep_group, write_failure


def _expand(preset: str, *extra: str) -> list[list[str]]:
    """Return the jobs Hydra's basic sweeper launches for ``-m +sweep=PRESET EXTRA...``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={preset}"], return_hydra_config=True)
    params = {key: str(value) for key, value in cfg.hydra.sweeper.params.items()}
    for override in extra:
        key, value = override.split("=", 1)
        params[key] = value
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batch


def test_robustness_preset_expands() -> None:
    jobs = _expand("robustness")

    assert len(jobs) == 7 * 8
    assert ["strategy=trust", "attack=sign_flip", "attack.fraction=0.2"] in jobs
    assert ["strategy=fedavg", "attack=none", "attack.fraction=0.2"] in jobs


def test_robustness_preset_takes_command_line_lists() -> None:
    jobs = _expand("robustness", "attack.fraction=0.2,0.4", "strategy=fedavg,trust")

    assert len(jobs) == 2 * 8 * 2


def test_encryption_preset_expands() -> None:
    jobs = _expand("encryption")

    assert jobs == [
        ["strategy=fedavg", "security=tenseal_default", "security.update_bound=5"],
        ["strategy=he_fedavg", "security=tenseal_default", "security.update_bound=5"],
    ]


def test_privacy_preset_expands() -> None:
    jobs = _expand("privacy_utility")

    assert [job[1] for job in jobs] == ["privacy.target_epsilon=1", "privacy.target_epsilon=3", "privacy.target_epsilon=8"]
    assert all(job[0] == "privacy=dp_sgd" for job in jobs)


def test_preset_sets_run_settings() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=robustness", "attack=sign_flip"], return_hydra_config=True)

    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert subdir == "${hydra.job.num}_${scenario.name}_${strategy.name}_${attack.name}"
    assert cfg.attack.name == "sign_flip"
    assert cfg.nodes == 10
    assert cfg.rounds == 8
    assert cfg.data.holdout == 200
    assert cfg.evaluate.fraction == 0.0
    assert cfg.tracking.name == "wandb"


def test_sweep_group_from_folder() -> None:
    assert sweep_group(Path("multirun/2026-12-05/10-00-00")) == "2026-12-05_10-00-00"
    assert sweep_group(Path("/tmp/sweep")) == "tmp_sweep"


def test_write_failure_record(tmp_path: Path) -> None:
    try:
        raise ValueError("Invalid setting train.lr=-1")
    except ValueError as error:
        path = write_failure(tmp_path / "job", error, ["train.lr=-1"])

    record = json.loads(path.read_text())
    assert path.name == FAILED_NAME
    assert record["status"] == "failed"
    assert record["error"] == "ValueError"
    assert record["message"] == "Invalid setting train.lr=-1"
    assert record["overrides"] == ["train.lr=-1"]
    assert "raise ValueError" in record["traceback"]


def test_failed_jobs_callback_lists_jobs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("0_fraud_fedavg", "1_fraud_fedavg", "2_fraud_trust"):
        (tmp_path / name).mkdir()
    (tmp_path / "1_fraud_fedavg" / FAILED_NAME).write_text("{}")
    config = {"hydra": {"sweep": {"dir": str(tmp_path)}}}

    with caplog.at_level(logging.ERROR):
        FailedJobs().on_multirun_end(OmegaConf.create(config))

    assert "1 job(s) of the sweep" in caplog.text
    assert "1_fraud_fedavg" in caplog.text
    assert "2_fraud_trust" not in caplog.text


def test_quiet_console_keeps_file_handler(tmp_path: Path) -> None:
    root = logging.getLogger()
    flower = logging.getLogger("flwr")
    flower_level = flower.level
    console = logging.StreamHandler(sys.stdout)
    log_file = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(console)
    root.addHandler(log_file)
    try:
        quiet_console()

        assert console.level == logging.WARNING
        assert log_file.level == logging.NOTSET
        assert flower.level == logging.WARNING
    finally:
        root.removeHandler(console)
        root.removeHandler(log_file)
        log_file.close()
        flower.setLevel(flower_level)

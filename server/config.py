"""Turn the Hydra configuration into what the runtime needs.

``compose_config`` builds the same configuration that ``fedseal-train`` gets,
for callers outside ``@hydra.main`` (the ServerApp under ``flwr run``, tests).
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from privacy import task_privacy
from scenarios.base import PartitionSettings, TrainSettings
from scenarios.datasets import resolve_data_root
from scenarios.spec import TaskSpec

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides`` (``key=value`` strings).

    Raises Hydra's own errors for unknown keys or group options; those
    messages list the valid choices.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def overrides_from_run_config(run_config: dict[str, Any]) -> list[str]:
    """Translate Flower run config (``flwr run -c``) into Hydra overrides.

    ``scenario`` and ``strategy`` select group options, ``overrides`` holds
    further space-separated ``key=value`` items, and ``output-dir`` sets where
    results go.
    """
    overrides: list[str] = []
    for group in ("scenario", "strategy"):
        if run_config.get(group):
            overrides.append(f"{group}={run_config[group]}")
    overrides.extend(shlex.split(str(run_config.get("overrides", "") or "")))
    return overrides


def task_spec(cfg: DictConfig, run_dir: Path | None = None) -> TaskSpec:
    """Build the ``TaskSpec`` sent to nodes from the composed configuration.

    ``run_dir`` names the run for the nodes' privacy ledgers under
    ``privacy=dp_sgd`` (see ``privacy.task_privacy``).
    """
    partition = cfg.scenario.partition
    root = cfg.data.root
    return TaskSpec(
        scenario=str(cfg.scenario.name),
        options=OmegaConf.to_container(cfg.scenario.options, resolve=True) or {},
        partition=PartitionSettings(
            num_nodes=int(cfg.nodes),
            scheme=str(partition.scheme),
            alpha=float(partition.alpha),
            seed=int(cfg.seed),
            val_fraction=float(partition.val_fraction),
            test_fraction=float(partition.test_fraction),
        ),
        train=TrainSettings(
            epochs=int(cfg.train.epochs),
            batch_size=int(cfg.train.batch_size),
            lr=float(cfg.train.lr),
            seed=int(cfg.seed),
        ),
        # An absolute path, so that workers with another working directory
        # find the same files.
        data_root=str(resolve_data_root(root)),
        allow_download=bool(cfg.data.download),
        privacy=task_privacy(cfg.get("privacy"), int(cfg.rounds), run_dir),
    )


class ConfigError(ValueError):
    """A setting is outside its allowed range; the message names the key, the value and the range."""


def validate_config(cfg: DictConfig) -> None:
    """Reject settings that would fail later in a less readable way.

    Raises
    ------
    ConfigError
        Naming the key, the value and the allowed range.
    """
    checks = [
        ("nodes", int(cfg.nodes) >= 1, "an integer >= 1"),
        ("rounds", int(cfg.rounds) >= 1, "an integer >= 1"),
        ("train.fraction", 0.0 < float(cfg.train.fraction) <= 1.0, "in (0, 1]"),
        ("evaluate.fraction", 0.0 <= float(cfg.evaluate.fraction) <= 1.0, "in [0, 1]"),
        ("train.epochs", int(cfg.train.epochs) >= 1, "an integer >= 1"),
        ("train.batch_size", int(cfg.train.batch_size) >= 1, "an integer >= 1"),
        ("train.lr", float(cfg.train.lr) > 0.0, "> 0"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            value = OmegaConf.select(cfg, key)
            raise ConfigError(f"Invalid setting {key}={value}: it must be {allowed}. Override it, e.g. `{key}=...`.")


def config_hash(cfg: DictConfig) -> str:
    """Return the SHA-256 of the resolved configuration as sorted JSON (for the audit log)."""
    import json

    container = OmegaConf.to_container(cfg, resolve=True)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode("utf-8")).hexdigest()

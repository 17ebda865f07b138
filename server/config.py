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
    if str(cfg.strategy.name) == "he_robust":
        validate_he_robust(cfg)
    _validate_keys_dir(cfg)
    _validate_registry_location(cfg)


def _validate_registry_location(cfg: DictConfig) -> None:
    """Check that the SQLite node registry that signature checks will open exists, so a typo does not create an empty one.

    A registry at a server URL (PostgreSQL) is checked when the run opens it.
    """
    from provenance.registry import DEFAULT_FILENAME, sqlite_path

    provenance = cfg.get("provenance")
    if provenance is None or not provenance.get("signatures", False):
        return
    if provenance.get("registry_url"):
        url = str(provenance.registry_url)
        path = sqlite_path(url)
        if path is not None and not path.is_file():
            raise ConfigError(
                f"Invalid setting provenance.registry_url={url}: the SQLite file {path} does not exist, so no node could sign. "
                "Create it with `fedseal keys init --out DIR --nodes N --db URL`, or fix the path."
            )
        return

    keys_dir = provenance.get("keys_dir")
    registry = Path(str(keys_dir)) / DEFAULT_FILENAME if keys_dir else None
    if registry is not None and not registry.is_file():
        raise ConfigError(
            f"Invalid setting provenance.keys_dir={keys_dir}: {registry} is missing, so no node is registered. "
            f"Create the node keys with `fedseal keys init --out {keys_dir} --nodes N`, or set provenance.keys_dir=null "
            "(a simulation then makes fresh keys)."
        )


def check_simulation_signing_keys(cfg: DictConfig, supernodes: int) -> None:
    """Check that ``provenance.keys_dir`` has a signing key for each of the simulation's ``supernodes`` partitions.

    Partitions from ``nodes`` on are the validator of ``strategy=he_robust strategy.rule=trust``.

    Raises
    ------
    ConfigError
        Naming the first partition without a key and the command that creates it.
    """
    provenance = cfg.get("provenance")
    if provenance is None or not provenance.get("signatures", False) or not provenance.get("keys_dir"):
        return
    from crypto import signing

    keys_dir = provenance.keys_dir
    nodes = int(cfg.nodes)
    root = Path(str(keys_dir)) / signing.SIGNING_DIR
    for partition in range(supernodes):
        path = signing.node_key_dir(root, partition) / signing.PRIVATE_KEY_FILENAME
        if path.is_file():
            continue
        if partition >= nodes:
            raise ConfigError(
                f"Invalid setting provenance.keys_dir={keys_dir}: {path} is missing, but strategy.rule=trust runs the validator "
                f"as node {partition}. Add its key with `fedseal keys init --out {keys_dir} --nodes {nodes} --validator`."
            )
        validator = " --validator" if supernodes > nodes else ""
        raise ConfigError(
            f"Invalid setting provenance.keys_dir={keys_dir}: {path} is missing, but the simulation runs {nodes} nodes "
            f"(partitions 0 to {nodes - 1}). Create the keys with `fedseal keys init --out {keys_dir} --nodes {nodes}{validator}`, "
            f"or run with nodes={partition}."
        )


def _validate_keys_dir(cfg: DictConfig) -> None:
    """Check that a user-supplied ``security.keys_dir`` contains the public context the strategy loads."""
    keys_dir = cfg.get("security", {}).get("keys_dir") if cfg.get("security") is not None else None
    if not keys_dir or not cfg.strategy.get("encrypted", False):
        return
    if str(cfg.strategy.name) == "he_robust":
        from crypto.ckks.scoring.context import (
            SCORING_PUBLIC_CONTEXT_FILENAME as filename,
        )

        command = f"fedseal keys init --out {keys_dir} --scoring"
    else:
        from crypto.ckks.context import PUBLIC_CONTEXT_FILENAME as filename

        command = f"fedseal keys init --out {keys_dir}"
    path = Path(str(keys_dir)) / "server" / filename
    if not path.is_file():
        raise ConfigError(
            f"Invalid setting security.keys_dir={keys_dir}: {path} is missing, so strategy={cfg.strategy.name} has no public "
            f"context to load. Create it with `{command}` (add --overwrite only to replace existing keys), or set security.keys_dir=null."
        )


def uses_validator(cfg: DictConfig) -> bool:
    """Return whether the run needs a validator node: ``strategy=he_robust`` with ``strategy.rule=trust``."""
    return str(cfg.strategy.name) == "he_robust" and str(cfg.strategy.get("rule")) == "trust"


def training_nodes_per_round(cfg: DictConfig) -> int:
    """Return how many nodes train per round when every node is connected (FedAvg's sampling)."""
    nodes = int(cfg.nodes)
    fraction = float(cfg.train.fraction)
    return max(int(nodes * fraction), max(1, min(nodes, round(fraction * nodes))))


def validate_he_robust(cfg: DictConfig) -> None:
    """Reject ``strategy=he_robust`` settings that cannot work, naming the value and the fix.

    Raises
    ------
    ConfigError
        For an unknown rule, preset or norm mode, a norm bound the preset
        cannot hold, a committee larger than the nodes per round, or a
        committee too small to outvote ``max_faulty`` members.
    """
    from crypto.ckks.errors import PreflightError
    from crypto.ckks.scoring.context import SCORING_PRESETS, check_scoring_bound
    from strategies.encrypted_rules import NORM_MODES, RULES

    strategy = cfg.strategy
    rule = str(strategy.get("rule"))
    if rule not in RULES:
        raise ConfigError(f"Invalid setting strategy.rule={rule}: use one of {', '.join(RULES)}, e.g. `strategy.rule=krum`.")
    preset = str(strategy.get("preset"))
    if preset not in SCORING_PRESETS:
        raise ConfigError(f"Invalid setting strategy.preset={preset}: use one of {', '.join(sorted(SCORING_PRESETS))}.")
    try:
        check_scoring_bound(preset, float(strategy.norm_bound))
    except (PreflightError, ValueError) as error:
        raise ConfigError(f"Invalid setting strategy.norm_bound={strategy.norm_bound}: {error}") from None

    per_round = training_nodes_per_round(cfg)
    _validate_fixed_committee(cfg)
    partitions = strategy.get("committee_partitions")
    size = len(partitions) if partitions else int(strategy.committee_size)
    faulty = int(strategy.max_faulty)
    if not 1 <= size <= per_round:
        raise ConfigError(
            f"Invalid setting strategy.committee_size={size}: the committee is drawn from the {per_round} nodes that "
            f"train per round, so it must be between 1 and {per_round}. Lower strategy.committee_size or raise nodes."
        )
    if faulty < 0:
        raise ConfigError(f"Invalid setting strategy.max_faulty={faulty}: it must be an integer >= 0, e.g. `strategy.max_faulty=1`.")
    if size < 2 * faulty + 1:
        raise ConfigError(
            f"Invalid setting strategy.max_faulty={faulty} with strategy.committee_size={size}: outvoting f faulty members "
            f"needs at least 2f+1 = {2 * faulty + 1} members. Lower strategy.max_faulty to at most {(size - 1) // 2} or raise strategy.committee_size."
        )
    if str(strategy.norm_mode) not in NORM_MODES:
        raise ConfigError(f"Invalid setting strategy.norm_mode={strategy.norm_mode}: use one of {', '.join(NORM_MODES)}.")
    if not float(strategy.norm_multiple) > 0:
        raise ConfigError(f"Invalid setting strategy.norm_multiple={strategy.norm_multiple}: it must be > 0, e.g. `strategy.norm_multiple=3`.")
    _check_optional_int(strategy, "committee_seed", minimum=None)
    if rule in ("krum", "multikrum"):
        _validate_he_krum(strategy, rule, per_round)
    if rule == "trust":
        _validate_he_trust(cfg)


def _check_optional_int(strategy: DictConfig, key: str, minimum: int | None) -> int | None:
    """Return ``strategy[key]`` as an int or None; raise ConfigError for anything else or a value below ``minimum``."""
    value = strategy.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"Invalid setting strategy.{key}={value}: it must be null or {allowed}, e.g. `strategy.{key}=null`.")
    return value


def _validate_he_krum(strategy: DictConfig, rule: str, per_round: int) -> None:
    """Check f and, for Multi-Krum, the number of averaged updates against the nodes per round."""
    from strategies.robust import check_krum, max_krum_malicious

    f = _check_optional_int(strategy, "num_malicious", minimum=0)
    f = max_krum_malicious(per_round) if f is None else f
    try:
        check_krum(per_round, f, f"he_robust strategy.rule={rule}")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    selected = _check_optional_int(strategy, "num_selected", minimum=1)
    if rule == "multikrum" and selected is not None and selected > per_round - f:
        raise ConfigError(
            f"Invalid setting strategy.num_selected={selected}: Multi-Krum averages at most n - f = {per_round - f} of the "
            f"{per_round} updates per round (f={f}). Lower it, or set strategy.num_selected=null for n - f."
        )


def _validate_he_trust(cfg: DictConfig) -> None:
    """Check the validator's root rows, its epochs and the reputation settings of the trust rule."""
    from strategies.reputation import ReputationSettings

    strategy = cfg.strategy
    root_size = strategy.get("root_size")
    if isinstance(root_size, bool) or not isinstance(root_size, int) or root_size < 1:
        raise ConfigError(f"Invalid setting strategy.root_size={root_size}: the validator trains on that many held-out rows, so it must be an integer >= 1, e.g. `strategy.root_size=200`.")
    holdout = int(cfg.data.get("holdout") or 0)
    if holdout not in (0, root_size):
        raise ConfigError(
            f"Invalid setting data.holdout={holdout} with strategy.root_size={root_size}: the validator's root rows are the "
            f"holdout, so set data.holdout={root_size} or data.holdout=0 (which follows strategy.root_size)."
        )
    _check_optional_int(strategy, "reference_epochs", minimum=1)
    fields = {key: strategy[key] for key in ReputationSettings.__dataclass_fields__ if key in strategy}
    try:
        ReputationSettings(**fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _validate_fixed_committee(cfg: DictConfig) -> None:
    """Check ``strategy.committee_partitions``: distinct training partitions that train every round."""
    partitions = cfg.strategy.get("committee_partitions")
    if partitions is None:
        return
    nodes = int(cfg.nodes)
    values = list(partitions) if not isinstance(partitions, (str, int)) else None
    if not values or not all(isinstance(p, int) and 0 <= p < nodes for p in values) or len(set(values)) != len(values):
        raise ConfigError(
            f"Invalid setting strategy.committee_partitions={partitions}: give distinct partition ids of training nodes, "
            f"each in [0, {nodes - 1}], e.g. `strategy.committee_partitions=[0,1,2]`, or null for a draw per round."
        )
    if float(cfg.train.fraction) < 1.0:
        raise ConfigError(
            f"Invalid setting strategy.committee_partitions={list(values)} with train.fraction={cfg.train.fraction}: a fixed member "
            "decrypts only for rounds it trains in, so every node must train each round. Set train.fraction=1.0 or "
            "strategy.committee_partitions=null."
        )


def config_hash(cfg: DictConfig) -> str:
    """Return the SHA-256 of the resolved configuration as sorted JSON (for the audit log)."""
    import json

    container = OmegaConf.to_container(cfg, resolve=True)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode("utf-8")).hexdigest()

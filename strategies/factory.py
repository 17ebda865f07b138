"""Build the strategy stack named by the Hydra ``strategy`` group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from privacy import UNIFORM_WEIGHT_KEY, is_central
from strategies.attack_simulation import MODEL_POISONING, AttackSimulation, AttackSettings, attack_spec
from strategies.recording import RecordingStrategy, RoundSink, aggregate_finite_metrics
from strategies.robust import ROBUST_BUILDERS
from strategies.trust import build_trust
from strategies.validation import UpdateValidation

logger = logging.getLogger(__name__)


@dataclass
class RunResources:
    """What strategies may need besides their settings.

    Parameters
    ----------
    task : ConfigRecord
        The task spec record that every message carries.
    run_dir : Path
        The run's output folder.
    audit : object, optional
        The run's audit log (``append(event, **fields)``).
    public_context : object, optional
        The CKKS public context, for encrypted strategies.
    num_parameters : int
        Length of the flattened model.
    initial_hash : str
        Hash of the public initial model (encrypted strategies).
    run_id : str
        Stable id of the run (kept across restarts).
    versions : provenance.versions.VersionIndex, optional
        Database index of model versions.
    round_offset, start_version, start_hash
        Where a resumed run continues: last committed round, its version and model hash.
    extra : dict
        Settings of optional layers, by name.
    """

    task: ConfigRecord
    run_dir: Path
    audit: Any = None
    public_context: Any = None
    num_parameters: int = 0
    initial_hash: str = ""
    run_id: str = ""
    versions: Any = None
    round_offset: int = 0
    start_version: int = 0
    start_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fedavg(strategy_cfg: Any, sampling: dict[str, Any], resources: RunResources) -> Strategy:
    return FedAvg(**sampling)


def _he_fedavg(strategy_cfg: Any, sampling: dict[str, Any], resources: RunResources) -> Strategy:
    from server.model_store import EncryptedVersionStore
    from strategies.he_fedavg import EncryptedFedAvg

    if resources.public_context is None:
        raise ValueError("strategy=he_fedavg needs a CKKS public context; set security.keys_dir to a folder from `fedseal keys init`.")
    return EncryptedFedAvg(
        public_context=resources.public_context,
        num_parameters=resources.num_parameters,
        initial_hash=resources.initial_hash,
        task=resources.task,
        audit=resources.audit,
        versions=EncryptedVersionStore(resources.run_dir / "models"),
        **sampling,
    )


def _he_robust(strategy_cfg: Any, sampling: dict[str, Any], resources: RunResources) -> Strategy:
    from strategies.he_robust_builder import build_he_robust

    return build_he_robust(strategy_cfg, sampling, resources)


# Strategy name -> builder(strategy config, FedAvg sampling keywords, run resources).
BUILDERS: dict[str, Callable[[Any, dict[str, Any], RunResources], Strategy]] = {
    "fedavg": _fedavg,
    "he_fedavg": _he_fedavg,
    "he_robust": _he_robust,
    **ROBUST_BUILDERS,
    "trust": build_trust,
}


def sampling_settings(cfg: Any) -> dict[str, Any]:
    """Return FedAvg's sampling keywords from the top-level config.

    Every node must be present before a round starts, so a run never begins
    with part of the federation missing.
    """
    nodes = int(cfg.nodes)
    settings = {
        "fraction_train": float(cfg.train.fraction),
        "fraction_evaluate": float(cfg.evaluate.fraction),
        "min_train_nodes": max(1, min(nodes, round(cfg.train.fraction * nodes))),
        "min_evaluate_nodes": max(1, min(nodes, round(cfg.evaluate.fraction * nodes))),
        "min_available_nodes": nodes,
        "train_metrics_aggr_fn": aggregate_finite_metrics,
        "evaluate_metrics_aggr_fn": aggregate_finite_metrics,
    }
    if is_central(cfg.get("privacy")):
        # Central-DP noise is calibrated for an unweighted mean of the updates.
        settings["weighted_by_key"] = UNIFORM_WEIGHT_KEY
    return settings


def build_strategy(cfg: Any, sink: RoundSink, resources: RunResources | None = None) -> Strategy:
    """Assemble the strategy stack for ``cfg``, outermost wrapper last.

    Raises
    ------
    ValueError
        If ``cfg.strategy.name`` has no builder; the message lists the valid names.
    """
    name = str(cfg.strategy.name)
    if name not in BUILDERS:
        raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(sorted(BUILDERS))}.")

    sampling = sampling_settings(cfg)
    strategy = BUILDERS[name](cfg.strategy, sampling, resources)
    rule_strategy = strategy
    strategy = wrap_robustness(cfg, strategy, sink, resources)
    # Central DP noises the aggregate before any outer layer (canary nodes
    # included) sees it; DP-SGD only records what the nodes report.
    from privacy.recording import wrap_privacy

    strategy = wrap_privacy(cfg, strategy, sampling["min_train_nodes"], sink, resources.audit if resources is not None else None)
    if resources is not None and cfg.get("canary") is not None and cfg.canary.enabled:
        from strategies.canary import CanaryPromotion

        strategy = CanaryPromotion(
            strategy,
            task=resources.task,
            metric=str(cfg.scenario.primary_metric),
            fraction=float(cfg.canary.fraction),
            tolerance=float(cfg.canary.tolerance),
            seed=int(cfg.seed),
            audit=resources.audit,
            flag_contributors=bool(cfg.canary.flag_contributors),
        )
    # Signature checks wrap every other layer, so no layer receives an unproven update.
    from strategies.signatures import signatures_enabled, wrap_with_signatures

    if signatures_enabled(cfg):
        strategy = wrap_with_signatures(strategy, resources, sink)
        if hasattr(rule_strategy, "reference_verifier"):
            # he_robust requests the trust reference itself, inside aggregate_train, so the wrapper checks it on request.
            rule_strategy.reference_verifier = strategy
    strategy = RecordingStrategy(strategy, sink)
    if resources is None:
        return strategy

    from strategies.checkpointing import RunCheckpoint

    return RunCheckpoint(
        strategy,
        run_dir=resources.run_dir,
        run_id=resources.run_id,
        versions=resources.versions,
        audit=resources.audit,
        round_offset=resources.round_offset,
        start_version=resources.start_version,
        start_hash=resources.start_hash,
    )


def wrap_robustness(cfg: Any, strategy: Strategy, sink: RoundSink, resources: RunResources | None) -> Strategy:
    """Wrap a plaintext rule as ``AttackSimulation(UpdateValidation(rule))``; leave encrypted ones alone.

    ``strategy=he_robust`` in a Ray simulation with keys that the simulation
    created gets ``EncryptedAttackSimulation`` instead: an adversary with
    the scoring secret key, for the robustness sweep only.

    Raises
    ------
    ValueError
        If a model-poisoning attack is set with an encrypted strategy, whose
        updates the server cannot read or replace, outside that case.
    """
    attack = AttackSettings.from_config(cfg.get("attack"))
    if cfg.strategy.get("encrypted", False):
        if attack.name not in MODEL_POISONING:
            return strategy
        simulation_keys = resources.extra.get("simulation_keys") if resources is not None else None
        if str(cfg.strategy.name) == "he_robust" and simulation_keys is not None:
            from strategies.encrypted_attack_simulation import EncryptedAttackSimulation
            from server.keys import NODE_DIR

            spec = attack_spec(attack, int(cfg.nodes))
            if spec is None:
                return strategy
            logger.warning("attack=%s on strategy=he_robust: the simulated adversary has the scoring secret key of this simulation", attack.name)
            return EncryptedAttackSimulation(strategy, attack, spec["attackers"], Path(simulation_keys) / NODE_DIR, sink=sink)
        if str(cfg.strategy.name) == "he_robust":
            raise ValueError(
                f"attack={attack.name} with strategy=he_robust needs an adversary with the scoring secret key, which is allowed only "
                "in a Ray simulation that creates its own keys (fedseal-train with security.keys_dir=null). Use attack=label_flip or attack=none here."
            )
        raise ValueError(f"attack={attack.name} crafts plaintext updates on the server, but strategy={cfg.strategy.name} encrypts them. Use attack=label_flip or attack=none, or a plaintext strategy.")

    audit = resources.audit if resources is not None else None
    validation = cfg.get("validation") or {}
    strategy = UpdateValidation(strategy, max_norm_ratio=validation.get("max_norm_ratio", 10.0), sink=sink, audit=audit)

    spec = attack_spec(attack, int(cfg.nodes))
    if spec is not None and attack.name in MODEL_POISONING:
        strategy = AttackSimulation(strategy, attack, spec["attackers"], sink=sink)
    return strategy


def innermost(strategy: Strategy) -> Strategy:
    """Return the strategy at the core of a stack of wrappers (each keeps it as ``.strategy``)."""
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy

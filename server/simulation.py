"""Run a configured job on Flower's Ray simulation runtime on this machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from server.environment import keep_local

logger = logging.getLogger(__name__)


def backend_config(cfg: DictConfig) -> dict:
    """Return Flower's Ray backend settings, sized by ``cfg.runtime``.

    Concurrency is ``ray_cpus / client_cpus`` ClientApps at a time.
    """
    return {
        "client_resources": {"num_cpus": int(cfg.runtime.client_cpus), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": int(cfg.runtime.ray_cpus),
            "num_gpus": 0,
            "object_store_memory": int(cfg.runtime.object_store_mb) * 1024 * 1024,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


def run_in_simulation(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg`` with ``cfg.nodes`` simulated SuperNodes and return the summary.

    Raises
    ------
    RuntimeError
        If the ServerApp did not write ``summary.json`` (the run failed; the
        cause is in the log above).
    """
    from server.config import check_simulation_signing_keys, validate_config

    # Fail on a bad setting before keys are made and Ray starts.
    validate_config(cfg)
    check_simulation_signing_keys(cfg, simulated_supernodes(cfg))
    keep_local()
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    simulation_keys = None
    if cfg.strategy.get("encrypted", False) and not cfg.security.keys_dir:
        provision_simulation_keys(cfg, run_dir)
        simulation_keys = Path(cfg.security.keys_dir)
    if cfg.provenance.signatures and not cfg.provenance.keys_dir:
        provision_signing_keys(cfg, run_dir)

    supernodes = simulated_supernodes(cfg)
    logger.info("Starting Ray simulation with %d nodes", supernodes)
    run_simulation(
        server_app=make_server_app(cfg, run_dir, simulation_keys),
        client_app=client_app,
        num_supernodes=supernodes,
        backend_config=backend_config(cfg),
    )

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"The simulation ended without writing {summary_path}; see the errors logged above.")
    check_some_training(run_dir)
    return json.loads(summary_path.read_text(encoding="utf-8"))


class NoTrainingError(RuntimeError):
    """Every training reply of every round failed, so the final model is the initial one."""


def check_some_training(run_dir: Path) -> None:
    """Raise NoTrainingError when no node returned a training reply in any round of the run.

    Such a run still writes its outputs, but its model never changed, and a
    zero exit status would hide that. The message gives the first failure
    reason from ``metrics.jsonl``.
    """
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        return
    rounds = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("phase") == "train" and record.get("scope") == "global" and "replied" in record:
                rounds.append(record)
    if not rounds or any(int(record["replied"]) > 0 for record in rounds):
        return

    failures = [reason for record in rounds for reason in record.get("failures", [])]
    first = failures[0] if failures else "no node replied"
    # Ray wraps the node's exception; its own message follows the last "Message: ".
    first = first.rsplit("Message: ", 1)[-1].rstrip(">'\" ")[:400]
    raise NoTrainingError(
        f"No node trained in any of the {len(rounds)} rounds, so the final model is the initial one. "
        f"First failure: {first} Details in {run_dir / 'train.log'}."
    )


def simulated_supernodes(cfg: DictConfig) -> int:
    """Return how many SuperNodes the simulation starts: ``nodes``, plus the validator of ``he_robust`` with the trust rule."""
    from server.config import uses_validator

    return int(cfg.nodes) + (1 if uses_validator(cfg) else 0)


def provision_simulation_keys(cfg: DictConfig, run_dir: Path) -> None:
    """Create fresh CKKS keys in ``run_dir/keys`` and point ``security.keys_dir`` there.

    This plays the key dealer's part before the ServerApp starts. The
    ServerApp then loads ``keys/server`` (public context only); the simulated
    nodes load ``keys/node``. A real deployment runs ``fedseal keys init``
    and installs ``node/`` on the sites only. ``strategy=he_robust`` gets the
    scoring key pair instead of the aggregation key.
    """
    from server.keys import init_ckks_keys, init_scoring_keys

    keys_dir = run_dir / "keys"
    if str(cfg.strategy.name) == "he_robust":
        from server.keys import SCORING_FINGERPRINT_FILE

        # A resumed run keeps its keys: its committed drift is encrypted under them.
        if not (keys_dir / SCORING_FINGERPRINT_FILE).exists():
            init_scoring_keys(keys_dir, str(cfg.strategy.preset))
    else:
        init_ckks_keys(keys_dir, str(cfg.security.preset))
    cfg.security.keys_dir = str(keys_dir)


def provision_signing_keys(cfg: DictConfig, run_dir: Path) -> None:
    """Create a signing key per simulated node in ``run_dir/keys`` and point ``provenance.keys_dir`` there.

    The public keys go to ``provenance.registry_url``, or by default to
    ``run_dir/keys/registry.sqlite``. Keys already there are replaced, so a
    restarted run signs with fresh keys that the registry also holds. The
    validator of ``strategy=he_robust strategy.rule=trust`` gets its own key
    as node ``nodes``.
    """
    from server.config import uses_validator
    from server.keys import init_signing_keys

    keys_dir = run_dir / "keys"
    init_signing_keys(keys_dir, int(cfg.nodes), cfg.provenance.registry_url, overwrite=True, validator=uses_validator(cfg))
    cfg.provenance.keys_dir = str(keys_dir)

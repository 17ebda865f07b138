"""Differential privacy for fedseal: node-side DP-SGD with a privacy ledger, and central DP.

Two modes, chosen by the Hydra group ``privacy``:

- ``dp_sgd``: every node trains with Opacus DP-SGD (``privacy.dp_sgd``) and
  keeps the epsilon it has spent in a ledger on its own disk
  (``privacy.ledger``). The guarantee protects each training example (each
  user for recommendations) against everyone who sees a node's updates,
  the server included.
- ``central``: Flower's central-DP strategy wrappers clip each node's update
  and add noise to the aggregate (``privacy.central``). The guarantee
  protects each node's whole dataset against whoever sees the released
  models, but the server sees the individual updates.

This module only reads settings; it imports neither Opacus nor Flower, so
the runtime can call it without their import cost.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

NONE = "none"
DP_SGD = "dp_sgd"
CENTRAL = "central"
MODES = (NONE, DP_SGD, CENTRAL)

# Metric every node reports as 1.0 under central DP; FedAvg weights by it,
# because central-DP noise is calibrated for an unweighted mean of the updates.
UNIFORM_WEIGHT_KEY = "dp-uniform-weight"

# Subfolder of the run's output folder with one ledger folder per partition.
NODE_STATE_DIR = "node_state"


def privacy_mode(privacy: Any) -> str:
    """Return the mode named by a ``privacy`` config or ``TaskSpec.privacy`` (``none`` when absent)."""
    if not privacy:
        return NONE
    return str(privacy.get("name", NONE))


def is_dp_sgd(privacy: Any) -> bool:
    """Return whether ``TaskSpec.privacy`` requests node-side DP-SGD."""
    return privacy_mode(privacy) == DP_SGD


def is_central(privacy: Any) -> bool:
    """Return whether ``TaskSpec.privacy`` requests central DP."""
    return privacy_mode(privacy) == CENTRAL


def run_key(run_dir: Path) -> str:
    """Return a stable name for the run in ``run_dir``: the same after a resume, different for another folder."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:16]


def task_fingerprint(spec: Any) -> str:
    """Return a short hash of a ``TaskSpec``, so cached node state never crosses tasks."""
    return hashlib.sha256(spec.to_json().encode("utf-8")).hexdigest()[:16]


def task_privacy(privacy_cfg: Any, rounds: int, run_dir: Path | None) -> dict[str, Any] | None:
    """Build ``TaskSpec.privacy`` from the ``privacy`` config group.

    Parameters
    ----------
    privacy_cfg : mapping or None
        The composed ``cfg.privacy`` (``name`` plus the mode's settings).
    rounds : int
        Rounds planned; DP-SGD calibrates ``target_epsilon`` over them.
    run_dir : Path, optional
        The run's output folder. DP-SGD nodes without their own ``state-dir``
        keep their ledgers under ``run_dir/node_state``, and the ledger file
        is named after the folder, so a resumed run continues its ledgers.

    Returns
    -------
    dict or None
        None for ``privacy=none``.

    Raises
    ------
    ValueError
        For an unknown mode, naming the valid ones, or an invalid setting.
    """
    mode = privacy_mode(privacy_cfg)
    if mode not in MODES:
        raise ValueError(f"Unknown privacy mode {mode!r}. Valid modes: {', '.join(MODES)}.")
    if mode == NONE:
        return None

    # Plain JSON types only: the result travels inside the TaskSpec.
    settings = json.loads(json.dumps(_to_dict(privacy_cfg)))
    if mode == CENTRAL:
        from privacy.central import CentralDPSettings

        CentralDPSettings.from_dict(settings)
        return settings

    settings["rounds"] = int(rounds)
    if run_dir is not None:
        settings["run_key"] = run_key(run_dir)
        if not settings.get("state_dir"):
            settings["state_dir"] = str(Path(run_dir).resolve() / NODE_STATE_DIR)

    # Check the settings here, so a bad value stops the server before any node trains.
    from privacy.dp_sgd import DPSGDSettings

    DPSGDSettings.from_dict(settings)
    return settings


def _to_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        return dict(OmegaConf.to_container(config, resolve=True))
    return dict(config)

"""Build the strategy stack named by the Hydra ``strategy`` group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.recording import RecordingStrategy, RoundSink, aggregate_finite_metrics

logger = logging.getLogger(__name__)


def _fedavg(strategy_cfg: Any, sampling: dict[str, Any]) -> Strategy:
    return FedAvg(**sampling)


# Strategy name -> builder(strategy config, FedAvg sampling keywords).
BUILDERS: dict[str, Callable[[Any, dict[str, Any]], Strategy]] = {
    "fedavg": _fedavg,
}


def sampling_settings(cfg: Any) -> dict[str, Any]:
    """Return FedAvg's sampling keywords from the top-level config.

    Every node must be present before a round starts, so a run never begins
    with part of the federation missing.
    """
    nodes = int(cfg.nodes)
    return {
        "fraction_train": float(cfg.train.fraction),
        "fraction_evaluate": float(cfg.evaluate.fraction),
        "min_train_nodes": max(1, min(nodes, round(cfg.train.fraction * nodes))),
        "min_evaluate_nodes": max(1, min(nodes, round(cfg.evaluate.fraction * nodes))),
        "min_available_nodes": nodes,
        "train_metrics_aggr_fn": aggregate_finite_metrics,
        "evaluate_metrics_aggr_fn": aggregate_finite_metrics,
    }


def build_strategy(cfg: Any, sink: RoundSink) -> Strategy:
    """Assemble the strategy stack for ``cfg``, outermost wrapper last.

    Raises
    ------
    ValueError
        If ``cfg.strategy.name`` has no builder; the message lists the valid names.
    """
    name = str(cfg.strategy.name)
    if name not in BUILDERS:
        raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(sorted(BUILDERS))}.")

    strategy = BUILDERS[name](cfg.strategy, sampling_settings(cfg))
    return RecordingStrategy(strategy, sink)

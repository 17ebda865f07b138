"""Reference points for a federated run: the centralized ceiling and each node alone.

Both baselines spend the federated run's budget: ``rounds`` calls of ``fit``
with ``epochs`` local epochs each, from the same seeded initial model, with
the same per-round seeds. They read node data in this process, which is only
possible where the server can see every site's data (simulation); a real
deployment sets ``baselines=false``.
"""

from __future__ import annotations

import logging
import time

from scenarios.base import NodeData, Scenario, TrainSettings
from scenarios.spec import TaskSpec
from clients.local import build_model, evaluate_model

logger = logging.getLogger(__name__)

# Partition id used for the pooled data in seed derivation.
POOLED_ID = 1_000


def train_for_budget(scenario: Scenario, spec: TaskSpec, data: NodeData, num_rounds: int, partition_id: int):
    """Train one model on ``data`` for the federated budget and return it."""
    model = build_model(scenario, spec.train.seed)
    for server_round in range(1, num_rounds + 1):
        settings = TrainSettings(
            epochs=spec.train.epochs,
            batch_size=spec.train.batch_size,
            lr=spec.train.lr,
            seed=spec.round_seed(server_round, partition_id),
        )
        scenario.fit(model, data, settings)
    return model


def centralized(scenario: Scenario, spec: TaskSpec, nodes: list[NodeData], num_rounds: int) -> dict:
    """Train on the pooled training data; score on the pooled test split and on each node's."""
    started = time.monotonic()
    pooled = scenario.pool(nodes)
    model = train_for_budget(scenario, spec, pooled, num_rounds, POOLED_ID)

    result = {
        "global": evaluate_model(scenario, model, pooled),
        "nodes": {str(node.node): evaluate_model(scenario, model, node) for node in nodes},
        "seconds": round(time.monotonic() - started, 2),
    }
    logger.info("Centralized baseline: %s", _short(result["global"], scenario.primary_metric))
    return result


def local_only(scenario: Scenario, spec: TaskSpec, nodes: list[NodeData], num_rounds: int) -> dict:
    """Train one model per node on its own data; score each on its own test split."""
    started = time.monotonic()
    per_node: dict[str, dict[str, float]] = {}
    for node in nodes:
        model = train_for_budget(scenario, spec, node, num_rounds, node.node)
        per_node[str(node.node)] = evaluate_model(scenario, model, node)
        logger.info("Local-only baseline, node %d: %s", node.node, _short(per_node[str(node.node)], scenario.primary_metric))

    return {"nodes": per_node, "seconds": round(time.monotonic() - started, 2)}


def _short(metrics: dict[str, float], key: str) -> str:
    return f"{key}={metrics.get(key, float('nan')):.4f}"

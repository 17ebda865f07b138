"""Local training and evaluation on one node's private data, free of Flower types.

The ClientApp in ``clients.app`` only converts messages to and from these calls,
so the same code serves simulation, SuperNodes and the in-process baselines.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from privacy import UNIFORM_WEIGHT_KEY, is_central, is_dp_sgd, task_fingerprint
from scenarios.base import NodeData, Scenario, TrainSettings
from scenarios.spec import TaskSpec, load_node, scenario_for

logger = logging.getLogger(__name__)

# Each Ray worker or SuperNode process trains one model at a time; more
# threads per process only oversubscribe the cores shared by the workers.
torch.set_num_threads(1)


def build_model(scenario: Scenario, seed: int, state: OrderedDict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Build ``scenario``'s model with seeded initial weights, then load ``state`` if given."""
    torch.manual_seed(seed)
    model = scenario.build_model()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def is_label_flipper(spec: TaskSpec, partition_id: int) -> bool:
    """Return whether ``spec`` makes node ``partition_id`` a label-flipping attacker."""
    attack = spec.attack or {}
    return attack.get("name") == "label_flip" and partition_id in attack.get("attackers", [])


def train_node(
    spec: TaskSpec,
    partition_id: int,
    state: OrderedDict[str, torch.Tensor],
    server_round: int,
    data_root: str | None = None,
    state_dir: str | None = None,
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
    """Train the global model ``state`` on node ``partition_id`` for one round.

    With ``spec.privacy`` set to DP-SGD the round runs ``privacy.dp_sgd``,
    which keeps the node's privacy ledger in ``state_dir`` (the node config's
    ``state-dir``) or in the folder the server names, and adds ``epsilon``
    to the metrics.

    Returns the new state dict and the training metrics, including
    ``num-examples``, the weight FedAvg uses.

    Raises
    ------
    privacy.ledger.PrivacyBudgetExhausted
        If the round would take the node above its privacy budget.
    """
    scenario = scenario_for(spec)
    data = load_node(spec, partition_id, data_root)
    if is_label_flipper(spec, partition_id):
        # Simulated data poisoning: this node trains on flipped labels.
        data = scenario.flip_labels(data)

    seed = spec.round_seed(server_round, partition_id)
    settings = TrainSettings(
        epochs=spec.train.epochs, batch_size=spec.train.batch_size, lr=spec.train.lr, seed=seed
    )
    if is_dp_sgd(spec.privacy):
        from privacy.dp_sgd import train_private

        new_state, metrics = train_private(spec.privacy, scenario, data, partition_id, state, settings, server_round, task_fingerprint(spec), state_dir)
        metrics["num-examples"] = float(scenario.num_examples(data.train))
        return new_state, metrics

    model = build_model(scenario, spec.train.seed, state)
    metrics = dict(scenario.fit(model, data, settings))
    metrics["num-examples"] = float(scenario.num_examples(data.train))
    if is_central(spec.privacy):
        metrics[UNIFORM_WEIGHT_KEY] = 1.0

    logger.debug("Node %d trained round %d: %s", partition_id, server_round, metrics)
    return OrderedDict(model.state_dict()), metrics


def evaluate_node(
    spec: TaskSpec,
    partition_id: int,
    state: OrderedDict[str, torch.Tensor],
    data_root: str | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Score the model ``state`` on node ``partition_id``'s ``split``.

    Returns the scenario metrics plus ``num-examples`` (the size of the scored split).
    """
    scenario = scenario_for(spec)
    data = load_node(spec, partition_id, data_root)
    model = build_model(scenario, spec.train.seed, state)
    metrics = evaluate_model(scenario, model, data, split)
    if is_central(spec.privacy):
        metrics[UNIFORM_WEIGHT_KEY] = 1.0
    return metrics


def evaluate_model(scenario: Scenario, model: torch.nn.Module, data: NodeData, split: str = "test") -> dict[str, float]:
    """Score ``model`` on ``data.<split>`` and add ``num-examples``."""
    metrics = dict(scenario.evaluate(model, data, split))
    metrics["num-examples"] = float(scenario.num_examples(getattr(data, split)))
    return metrics

"""Local training and evaluation on one node's private data, free of Flower types.

The ClientApp in ``clients.app`` only converts messages to and from these calls,
so the same code serves simulation, SuperNodes and the in-process baselines.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

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


def train_node(
    spec: TaskSpec,
    partition_id: int,
    state: OrderedDict[str, torch.Tensor],
    server_round: int,
    data_root: str | None = None,
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
    """Train the global model ``state`` on node ``partition_id`` for one round.

    Returns the new state dict and the training metrics, including
    ``num-examples``, the weight FedAvg uses.
    """
    scenario = scenario_for(spec)
    data = load_node(spec, partition_id, data_root)
    model = build_model(scenario, spec.train.seed, state)

    seed = spec.round_seed(server_round, partition_id)
    settings = TrainSettings(
        epochs=spec.train.epochs, batch_size=spec.train.batch_size, lr=spec.train.lr, seed=seed
    )
    metrics = dict(scenario.fit(model, data, settings))
    metrics["num-examples"] = float(scenario.num_examples(data.train))

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
    return evaluate_model(scenario, model, data, split)


def evaluate_model(scenario: Scenario, model: torch.nn.Module, data: NodeData, split: str = "test") -> dict[str, float]:
    """Score ``model`` on ``data.<split>`` and add ``num-examples``."""
    metrics = dict(scenario.evaluate(model, data, split))
    metrics["num-examples"] = float(scenario.num_examples(getattr(data, split)))
    return metrics

"""The server's reference update for trust weighting, trained on its holdout rows.

The server trains the global model on its root dataset (the rows that the
partition holds out, ``PartitionSettings.holdout``) with the scenario's own
``fit``, optimizer, learning rate and batch size, exactly as a node trains.
Only the number of epochs differs. A 200-row root set gives far fewer
optimizer steps per epoch than a node's data. FLTrust rescales every node
update to the reference norm, so a reference of one or two steps would
shrink every global step. By default the server therefore runs as many
epochs as it takes to match the nodes' example-weighted mean number of
optimizer steps (see ``matching_epochs``).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import numpy as np
import torch

from clients.local import build_model
from scenarios.base import NodeData, Scenario, TrainSettings
from scenarios.datasets import resolve_data_root
from scenarios.spec import TaskSpec, scenario_for
from strategies.updates import flat_update

logger = logging.getLogger(__name__)

# Cap on a node's example count, as a multiple of the round's median, when
# sizing the reference.
MAX_EXAMPLE_RATIO = 3.0


def matching_epochs(node_examples: list[float], node_epochs: int, batch_size: int, root_examples: int) -> int:
    """Return the root epochs whose optimizer steps come closest to the nodes' example-weighted mean steps.

    FedAvg weights each node's update by its examples, so the update it
    averages has about the example-weighted mean number of steps. Matching
    that, not the median node, keeps trust weighting's global step as large
    as FedAvg's. On imaging (10 nodes, Dirichlet alpha 1, 6 rounds) the
    attack-free pooled ROC-AUC was 0.944 with the median and 0.967 with the
    weighted mean, against 0.968 for FedAvg.

    Parameters
    ----------
    node_examples : list of float
        Training examples each node reports this round. Counts above
        ``MAX_EXAMPLE_RATIO`` times the median are capped there, so a node
        that overstates its examples cannot make the server train much longer.
    node_epochs : int
        Local epochs of a node.
    batch_size : int
        Batch size shared by nodes and server.
    root_examples : int
        Rows in the root dataset.

    Returns
    -------
    int
        At least 1.
    """
    if not node_examples or root_examples < 1:
        return max(1, node_epochs)

    examples = np.asarray(node_examples, dtype=np.float64)
    examples = np.minimum(examples, MAX_EXAMPLE_RATIO * float(np.median(examples)))
    steps = node_epochs * np.ceil(examples / batch_size)
    mean_steps = float((steps * examples).sum() / examples.sum()) if examples.sum() > 0 else float(node_epochs)

    root_steps_per_epoch = math.ceil(root_examples / batch_size)
    return max(1, round(mean_steps / root_steps_per_epoch))


class RootReference:
    """Callable that trains the global model on the root dataset and returns the flat update.

    Parameters
    ----------
    scenario : Scenario
        The run's scenario; its ``fit`` trains the reference.
    root : NodeData
        The root dataset in ``root.train``.
    spec : TaskSpec
        Training settings and the run seed.
    epochs : int, optional
        Fixed reference epochs; None matches the nodes' example-weighted mean
        optimizer steps (see ``matching_epochs``).
    """

    def __init__(self, scenario: Scenario, root: NodeData, spec: TaskSpec, epochs: int | None = None) -> None:
        if epochs is not None and int(epochs) < 1:
            raise ValueError(f"Invalid setting strategy.reference_epochs={epochs}: use an integer >= 1, or null to match the nodes' steps.")
        self.scenario = scenario
        self.root = root
        self.spec = spec
        self.epochs = None if epochs is None else int(epochs)
        self.root_examples = scenario.num_examples(root.train)

    @classmethod
    def from_spec(cls, spec: TaskSpec, epochs: int | None = None) -> RootReference:
        """Load the holdout rows of ``spec`` as the root dataset."""
        scenario = scenario_for(spec)
        root = scenario.load_holdout(resolve_data_root(spec.data_root), spec.partition)
        logger.info("Trust root dataset: %d holdout rows of %s", scenario.num_examples(root.train), spec.scenario)
        return cls(scenario, root, spec, epochs)

    def __call__(self, server_round: int, global_arrays: dict[str, np.ndarray], node_examples: list[float]) -> np.ndarray:
        """Train from ``global_arrays`` on the root dataset and return ``trained - global`` as a float64 vector."""
        train = self.spec.train
        epochs = self.epochs or matching_epochs(node_examples, train.epochs, train.batch_size, self.root_examples)
        # A seed no node uses: node seeds take partition ids 0 .. num_nodes - 1.
        seed = self.spec.round_seed(server_round, self.spec.partition.num_nodes)
        settings = TrainSettings(epochs=epochs, batch_size=train.batch_size, lr=train.lr, seed=seed)

        state = OrderedDict((key, torch.from_numpy(np.array(value, copy=True))) for key, value in global_arrays.items())
        model = build_model(self.scenario, train.seed, state)
        self.scenario.fit(model, self.root, settings)

        trained = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
        logger.debug("Round %d: reference trained for %d epochs on %d rows", server_round, epochs, self.root_examples)
        return flat_update(trained, global_arrays)

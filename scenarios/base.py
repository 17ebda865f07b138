"""The contract every scenario implements: data per node, a model, training and metrics.

A scenario hides everything domain-specific behind five calls, so the Flower
client, the server and the baselines (centralized and local-only) stay generic:

1. ``load_nodes`` reads the real dataset, partitions it across nodes and gives
   each node its own train, validation and test split.
2. ``pool`` joins the splits of several nodes, which is the centralized baseline.
3. ``build_model`` returns a fresh ``torch.nn.Module`` (seeded by the caller).
4. ``fit`` trains a model in place on one split.
5. ``evaluate`` returns the field's metrics with snake_case keys.

Split contents are opaque to callers: a scenario chooses its own container
(tensors for classification, interaction tables for recommendation) and only
promises ``num_examples``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class PartitionSettings:
    """How one dataset is split across nodes.

    Parameters
    ----------
    num_nodes : int
        Number of nodes (sites). At least 1.
    scheme : str
        ``iid``, ``dirichlet`` (label skew) or ``natural`` (a key the
        scenario names, such as the product type for maintenance).
    alpha : float
        Dirichlet concentration for ``dirichlet``. Smaller is more skewed.
    seed : int
        Seed for the partition and the per-node splits.
    val_fraction, test_fraction : float
        Share of each node's rows held out for validation and test.
    holdout : int
        Rows reserved for the server before partitioning (a root dataset
        that is in no node's splits; see ``Scenario.load_holdout``). 0 reserves none.
    """

    num_nodes: int
    scheme: str = "dirichlet"
    alpha: float = 1.0
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    holdout: int = 0


@dataclass
class NodeData:
    """One node's private data: three splits in the scenario's own container."""

    node: int
    train: Any
    val: Any
    test: Any
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSettings:
    """Local training budget for one call of ``Scenario.fit``."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


class Scenario(ABC):
    """A federated task on one real dataset.

    Subclasses set ``name``, ``primary_metric`` and ``metric_names``, and take
    their own options (model width, dataset variant) as constructor keywords.
    """

    name: str = ""
    primary_metric: str = ""
    metric_names: tuple[str, ...] = ()
    # The metric used to report each node's gain besides the primary metric.
    gain_metrics: tuple[str, ...] = ()

    @abstractmethod
    def load_nodes(self, data_root: Path, partition: PartitionSettings) -> list[NodeData]:
        """Load the dataset under ``data_root`` and return one ``NodeData`` per node.

        The result depends only on the files and ``partition``, never on global
        random state, so every process that calls it sees the same partition.
        """

    @abstractmethod
    def pool(self, nodes: list[NodeData]) -> NodeData:
        """Concatenate the splits of ``nodes`` into one ``NodeData`` (node id -1)."""

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """Return a new, untrained model. The caller seeds torch beforehand."""

    @abstractmethod
    def fit(self, model: torch.nn.Module, data: NodeData, settings: TrainSettings) -> dict[str, float]:
        """Train ``model`` in place on ``data.train`` and return training metrics (``train_loss``)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: NodeData, split: str = "test") -> dict[str, float]:
        """Return the scenario's metrics of ``model`` on ``data.<split>``.

        Decision thresholds (for F1) are chosen on ``data.val``, never on the
        split being scored.
        """

    @abstractmethod
    def num_examples(self, split: Any) -> int:
        """Return the number of training examples in one split container."""

    def flip_labels(self, data: NodeData) -> NodeData:
        """Return a copy of ``data`` with poisoned training labels, for the ``label_flip`` attack.

        Only ``data.train`` changes; ``data`` itself is left as it is, because
        node data is cached and shared within a process.

        Raises
        ------
        NotImplementedError
            If the scenario defines no label flip.
        """
        raise NotImplementedError(f"Scenario {self.name!r} does not support attack=label_flip; choose another attack.")

    def load_holdout(self, data_root: Path, partition: PartitionSettings) -> NodeData:
        """Return the ``partition.holdout`` rows reserved for the server, as the ``train`` split of a ``NodeData``.

        No node's splits contain these rows. The ``val`` and ``test`` splits are empty.

        Raises
        ------
        NotImplementedError
            If the scenario cannot reserve rows for the server.
        """
        raise NotImplementedError(
            f"Scenario {self.name!r} cannot reserve rows for the server; set data.holdout=0 and use a strategy other than trust."
        )

    # --- DP-SGD (privacy.dp_sgd) ------------------------------------------

    def training_dataset(self, data: NodeData) -> torch.utils.data.Dataset:
        """Return ``data.train`` as a map-style dataset with one item per privacy unit, for DP-SGD.

        A privacy unit is what DP-SGD protects: its gradient is clipped as a
        whole, and epsilon bounds what a model reveals about any one unit.
        Items are tuples of tensors. A dataset that defines ``__getitems__``
        must return the whole batch already collated, also for an empty
        list of indices (an empty Poisson batch).

        Raises
        ------
        NotImplementedError
            If the scenario does not support DP-SGD.
        """
        raise NotImplementedError(f"Scenario {self.name!r} does not support privacy=dp_sgd; choose privacy=none or central.")

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Return the mean loss over the units of a non-empty batch from ``training_dataset``.

        Each unit's term may depend only on that unit, because Opacus clips
        per-unit gradients. ``generator`` is the only source of randomness
        the loss may use (negative sampling, for example). ``model`` may be
        wrapped by Opacus, so the loss calls it, never its submodules.

        Raises
        ------
        NotImplementedError
            If the scenario does not support DP-SGD.
        """
        raise NotImplementedError(f"Scenario {self.name!r} does not support privacy=dp_sgd; choose privacy=none or central.")

    def optimizer(self, parameters: Any, lr: float) -> torch.optim.Optimizer:
        """Return the optimizer of the private training loop; Adam unless a scenario overrides it."""
        return torch.optim.Adam(parameters, lr=lr)

"""Machine-failure prediction across factories (AI4I 2020)."""

from __future__ import annotations

from pathlib import Path

import torch

from scenarios.base import NodeData, PartitionSettings
from scenarios.binary import BinaryScenario
from scenarios.maintenance.data import FEATURE_NAMES, load_maintenance_holdout, load_maintenance_nodes
from scenarios.maintenance.model import build_maintenance_model


class MaintenanceScenario(BinaryScenario):
    """Binary machine-failure classification on AI4I 2020.

    Features are the five sensor and process readings, scaled with fixed
    reference constants, and the one-hot product type (L, M, H). ``scheme="natural"`` puts each
    product type on its own node (3 nodes).

    Parameters
    ----------
    hidden : int
        Hidden-layer width of the MLP; 0 gives logistic regression.
    hidden_layers : int
        Number of hidden layers when ``hidden > 0``.
    pos_weight : float, optional
        Positive-class weight in the loss; ``None`` (the default) weights
        both classes equally.
    standardize : bool
        Also standardise the readings with each node's training statistics.
        Off by default because it lowers the federated ROC-AUC under label
        skew (see ``scenarios.maintenance.data.load_maintenance_nodes``).
    """

    name = "maintenance"
    metric_names = ("roc_auc", "pr_auc", "f1")

    def __init__(
        self,
        hidden: int = 64,
        hidden_layers: int = 2,
        pos_weight: float | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__(pos_weight=pos_weight)
        self.hidden = hidden
        self.hidden_layers = hidden_layers
        self.standardize = standardize

    def load_nodes(self, data_root: Path, partition: PartitionSettings) -> list[NodeData]:
        """Load AI4I 2020 and return one ``NodeData`` per node."""
        return load_maintenance_nodes(Path(data_root), partition, standardize=self.standardize)

    def load_holdout(self, data_root: Path, partition: PartitionSettings) -> NodeData:
        """Return the server's holdout readings (``partition.holdout`` rows, in no node)."""
        return load_maintenance_holdout(Path(data_root), partition, standardize=self.standardize)

    def build_model(self) -> torch.nn.Module:
        """Return a new, untrained MLP; the caller seeds torch beforehand."""
        return build_maintenance_model(len(FEATURE_NAMES), hidden=self.hidden, hidden_layers=self.hidden_layers)


__all__ = ["MaintenanceScenario"]

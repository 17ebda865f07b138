"""Medical image classification across hospitals (MedMNIST, 28x28)."""

from __future__ import annotations

from pathlib import Path

import torch

from scenarios.base import NodeData, PartitionSettings
from scenarios.binary import BinaryScenario
from scenarios.imaging.data import DATASET_KEYS, load_image_holdout, load_image_nodes
from scenarios.imaging.model import SmallCNN


class ImagingScenario(BinaryScenario):
    """Binary classification of 28x28 medical images with a small CNN.

    The official MedMNIST splits are pooled and re-split per node. Pixels are
    normalised with fixed constants. There is no natural partition, so only
    ``iid`` and ``dirichlet`` are accepted.

    Parameters
    ----------
    dataset : str
        ``pneumoniamnist`` (chest X-rays, 5,856 images; 1 = pneumonia) or
        ``breastmnist`` (breast ultrasound, 780 images; 1 = normal or benign).
    channels : int
        Channels of the first convolution block; the second has twice as many.
    hidden : int
        Width of the hidden layer of the classifier head.
    pos_weight : float, optional
        Positive-class weight in the loss; ``None`` (the default) weights
        both classes equally.
    standardize : bool
        Normalise pixels with each node's training statistics. Off by default
        because it widens the gap to the centralized model under label skew
        (see ``scenarios.imaging.data.load_image_nodes``).
    """

    name = "imaging"
    metric_names = ("roc_auc", "accuracy", "f1")

    def __init__(
        self,
        dataset: str = "pneumoniamnist",
        channels: int = 16,
        hidden: int = 64,
        pos_weight: float | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__(pos_weight=pos_weight)
        if dataset not in DATASET_KEYS:
            raise ValueError(f"unknown imaging dataset {dataset!r}; choose one of {sorted(DATASET_KEYS)}")

        self.dataset = dataset
        self.channels = channels
        self.hidden = hidden
        self.standardize = standardize

    def load_nodes(self, data_root: Path, partition: PartitionSettings) -> list[NodeData]:
        """Load the images and return one normalised ``NodeData`` per node."""
        return load_image_nodes(Path(data_root), partition, self.dataset, standardize=self.standardize)

    def load_holdout(self, data_root: Path, partition: PartitionSettings) -> NodeData:
        """Return the server's holdout images (``partition.holdout`` rows, in no node), normalised."""
        return load_image_holdout(Path(data_root), partition, self.dataset, standardize=self.standardize)

    def build_model(self) -> torch.nn.Module:
        """Return a new, untrained CNN; the caller seeds torch beforehand."""
        return SmallCNN(channels=self.channels, hidden=self.hidden)


__all__ = ["ImagingScenario"]

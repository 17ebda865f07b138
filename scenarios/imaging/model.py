"""A small CNN for 28x28 grey-scale images, without batch normalisation.

BatchNorm keeps running statistics across examples, which per-example
gradient clipping in DP-SGD (Opacus) does not support, so the blocks use
GroupNorm instead.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv-GroupNorm-ReLU-maxpool blocks and a two-layer head with one output logit.

    Parameters
    ----------
    channels : int
        Channels of the first block; the second block has twice as many. Must
        be divisible by ``groups``.
    hidden : int
        Width of the hidden layer of the head.
    groups : int
        Number of GroupNorm groups in each block.
    image_size : int
        Height and width of the square input images.
    """

    def __init__(self, channels: int = 16, hidden: int = 64, groups: int = 4, image_size: int = 28) -> None:
        super().__init__()
        if channels < 1 or hidden < 1 or groups < 1 or channels % groups != 0:
            raise ValueError(
                f"invalid CNN shape channels={channels}, hidden={hidden}, groups={groups}; "
                "need positive values and channels divisible by groups"
            )
        if image_size % 4 != 0:
            raise ValueError(f"image_size={image_size} must be divisible by 4 (two 2x2 poolings)")

        self.features = nn.Sequential(
            _conv_block(1, channels, groups),
            _conv_block(channels, 2 * channels, groups),
        )
        pooled_size = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * pooled_size * pooled_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return one logit per image for a batch of shape ``(n, 1, h, w)``."""
        return self.head(self.features(images)).squeeze(-1)


def _conv_block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )

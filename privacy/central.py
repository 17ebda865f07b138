"""Central DP with Flower's strategy wrappers (``flwr.serverapp.strategy.DifferentialPrivacy*``).

Each node's model update is clipped to an L2 norm, on the server or on the
node, and the server adds Gaussian noise with standard deviation
``noise_multiplier * clipping_norm / num_sampled`` to the mean of the
clipped updates. That is the Gaussian mechanism on one node's whole update,
so epsilon protects a node's entire dataset (node-level DP) in the models the
server releases. The server itself sees every update before noise, so
use ``privacy=dp_sgd`` to protect examples against the server.

The noise is calibrated for an unweighted mean, so under central DP every
node reports the weight ``privacy.UNIFORM_WEIGHT_KEY = 1`` in its training and
evaluation metrics, and FedAvg averages both by it.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

SIDES = ("server", "client")
CLIPPINGS = ("fixed", "adaptive")

# Reported delta of central DP when the config leaves it unset.
DEFAULT_CENTRAL_DELTA = 1e-5


@dataclass(frozen=True)
class CentralDPSettings:
    """Settings of the ``central`` privacy mode.

    Parameters
    ----------
    side : str
        ``server`` clips updates on the server; ``client`` clips on the nodes
        before upload (the server sends the clipping norm).
    clipping : str
        ``fixed`` (``clipping_norm``) or ``adaptive`` (the norm tracks the
        ``target_clipped_quantile`` of update norms, Andrew et al. 2021).
    noise_multiplier : float
        Noise standard deviation divided by the clipping norm.
    clipping_norm : float
        Fixed clipping norm.
    initial_clipping_norm, target_clipped_quantile, clip_norm_lr : float
        Adaptive clipping: starting norm, target quantile and its step size.
    clipped_count_stddev : float, optional
        Adaptive clipping: noise on the count of clipped updates; None lets
        Flower choose ``num_sampled / 20``.
    delta : float, optional
        Delta of the reported epsilon; None uses ``DEFAULT_CENTRAL_DELTA``.
    """

    side: str = "server"
    clipping: str = "fixed"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        checks = [
            ("side", self.side in SIDES, f"one of {SIDES}"),
            ("clipping", self.clipping in CLIPPINGS, f"one of {CLIPPINGS}"),
            ("noise_multiplier", self.noise_multiplier >= 0, ">= 0"),
            ("clipping_norm", self.clipping_norm > 0, "> 0"),
            ("initial_clipping_norm", self.initial_clipping_norm > 0, "> 0"),
            ("target_clipped_quantile", 0 <= self.target_clipped_quantile <= 1, "in [0, 1]"),
            ("clip_norm_lr", self.clip_norm_lr > 0, "> 0"),
            ("delta", self.delta is None or 0 < self.delta < 1, "in (0, 1)"),
        ]
        for key, valid, allowed in checks:
            if not valid:
                raise ValueError(f"Invalid setting privacy.{key}={getattr(self, key)!r}: it must be {allowed}.")

    @classmethod
    def from_dict(cls, privacy: Any) -> CentralDPSettings:
        """Build the settings from the ``privacy`` config or ``TaskSpec.privacy``, ignoring ``name``."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in dict(privacy).items() if key in known})

    @property
    def reported_delta(self) -> float:
        """Delta of the epsilon in the summary."""
        return self.delta if self.delta is not None else DEFAULT_CENTRAL_DELTA


def num_sampled_nodes(nodes: int, fraction: float, min_nodes: int) -> int:
    """Return how many nodes FedAvg samples per training round (``int(nodes * fraction)``, at least ``min_nodes``)."""
    return max(int(nodes * fraction), min_nodes)


def wrap_central_dp(strategy: Any, settings: CentralDPSettings, num_sampled: int) -> Any:
    """Wrap ``strategy`` in the Flower central-DP wrapper that ``settings`` name."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    if settings.clipping == "fixed":
        wrapper = DifferentialPrivacyServerSideFixedClipping if settings.side == "server" else DifferentialPrivacyClientSideFixedClipping
        return wrapper(strategy, settings.noise_multiplier, settings.clipping_norm, num_sampled)

    wrapper = DifferentialPrivacyServerSideAdaptiveClipping if settings.side == "server" else DifferentialPrivacyClientSideAdaptiveClipping
    return wrapper(
        strategy,
        settings.noise_multiplier,
        num_sampled,
        initial_clipping_norm=settings.initial_clipping_norm,
        target_clipped_quantile=settings.target_clipped_quantile,
        clip_norm_lr=settings.clip_norm_lr,
        clipped_count_stddev=settings.clipped_count_stddev,
    )


def central_epsilon(settings: CentralDPSettings, sample_rate: float, releases: int) -> float:
    """Return the node-level epsilon after ``releases`` noised aggregates.

    Uses Opacus's RDP accountant with ``settings.noise_multiplier`` (for
    adaptive clipping Flower splits this noise between the update and the
    clipped count, so the pair together has this multiplier).

    NOTE: FedAvg samples a fixed number of nodes without replacement, but
    the RDP bound assumes Poisson sampling at ``sample_rate``. The two agree
    when every node trains in every round (``sample_rate = 1``).
    """
    from privacy.ledger import compute_epsilon

    if releases == 0:
        return 0.0
    if settings.noise_multiplier == 0:
        return math.inf
    return compute_epsilon([(settings.noise_multiplier, min(1.0, sample_rate), releases)], settings.reported_delta, "rdp")


def clip_on_node(
    config: Any, privacy: Any, new_state: OrderedDict[str, torch.Tensor], global_state: OrderedDict[str, torch.Tensor], metrics: dict[str, float]
) -> None:
    """Clip a node's update in place for client-side central DP, as Flower's clipping mods do.

    Does nothing unless the server sent a clipping norm (``KEY_CLIPPING_NORM``
    in the message config). Adaptive clipping also adds ``KEY_NORM_BIT`` to
    ``metrics``: 1.0 when the update was clipped, as the server's norm update expects.
    """
    from flwr.supercore.differential_privacy import (
        KEY_CLIPPING_NORM,
        KEY_NORM_BIT,
        compute_adaptive_clip_model_update,
        compute_clip_model_update,
    )

    if KEY_CLIPPING_NORM not in config:
        return

    clipping_norm = float(config[KEY_CLIPPING_NORM])
    keys = list(new_state)
    trained = [new_state[key].detach().cpu().numpy().copy() for key in keys]
    received = [global_state[key].detach().cpu().numpy() for key in keys]

    if CentralDPSettings.from_dict(privacy).clipping == "adaptive":
        norm_bit = compute_adaptive_clip_model_update(trained, received, clipping_norm)
        metrics[KEY_NORM_BIT] = float(norm_bit)
    else:
        compute_clip_model_update(trained, received, clipping_norm)

    for key, array in zip(keys, trained, strict=True):
        new_state[key] = torch.from_numpy(np.asarray(array, dtype=array.dtype))
    logger.debug("Clipped the update to norm %.4g before upload", clipping_norm)

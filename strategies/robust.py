"""Byzantine-robust aggregation rules: Flower's own, with checked settings and exact distances.

The rules are Flower 1.42's ``Krum``, ``MultiKrum``, ``Bulyan``,
``FedTrimmedAvg`` and ``FedMedian`` from ``flwr.serverapp.strategy``. The
subclasses here change two things:

- Settings that void a rule's guarantee are rejected when the strategy is
  built: Krum and MultiKrum need ``n > 2f + 2`` updates per round, Bulyan
  needs ``n >= 4f + 3``, and a trimmed mean must keep at least one update.
  The error names the values and the setting to change.
- Krum's selection step uses float64 distances between *centred* vectors.
  Flower computes ``|x|^2 + |y|^2 - 2 x.y`` on the raw float32 weights, where
  the large common part of the weights cancels catastrophically, so two
  updates 1e-3 apart in weights of size 1 get distances made of rounding
  noise. Subtracting the mean vector first removes that common part. The
  self-distance is also excluded explicitly rather than by sort position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

logger = logging.getLogger(__name__)


def flatten_floats(record: ArrayRecord) -> np.ndarray:
    """Concatenate the floating-point arrays of ``record`` into one float64 vector.

    Integer buffers (step counters) are left out because they carry no
    information about the direction of an update.
    """
    parts = [array.numpy().astype(np.float64).ravel() for array in record.values() if np.issubdtype(np.dtype(array.dtype), np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def centred_squared_distances(vectors: np.ndarray) -> np.ndarray:
    """Return the pairwise squared L2 distances of the rows of ``vectors``, in float64.

    Rows are centred on their mean before the Gram-matrix formula, so that the
    shared part of the vectors does not swamp their differences. Rounding
    can leave tiny negative values, which are clipped to 0.
    """
    matrix = np.asarray(vectors, dtype=np.float64)
    centred = matrix - matrix.mean(axis=0, keepdims=True)

    norms = np.einsum("ij,ij->i", centred, centred)
    distances = norms[:, None] + norms[None, :] - 2.0 * centred @ centred.T
    np.fill_diagonal(distances, 0.0)
    return np.maximum(distances, 0.0)


def krum_scores(distances: np.ndarray, num_malicious: int) -> np.ndarray:
    """Return each vector's Krum score: the sum of squared distances to its ``n - f - 2`` nearest others."""
    num_vectors = distances.shape[0]
    num_closest = max(1, num_vectors - num_malicious - 2)

    others = distances + np.diag(np.full(num_vectors, np.inf))
    nearest = np.sort(others, axis=1)[:, : min(num_closest, max(1, num_vectors - 1))]
    return nearest.sum(axis=1)


def select_multikrum_centred(contents: list[RecordDict], num_malicious_nodes: int, num_nodes_to_select: int) -> list[RecordDict]:
    """Select the ``num_nodes_to_select`` contents with the lowest Krum scores.

    A drop-in for Flower's ``select_multikrum`` (same signature, also usable as
    Bulyan's ``selection_rule``) that computes distances centred and in float64.
    Ties go to the earlier reply.
    """
    record_key = next(iter(contents[0].array_records.keys()))
    vectors = np.stack([flatten_floats(cast(ArrayRecord, content[record_key])) for content in contents])

    best = multikrum_selection(centred_squared_distances(vectors), num_malicious_nodes, num_nodes_to_select)
    return [contents[i] for i in best]


def multikrum_selection(distances: np.ndarray, num_malicious: int, num_selected: int) -> list[int]:
    """Return the positions of the ``num_selected`` vectors with the lowest Krum scores, best first.

    Parameters
    ----------
    distances : np.ndarray
        Pairwise squared L2 distances, shape (n, n), symmetric. The plaintext
        rules compute them with ``centred_squared_distances``; ``he_robust``
        gets them decrypted from encrypted updates.
    num_malicious : int
        f, the malicious vectors assumed.
    num_selected : int
        How many positions to return; 1 is Krum.

    Ties go to the earlier position.
    """
    scores = krum_scores(np.asarray(distances, dtype=np.float64), num_malicious)
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_selected]]


def max_krum_malicious(num_nodes: int) -> int:
    """Return the largest f with ``n > 2f + 2`` (0 when even f = 0 fails)."""
    return max(0, (num_nodes - 3) // 2)


def max_bulyan_malicious(num_nodes: int) -> int:
    """Return the largest f with ``n >= 4f + 3`` (0 when even f = 0 fails)."""
    return max(0, (num_nodes - 3) // 4)


def check_krum(num_nodes: int, num_malicious: int, rule: str = "krum") -> None:
    """Raise ValueError unless ``num_nodes > 2 * num_malicious + 2``."""
    if num_nodes <= 2 * num_malicious + 2:
        raise ValueError(
            f"strategy={rule} with strategy.num_malicious={num_malicious} needs more than 2f+2 = {2 * num_malicious + 2} "
            f"training nodes per round, but the run samples {num_nodes}. Raise nodes (or train.fraction), or lower "
            f"strategy.num_malicious to at most {max_krum_malicious(num_nodes)}."
        )


def check_bulyan(num_nodes: int, num_malicious: int) -> None:
    """Raise ValueError unless ``num_nodes >= 4 * num_malicious + 3``."""
    if num_nodes < 4 * num_malicious + 3:
        raise ValueError(
            f"strategy=bulyan with strategy.num_malicious={num_malicious} needs at least 4f+3 = {4 * num_malicious + 3} "
            f"training nodes per round, but the run samples {num_nodes}. Raise nodes (or train.fraction), or lower "
            f"strategy.num_malicious to at most {max_bulyan_malicious(num_nodes)}."
        )


def check_trimmed_mean(num_nodes: int, beta: float) -> None:
    """Raise ValueError when ``beta`` trims every update; warn when it trims none."""
    trimmed = int(beta * num_nodes)
    if not 0.0 <= beta < 0.5 or 2 * trimmed >= num_nodes:
        raise ValueError(
            f"strategy.beta={beta} trims {trimmed} of {num_nodes} updates from each end, which leaves none. "
            f"Set strategy.beta in [0, 0.5)."
        )
    if trimmed == 0:
        logger.warning("strategy.beta=%s trims no update out of %d; the trimmed mean is a plain mean. Raise strategy.beta to at least %.3f.", beta, num_nodes, 1.0 / num_nodes)


class _CentredMultiKrumMixin:
    """Flower's MultiKrum ``aggregate_train`` with the centred float64 selection."""

    num_malicious_nodes: int
    num_nodes_to_select: int | None
    weighted_by_key: str

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Select with centred float64 Krum scores, then average the selected replies."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)  # type: ignore[attr-defined]
        if not valid_replies:
            return None, None

        num_replies = len(valid_replies)
        if num_replies <= 2 * self.num_malicious_nodes + 2:
            logger.warning("Round %d: %d replies <= 2f+2 = %d; Krum's guarantee does not hold this round", server_round, num_replies, 2 * self.num_malicious_nodes + 2)

        to_select = self.num_nodes_to_select or max(1, num_replies - self.num_malicious_nodes)
        selected = select_multikrum_centred([msg.content for msg in valid_replies], self.num_malicious_nodes, to_select)

        arrays = aggregate_arrayrecords(selected, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(selected, self.weighted_by_key)  # type: ignore[attr-defined]
        return arrays, metrics


class CentredKrum(_CentredMultiKrumMixin, Krum):
    """Flower's ``Krum`` with centred float64 distances; takes ``Krum``'s keyword arguments."""


class CentredMultiKrum(_CentredMultiKrumMixin, MultiKrum):
    """Flower's ``MultiKrum`` with centred float64 distances.

    ``num_nodes_to_select=None`` selects ``n - f`` of the ``n`` replies of each round.
    """

    def summary(self) -> None:
        """Log the settings, then the sampling settings."""
        selected = self.num_nodes_to_select or "n - f"
        logger.info("\t├──> MultiKrum, centred float64 distances: f = %d, selects %s per round", self.num_malicious_nodes, selected)
        FedAvg.summary(self)


class CentredBulyan(Bulyan):
    """Flower's ``Bulyan`` whose Multi-Krum step uses centred float64 distances.

    Takes ``Bulyan``'s keyword arguments; ``selection_rule`` defaults to
    ``select_multikrum_centred``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("selection_rule", select_multikrum_centred)
        super().__init__(**kwargs)


def expected_train_nodes(sampling: dict[str, Any]) -> int:
    """Return how many nodes FedAvg's sampling picks per round when every node is connected."""
    return max(int(sampling["min_available_nodes"] * sampling["fraction_train"]), int(sampling["min_train_nodes"]))


def _num_malicious(strategy_cfg: Any, default: int) -> int:
    value = strategy_cfg.get("num_malicious")
    return default if value is None else int(value)


def build_krum(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> Strategy:
    """Build ``CentredKrum``; ``strategy.num_malicious: null`` takes the largest f the node count allows."""
    num_nodes = expected_train_nodes(sampling)
    num_malicious = _num_malicious(strategy_cfg, max_krum_malicious(num_nodes))
    check_krum(num_nodes, num_malicious, "krum")
    logger.info("Krum assumes f = %d malicious of %d nodes per round", num_malicious, num_nodes)
    return CentredKrum(num_malicious_nodes=num_malicious, **sampling)


def build_multikrum(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> Strategy:
    """Build ``CentredMultiKrum``; ``strategy.num_selected: null`` selects ``n - f`` per round."""
    num_nodes = expected_train_nodes(sampling)
    num_malicious = _num_malicious(strategy_cfg, max_krum_malicious(num_nodes))
    check_krum(num_nodes, num_malicious, "multikrum")

    num_selected = strategy_cfg.get("num_selected")
    if num_selected is not None and not 1 <= int(num_selected) <= num_nodes:
        raise ValueError(f"Invalid setting strategy.num_selected={num_selected}: it must be in 1..{num_nodes} (the nodes per round), or null for n - f.")
    logger.info("MultiKrum assumes f = %d malicious of %d nodes per round", num_malicious, num_nodes)
    strategy = CentredMultiKrum(num_malicious_nodes=num_malicious, **sampling)
    strategy.num_nodes_to_select = None if num_selected is None else int(num_selected)
    return strategy


def build_bulyan(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> Strategy:
    """Build ``CentredBulyan``; ``strategy.num_malicious: null`` takes the largest f the node count allows."""
    num_nodes = expected_train_nodes(sampling)
    num_malicious = _num_malicious(strategy_cfg, max_bulyan_malicious(num_nodes))
    check_bulyan(num_nodes, num_malicious)
    logger.info("Bulyan assumes f = %d malicious of %d nodes per round", num_malicious, num_nodes)
    return CentredBulyan(num_malicious_nodes=num_malicious, **sampling)


def build_trimmed_mean(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> Strategy:
    """Build Flower's ``FedTrimmedAvg`` after checking ``strategy.beta`` against the nodes per round."""
    beta = float(strategy_cfg.get("beta", 0.2))
    check_trimmed_mean(expected_train_nodes(sampling), beta)
    return FedTrimmedAvg(beta=beta, **sampling)


def build_median(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> Strategy:
    """Build Flower's ``FedMedian`` (coordinate-wise median; no settings)."""
    return FedMedian(**sampling)


# Strategy name -> builder, registered in strategies.factory.BUILDERS.
ROBUST_BUILDERS = {
    "krum": build_krum,
    "multikrum": build_multikrum,
    "bulyan": build_bulyan,
    "trimmed_mean": build_trimmed_mean,
    "median": build_median,
}

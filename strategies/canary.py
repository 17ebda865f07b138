"""Canary promotion: a new aggregate replaces the global model only if it does not hurt.

Each aggregate the inner stack returns is a *candidate*. A fraction of the
nodes (the canaries) score both the current global model and the candidate
on their own test split, A/B style, and report both. The candidate is
promoted when the mean change of the decision metric across canaries is at
least ``-tolerance``; otherwise the round is rolled back and the current model
stays. The decision uses only metrics the nodes report, so it works the same
when the models are CKKS-encrypted.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger(__name__)

CANARY_QUERY = f"{MessageType.QUERY}.canary"
CURRENT = "current"
CANDIDATE = "candidate"


def mean_delta(replies: dict[int, dict[str, float]], metric: str) -> float:
    """Return the mean of ``candidate.<metric> - current.<metric>`` over nodes, skipping NaN."""
    deltas = [m[f"{CANDIDATE}.{metric}"] - m[f"{CURRENT}.{metric}"] for m in replies.values()]
    finite = [d for d in deltas if not math.isnan(d)]
    return sum(finite) / len(finite) if finite else math.nan


class CanaryPromotion(Strategy):
    """Promote an aggregate only if canary nodes do not score it worse than the current model.

    Parameters
    ----------
    strategy : Strategy
        The inner stack that produces candidates.
    task : ConfigRecord
        The task record nodes need to load their data.
    metric : str
        Decision metric, e.g. ``roc_auc`` or ``hr_at_10`` (higher is better).
    fraction : float (default: 0.5)
        Share of connected nodes asked to score each candidate, in (0, 1].
    tolerance : float (default: 0.01)
        Largest accepted mean drop of ``metric``, >= 0.
    seed : int (default: 0)
        Seeds the choice of canaries per round.
    audit : object, optional
        The run's audit log.
    flag_contributors : bool (default: False)
        On rollback, name the partitions that contributed to the rejected
        candidate in the audit log and the log.
    """

    def __init__(
        self,
        strategy: Strategy,
        task: ConfigRecord,
        metric: str,
        fraction: float = 0.5,
        tolerance: float = 0.01,
        seed: int = 0,
        audit: Any = None,
        flag_contributors: bool = False,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"canary.fraction={fraction} is invalid; it must be in (0, 1].")
        if tolerance < 0.0:
            raise ValueError(f"canary.tolerance={tolerance} is invalid; it must be >= 0.")
        self.strategy = strategy
        self.task = task
        self.metric = metric
        self.fraction = fraction
        self.tolerance = tolerance
        self.seed = seed
        self.audit = audit
        self.flag_contributors = flag_contributors
        self._grid: Grid | None = None
        self._current: ArrayRecord | None = None
        self._current_drift: list[bytes] | None = None
        self._current_version_round = 0

    def summary(self) -> None:
        """Log the canary settings, then the inner stack's."""
        logger.info("\t├──> CanaryPromotion: %.0f%% of nodes, metric %s, tolerance %.4f", 100 * self.fraction, self.metric, self.tolerance)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember the current model and the grid, then delegate."""
        self._grid = grid
        self._current = arrays
        encrypted = self._encrypted()
        if encrypted is not None:
            self._current_drift = list(encrypted.drift) if encrypted.drift is not None else None
            self._current_version_round = encrypted.version_round
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the inner stack, then promote or roll back the candidate."""
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        encrypted = self._encrypted()
        has_candidate = encrypted.version_round == server_round if encrypted is not None else arrays is not None
        if not has_candidate or self._grid is None:
            return arrays, metrics

        results = self._ask_canaries(server_round, arrays, encrypted)
        delta = mean_delta(results, self.metric)
        if results and not math.isnan(delta) and delta < -self.tolerance:
            self._roll_back(server_round, encrypted, delta, results, replies)
            return None, metrics

        self._record("promotion", server_round, delta, results)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Pass through."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pass through."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    # --- steps ----------------------------------------------------------------

    def _encrypted(self) -> Any:
        layer = self.strategy
        while True:
            if hasattr(layer, "drift") and hasattr(layer, "public_context"):
                return layer
            if not hasattr(layer, "strategy"):
                return None
            layer = layer.strategy

    def _canaries(self, server_round: int, excluded: set[int] | None = None) -> list[int]:
        # A validator node (he_robust) has no test split, so it never scores a candidate.
        node_ids = sorted(set(self._grid.get_node_ids()) - (excluded or set()))
        count = max(1, round(self.fraction * len(node_ids)))
        return sorted(random.Random(self.seed * 100_003 + server_round).sample(node_ids, count))

    def _ask_canaries(self, server_round: int, candidate: ArrayRecord | None, encrypted: Any) -> dict[int, dict[str, float]]:
        """Send both models to the canaries; return {node id: metrics with current./candidate. prefixes}."""
        config = ConfigRecord({**dict(self.task), "server-round": server_round})
        content = RecordDict({"config": config})
        if encrypted is not None:
            config["encryption"] = "ckks"
            config["he-initial-hash"] = encrypted.initial_hash
            for key, value in getattr(encrypted, "encryption_fields", {}).items():
                config[key] = value
            if self._current_drift is not None:
                content[CURRENT] = ConfigRecord({"batch": self._current_drift})
            content[CANDIDATE] = ConfigRecord({"batch": list(encrypted.drift)})
        else:
            content[CURRENT] = self._current
            content[CANDIDATE] = candidate

        nodes = self._canaries(server_round, set(getattr(encrypted, "excluded_node_ids", ())))
        messages = [Message(content=content, message_type=CANARY_QUERY, dst_node_id=node_id) for node_id in nodes]
        results: dict[int, dict[str, float]] = {}
        for reply in self._grid.send_and_receive(messages, timeout=3600):
            if reply.has_error():
                logger.warning("canary: node %d failed to score the candidate: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            record = next(iter(reply.content.metric_records.values()))
            results[reply.metadata.src_node_id] = {key: float(value) for key, value in record.items()}
        return results

    def _roll_back(self, server_round: int, encrypted: Any, delta: float, results: dict, replies: list[Message]) -> None:
        if encrypted is not None:
            encrypted.drift = self._current_drift
            encrypted.version_round = self._current_version_round
        contributors = sorted(
            int(m.content.config_records["node"]["partition-id"])
            for m in replies
            if not m.has_error() and "node" in m.content.config_records
        )
        logger.warning(
            "canary: round %d candidate rolled back, mean %s change %.4f < -%.4f%s",
            server_round, self.metric, delta, self.tolerance,
            f"; contributors {contributors}" if self.flag_contributors else "",
        )
        self._record("rollback", server_round, delta, results, contributors if self.flag_contributors else None)

    def _record(self, event: str, server_round: int, delta: float, results: dict, flagged: list[int] | None = None) -> None:
        if event == "promotion":
            logger.info("canary: round %d candidate promoted, mean %s change %+.4f over %d nodes", server_round, self.metric, delta, len(results))
        if self.audit is None:
            return
        per_node = {str(node): metrics.get(f"{CANDIDATE}.{self.metric}", math.nan) - metrics.get(f"{CURRENT}.{self.metric}", math.nan) for node, metrics in results.items()}
        fields: dict[str, Any] = {
            "round": server_round,
            "metric": self.metric,
            "mean_delta": None if math.isnan(delta) else delta,
            "tolerance": self.tolerance,
            "canaries": sorted(results),
            "deltas": {node: (None if math.isnan(value) else value) for node, value in per_node.items()},
        }
        if flagged is not None:
            fields["flagged_contributors"] = flagged
        self.audit.append(event, **fields)

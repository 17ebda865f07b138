"""Trust-weighted aggregation in the style of FLTrust, with reputation and quarantine.

FLTrust (Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated
Learning via Trust Bootstrapping", NDSS 2021): the server keeps a small root
dataset that no node has. Each round it trains the global model on that
data, as a node would, to get a reference update ``g0``. Each node update
``g_i`` gets the trust score ``ReLU(cos(g_i, g0))``, is rescaled to the norm
of ``g0``, and the new global update is the score-weighted mean of the
rescaled updates. An update pointing away from the reference gets weight 0,
and rescaling caps what any single node can contribute.

On top of the scores, ``strategies.reputation`` keeps a moving average per
node and quarantines nodes that stay below a threshold. Every score, weight,
quarantine and release goes to the log, ``metrics.jsonl`` (phase ``trust``)
and the audit log.

The server runs the reference training itself, in the ServerApp process
(``strategies.root_reference``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.recording import partition_of
from strategies.reputation import ReputationBook
from strategies.updates import arrays_from_update, report_event, stack_updates, to_numpy

logger = logging.getLogger(__name__)

# (server round, global arrays, each node's num-examples) -> flat reference update.
ReferenceFn = Callable[[int, dict[str, np.ndarray], list[float]], np.ndarray]


def trust_scores(updates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Return ``ReLU(cos(update_i, reference))`` for each row of ``updates``.

    A zero update or a zero reference scores 0.
    """
    updates = np.asarray(updates, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)

    norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(reference)
    dots = updates @ reference
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.maximum(cosines, 0.0)


def trust_aggregate(updates: np.ndarray, reference: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
    """Return the score-weighted mean of the updates rescaled to the reference norm.

    Returns None when every score is 0, because then no update can be trusted.
    """
    total = float(np.sum(scores))
    if total <= 0.0:
        return None

    norms = np.linalg.norm(updates, axis=1)
    factors = np.divide(np.linalg.norm(reference), norms, out=np.zeros_like(norms), where=norms > 0)
    weights = scores / total
    return (weights * factors) @ updates


class TrustWeighting(FedAvg):
    """FLTrust-style aggregation with per-node reputation and quarantine.

    Parameters
    ----------
    reference_fn : callable
        ``(server_round, global_arrays, node_examples) -> flat reference update``
        (see ``strategies.root_reference.RootReference``).
    reputation : ReputationBook
        Reputation state; it may come from a checkpoint.
    sink : object, optional
        The run log (``record_event``).
    audit : object, optional
        The audit log (``append``).
    **kwargs
        FedAvg's sampling and metric keywords.
    """

    def __init__(self, reference_fn: ReferenceFn, reputation: ReputationBook | None = None, sink: Any = None, audit: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference_fn = reference_fn
        self.reputation = reputation or ReputationBook()
        self.sink = sink
        self.audit = audit
        self.node_ids: dict[int, int] = {}
        self._global: dict[str, np.ndarray] = {}
        self._global_record: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the trust and reputation settings, then FedAvg's."""
        logger.info("\t├──> TrustWeighting (FLTrust scores, reputation %s)", self.reputation.settings)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Release nodes whose quarantine is over, sample as FedAvg does, and leave out quarantined nodes."""
        self._global = to_numpy(arrays)
        self._global_record = arrays

        for partition_id in self.reputation.release_due(server_round):
            logger.info("Round %d: partition %d released from quarantine, on probation", server_round, partition_id)
            self._report(server_round, "released", partition_id)

        messages = list(super().configure_train(server_round, arrays, config, grid))
        left_out = {pid for pid in self.node_ids if self.reputation.is_quarantined(pid, server_round)}
        quarantined_nodes = {self.node_ids[pid] for pid in left_out}
        if left_out:
            logger.info("Round %d: partitions %s are quarantined and not sampled", server_round, sorted(left_out))
        return [message for message in messages if message.metadata.dst_node_id not in quarantined_nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Score each update against the server's reference update and aggregate by score."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None

        for reply in valid:
            self.node_ids[partition_of(reply)] = int(reply.metadata.src_node_id)

        updates = stack_updates(valid, self._global)
        examples = [float(next(iter(reply.content.metric_records.values()))[self.weighted_by_key]) for reply in valid]
        reference = self.reference_fn(server_round, self._global, examples)

        scores = trust_scores(updates, reference)
        self._record_scores(server_round, valid, scores)

        aggregate = trust_aggregate(updates, reference, scores)
        metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        if aggregate is None:
            logger.warning("Round %d: every trust score is 0; the global model is unchanged", server_round)
            self._report(server_round, "round_skipped", None, replies=len(valid))
            return self._global_record, metrics
        return arrays_from_update(aggregate, self._global), metrics

    def _record_scores(self, server_round: int, replies: list[Message], scores: np.ndarray) -> None:
        total = float(scores.sum())
        by_partition = {partition_of(reply): float(score) for reply, score in zip(replies, scores)}
        quarantined = self.reputation.record_round(by_partition, server_round)

        for reply, score in zip(replies, scores):
            partition_id = partition_of(reply)
            weight = float(score) / total if total > 0 else 0.0
            reputation = self.reputation.reputation(partition_id)
            logger.info("Round %d: partition %d (node %d) trust %.4f weight %.4f reputation %.4f", server_round, partition_id, reply.metadata.src_node_id, score, weight, reputation)
            self._report(server_round, "score", partition_id, node_id=int(reply.metadata.src_node_id), trust=float(score), weight=weight, reputation=reputation)

        for partition_id in quarantined:
            until = self.reputation.standings[partition_id].quarantined_until
            reputation = self.reputation.reputation(partition_id)
            logger.warning("Round %d: partition %d quarantined through round %d (reputation %.4f)", server_round, partition_id, until, reputation)
            self._report(server_round, "quarantined", partition_id, until_round=until, reputation=reputation)

    def _report(self, server_round: int, event: str, partition_id: int | None, **fields: Any) -> None:
        report_event(self.sink, self.audit, "trust", server_round, event, node=partition_id, **fields)

    def state_dict(self) -> dict[str, Any]:
        """Return the reputation state and the partition-to-node-id map, JSON-serializable."""
        return {"reputation": self.reputation.state_dict(), "node_ids": {str(pid): nid for pid, nid in self.node_ids.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.reputation.load_state_dict(state["reputation"])
        self.node_ids = {int(pid): int(nid) for pid, nid in state.get("node_ids", {}).items()}


def build_trust(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> TrustWeighting:
    """Build ``TrustWeighting`` with a reference trained on the server's holdout rows.

    ``resources.extra`` must hold the run's ``spec`` (a ``TaskSpec`` whose
    partition reserves ``strategy.root_size`` holdout rows) and may hold the
    run log as ``sink``.

    Raises
    ------
    ValueError
        If the spec reserves no holdout rows, or a different number than ``strategy.root_size``.
    """
    from strategies.reputation import ReputationSettings
    from strategies.root_reference import RootReference

    spec = resources.extra["spec"]
    root_size = int(strategy_cfg.get("root_size", 200))
    if spec.partition.holdout != root_size:
        raise ValueError(
            f"strategy=trust needs strategy.root_size={root_size} rows held out for the server, but the partition "
            f"holds out {spec.partition.holdout}. Set data.holdout={root_size} (or 0 to follow strategy.root_size)."
        )

    settings = ReputationSettings(**{key: strategy_cfg[key] for key in ReputationSettings.__dataclass_fields__ if key in strategy_cfg})
    reference = RootReference.from_spec(spec, strategy_cfg.get("reference_epochs"))
    return TrustWeighting(reference, ReputationBook(settings), sink=resources.extra.get("sink"), audit=resources.audit, **sampling)

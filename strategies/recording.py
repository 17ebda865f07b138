"""A strategy wrapper that orders replies stably and reports each node's metrics.

Flower delivers replies in arrival order, and floating-point sums depend on
order, so the wrapper sorts replies by the partition id each node reports
before the inner strategy aggregates them. That makes a seeded run repeat
bit for bit. It also hands every node's metrics to a ``RoundSink`` (the run's
``metrics.jsonl`` and progress display), which Flower's strategies only log in
aggregated form, and reports what each phase cost: payload bytes sent and
received, the wait for replies, and the time the inner stack took to aggregate.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger(__name__)

# Reply record (a ConfigRecord) in which a node names its partition.
NODE_KEY = "node"
METRICS_KEY = "metrics"

# Phase of the run-log lines that carry a round's payload bytes and timings.
COST_PHASE = "cost"


class RoundSink(Protocol):
    """Receiver of per-round, per-node results (implemented by the server's run log)."""

    def on_train(self, server_round: int, sampled: int, nodes: dict[int, dict[str, float]], failures: list[str], aggregated: dict[str, float]) -> None: ...

    def on_evaluate(self, server_round: int, sampled: int, nodes: dict[int, dict[str, float]], failures: list[str], aggregated: dict[str, float]) -> None: ...


class RecordingStrategy(Strategy):
    """Wrap ``strategy``: sort replies by partition id and report per-node metrics.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy that samples nodes and aggregates.
    sink : RoundSink
        Receives each round's per-node and aggregated metrics.
    """

    def __init__(self, strategy: Strategy, sink: RoundSink) -> None:
        self.strategy = strategy
        self.sink = sink
        self._sampled: dict[str, int] = {}
        self._bytes_sent: dict[str, int] = {}
        self._sent_at: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"RecordingStrategy({self.strategy!r})"

    def summary(self) -> None:
        """Log this wrapper, then the inner strategy's settings."""
        logger.info("\t├──> RecordingStrategy: replies ordered by partition id, per-node metrics to the run log")
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate to the inner strategy and remember how many nodes were sampled."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._configured("train", messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sort replies, aggregate with the inner strategy, then report."""
        received = time.monotonic()
        ordered = order_replies(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, ordered)
        aggregated = time.monotonic()

        nodes, failures = per_node_metrics(ordered)
        self.sink.on_train(server_round, self._sampled.get("train", len(ordered)), nodes, failures, _as_dict(metrics))
        self._report_cost("train", server_round, ordered, received, aggregated)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate to the inner strategy and remember how many nodes were sampled."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self._configured("evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sort replies, aggregate with the inner strategy, then report."""
        received = time.monotonic()
        ordered = order_replies(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, ordered)
        aggregated = time.monotonic()

        nodes, failures = per_node_metrics(ordered)
        self.sink.on_evaluate(server_round, self._sampled.get("evaluate", len(ordered)), nodes, failures, _as_dict(metrics))
        self._report_cost("evaluate", server_round, ordered, received, aggregated)
        return metrics

    def _configured(self, phase: str, messages: list[Message]) -> None:
        self._sampled[phase] = len(messages)
        self._bytes_sent[phase] = sum(payload_bytes(message) for message in messages)
        self._sent_at[phase] = time.monotonic()

    def _report_cost(self, phase: str, server_round: int, replies: list[Message], received: float, aggregated: float) -> None:
        """Send the phase's payload bytes and timings to the sink as one ``cost`` line.

        ``wait_s`` runs from the end of ``configure_*`` to the arrival of the
        replies, so it includes the nodes' work and the transport. ``aggregate_s``
        is everything the inner stack does with the replies: signature checks,
        validation, the rule itself and, with canary promotion, the canary
        nodes' evaluation exchange.
        """
        if not hasattr(self.sink, "record_event"):
            return
        self.sink.record_event(
            COST_PHASE,
            server_round,
            phase,
            bytes_sent=self._bytes_sent.get(phase, 0),
            bytes_received=sum(payload_bytes(reply) for reply in replies),
            wait_s=round(received - self._sent_at.get(phase, received), 4),
            aggregate_s=round(aggregated - received, 4),
        )


def partition_of(message: Message) -> int | None:
    """Return the partition id a reply names, or None for error replies and old clients."""
    if message.has_error() or NODE_KEY not in message.content.config_records:
        return None
    return int(message.content.config_records[NODE_KEY]["partition-id"])


def payload_bytes(message: Message) -> int:
    """Return the bytes of a message's records as Flower counts them (``count_bytes``).

    This is the payload, not the wire size: serialization framing and, for
    error replies, the error text are left out.
    """
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


def order_replies(replies: Iterable[Message]) -> list[Message]:
    """Sort replies by partition id; replies without one keep their order at the end."""
    replies = list(replies)
    known = [m for m in replies if partition_of(m) is not None]
    unknown = [m for m in replies if partition_of(m) is None]
    return sorted(known, key=lambda m: partition_of(m)) + unknown


# Terminal colour codes (ESC [ ... m) that Ray puts into the error text of a failed ClientApp.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """Return ``text`` without terminal colour codes, for logs and metrics files."""
    return _ANSI_ESCAPE.sub("", text)


def per_node_metrics(replies: list[Message]) -> tuple[dict[int, dict[str, float]], list[str]]:
    """Split replies into {partition id: metrics} and a list of failure reasons."""
    nodes: dict[int, dict[str, float]] = {}
    failures: list[str] = []
    for message in replies:
        if message.has_error():
            failures.append(f"node {message.metadata.src_node_id}: {strip_ansi(message.error.reason)}")
            continue
        partition_id = partition_of(message)
        records = message.content.metric_records
        if partition_id is None or not records:
            continue
        record = next(iter(records.values()))
        nodes[partition_id] = {key: float(value) for key, value in record.items() if isinstance(value, (int, float))}
    return nodes, failures


def aggregate_finite_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Average every metric weighted by ``weighting_key``, skipping NaN values.

    A node whose test split holds one class reports NaN ROC-AUC; Flower's
    default average would turn the whole round's value into NaN.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record_dict in records:
        record = next(iter(record_dict.metric_records.values()))
        weight = float(record[weighting_key])
        for key, value in record.items():
            if key == weighting_key or not isinstance(value, (int, float)) or math.isnan(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + weight * float(value)
            weights[key] = weights.get(key, 0.0) + weight

    result = {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
    result[weighting_key] = sum(float(next(iter(r.metric_records.values()))[weighting_key]) for r in records)
    return MetricRecord(result)


def _as_dict(metrics: MetricRecord | None) -> dict[str, float]:
    if metrics is None:
        return {}
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}

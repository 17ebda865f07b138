"""RecordingStrategy and its helpers on replies built by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict, MetricRecord
from flwr.serverapp.strategy import FedAvg

from conftest import make_reply
from strategies.recording import RecordingStrategy, aggregate_finite_metrics, order_replies, per_node_metrics


class ListSink:
    """Collects what the wrapper reports."""

    def __init__(self) -> None:
        self.train: list[tuple] = []
        self.evaluate: list[tuple] = []

    def on_train(self, server_round, sampled, nodes, failures, aggregated) -> None:
        self.train.append((server_round, sampled, nodes, failures, aggregated))

    def on_evaluate(self, server_round, sampled, nodes, failures, aggregated) -> None:
        self.evaluate.append((server_round, sampled, nodes, failures, aggregated))


def _train_reply(node_id: int, partition_id: int, value: float, examples: float):
    arrays = ArrayRecord([np.full(4, value, dtype=np.float32)])
    return make_reply(node_id, arrays, {"num-examples": examples, "train_loss": value}, partition_id)


def test_order_replies_by_partition() -> None:
    replies = [_train_reply(90, 2, 0.0, 1), make_reply(70, error="lost"), _train_reply(10, 0, 0.0, 1), _train_reply(50, 1, 0.0, 1)]

    ordered = order_replies(replies)

    assert [m.metadata.src_node_id for m in ordered] == [10, 50, 90, 70]


def test_per_node_metrics_and_failures() -> None:
    replies = [_train_reply(10, 0, 0.5, 3), make_reply(70, error="node crashed")]

    nodes, failures = per_node_metrics(replies)

    assert nodes == {0: {"num-examples": 3.0, "train_loss": 0.5}}
    assert failures == ["node 70: node crashed"]


def test_failures_without_colour_codes() -> None:
    reason = "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1) FileNotFoundError: \x1b[1;31mkey missing\x1b[0m"

    _, failures = per_node_metrics([make_reply(70, error=reason)])

    assert failures == ["node 70: ray::ClientAppActor.run() (pid=1) FileNotFoundError: key missing"]


def test_finite_average_skips_nan() -> None:
    records = [
        RecordDict({"metrics": MetricRecord({"num-examples": 1.0, "roc_auc": 0.5, "f1": 0.2})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 3.0, "roc_auc": float("nan"), "f1": 0.6})}),
    ]

    result = aggregate_finite_metrics(records, "num-examples")

    assert result["roc_auc"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((0.2 * 1 + 0.6 * 3) / 4)
    assert result["num-examples"] == 4.0


def test_aggregate_is_order_independent() -> None:
    # Values whose float32 sum depends on order; sorted input makes it stable.
    values = [(0, 1e8, 1.0), (1, 1.0, 1.0), (2, -1e8, 1.0), (3, 3.3, 7.0)]
    forward = [_train_reply(100 + p, p, v, w) for p, v, w in values]
    backward = list(reversed(forward))

    first, _ = RecordingStrategy(FedAvg(), ListSink()).aggregate_train(1, forward)
    second, _ = RecordingStrategy(FedAvg(), ListSink()).aggregate_train(1, backward)

    np.testing.assert_array_equal(first.to_numpy_ndarrays()[0], second.to_numpy_ndarrays()[0])


def test_train_round_reported_to_sink() -> None:
    sink = ListSink()
    strategy = RecordingStrategy(FedAvg(), sink)
    replies = [_train_reply(11, 1, 2.0, 3.0), _train_reply(10, 0, 1.0, 1.0)]

    arrays, metrics = strategy.aggregate_train(4, replies)

    server_round, sampled, nodes, failures, aggregated = sink.train[0]
    assert server_round == 4
    assert sampled == 2
    assert sorted(nodes) == [0, 1]
    assert nodes[1]["train_loss"] == 2.0
    assert failures == []
    assert aggregated["train_loss"] == pytest.approx((1.0 * 1 + 2.0 * 3) / 4)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(4, 1.75, dtype=np.float32))
    assert not math.isnan(metrics["train_loss"])

"""Update validation on built replies: what is dropped, what is logged, and what the round returns."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from conftest import make_reply
from provenance.audit import AuditLog
from strategies.recording import aggregate_finite_metrics
from strategies.validation import UpdateValidation


class EventSink:
    """Collects robustness events as the run log would write them."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def record_event(self, phase, server_round, event, node=None, **fields) -> None:
        self.events.append((phase, server_round, event, node, fields))


class Grid:
    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(100, 100 + self.nodes))


def _fedavg(nodes: int) -> FedAvg:
    return FedAvg(min_train_nodes=nodes, min_available_nodes=nodes, train_metrics_aggr_fn=aggregate_finite_metrics, evaluate_metrics_aggr_fn=aggregate_finite_metrics)


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)), "steps": Array(np.array(4, dtype=np.int64))})


def _reply(partition_id: int, w, steps=5, metrics=None):
    arrays = ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)), "steps": Array(np.asarray(steps))})
    return make_reply(100 + partition_id, arrays, metrics if metrics is not None else {"num-examples": 10.0, "train_loss": 0.1}, partition_id)


def _validated(nodes: int, tmp_path=None, max_norm_ratio=10.0):
    sink = EventSink()
    audit = AuditLog(tmp_path / "audit.jsonl") if tmp_path is not None else None
    strategy = UpdateValidation(_fedavg(nodes), max_norm_ratio=max_norm_ratio, sink=sink, audit=audit)
    strategy.configure_train(1, _global(), ConfigRecord(), Grid(nodes))
    return strategy, sink


def test_nan_reply_dropped_and_logged(caplog, tmp_path) -> None:
    strategy, sink = _validated(3, tmp_path)
    replies = [_reply(0, [1.0, 1.0, 1.0]), _reply(1, [3.0, 3.0, 3.0]), _reply(2, [np.nan, 0.0, 0.0])]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0, 2.0])
    assert metrics["num-examples"] == 20.0
    assert "dropped the reply of node 102 (partition 2): array 'w' contains NaN or Inf" in caplog.text
    assert sink.events == [("validation", 1, "reply_dropped", 2, {"node_id": 102, "reason": "array 'w' contains NaN or Inf"})]

    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "reply_dropped"
    assert entries[-1]["node"] == 2


def test_wrong_shape_reply_dropped(caplog) -> None:
    strategy, _ = _validated(2)
    replies = [_reply(0, [1.0, 1.0, 1.0]), _reply(1, [1.0, 1.0])]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0, 1.0])
    assert "partition 1): array 'w' has shape (2,), the global model has (3,)" in caplog.text


def test_float_buffer_for_integer_dropped(caplog) -> None:
    strategy, _ = _validated(2)
    replies = [_reply(0, [1.0, 1.0, 1.0]), _reply(1, [2.0, 2.0, 2.0], steps=np.float32(5.0))]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        strategy.aggregate_train(1, replies)

    assert "array 'steps' has dtype float32, the global model has int64" in caplog.text


def test_missing_metric_key_does_not_end_round(caplog) -> None:
    strategy, _ = _validated(3)
    replies = [_reply(0, [1.0, 1.0, 1.0]), _reply(1, [3.0, 3.0, 3.0]), _reply(2, [9.0, 9.0, 9.0], metrics={"train_loss": 0.1})]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0, 2.0])
    assert "metrics lack the key 'num-examples'" in caplog.text


def test_extra_metric_key_mismatch_dropped(caplog) -> None:
    strategy, _ = _validated(3)
    replies = [_reply(0, [1.0, 1.0, 1.0]), _reply(1, [3.0, 3.0, 3.0]), _reply(2, [9.0, 9.0, 9.0], metrics={"num-examples": 5.0})]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0, 2.0])
    assert "metrics lack the keys ['train_loss'] that the other replies carry" in caplog.text


def test_zero_examples_dropped(caplog) -> None:
    strategy, _ = _validated(2)
    replies = [_reply(0, [1.0, 1.0, 1.0]), _reply(1, [3.0, 3.0, 3.0], metrics={"num-examples": 0.0, "train_loss": 0.1})]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0, 1.0])
    assert "'num-examples' is 0.0; it must be a finite number > 0" in caplog.text


def test_outsized_norm_dropped(caplog) -> None:
    strategy, _ = _validated(4, max_norm_ratio=5.0)
    replies = [_reply(0, [1.0, 0.0, 0.0]), _reply(1, [0.0, 1.0, 0.0]), _reply(2, [0.0, 0.0, 1.0]), _reply(3, [60.0, 0.0, 0.0])]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    assert "update norm 60 exceeds 5 x the median norm 1" in caplog.text


def test_all_rejected_keeps_previous_model(tmp_path) -> None:
    strategy, sink = _validated(2, tmp_path)
    replies = [_reply(0, [np.inf, 0.0, 0.0]), _reply(1, [1.0, 1.0])]

    arrays, metrics = strategy.aggregate_train(1, replies)

    np.testing.assert_array_equal(arrays["w"].numpy(), [0.0, 0.0, 0.0])
    assert int(arrays["steps"].numpy()) == 4
    assert metrics is None
    assert sink.events[-1] == ("validation", 1, "round_skipped", None, {"replies": 2})
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events == ["reply_dropped", "reply_dropped", "round_skipped"]


def test_integer_buffers_copied_from_global() -> None:
    strategy, _ = _validated(2)
    replies = [_reply(0, [1.0, 1.0, 1.0], steps=9), _reply(1, [3.0, 3.0, 3.0], steps=11)]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays["steps"].dtype == "int64"
    assert int(arrays["steps"].numpy()) == 4


def test_error_replies_pass_through() -> None:
    strategy, _ = _validated(2)
    replies = [_reply(0, [1.0, 1.0, 1.0]), make_reply(101, error="node crashed")]

    arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0, 1.0])


def test_evaluate_reply_missing_key_dropped(caplog) -> None:
    strategy, sink = _validated(2)
    replies = [
        make_reply(100, metrics={"num-examples": 10.0, "roc_auc": 0.8}, partition_id=0, message_type="evaluate"),
        make_reply(101, metrics={"roc_auc": 0.1}, partition_id=1, message_type="evaluate"),
    ]

    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        metrics = strategy.aggregate_evaluate(1, replies)

    assert metrics["roc_auc"] == pytest.approx(0.8)
    assert sink.events[0][2] == "evaluate_reply_dropped"


def test_negative_norm_ratio_rejected() -> None:
    with pytest.raises(ValueError, match=r"validation.max_norm_ratio=-1"):
        UpdateValidation(_fedavg(2), max_norm_ratio=-1)


def test_run_log_records_events(tmp_path) -> None:
    from server.run_log import RunLog

    run_log = RunLog(tmp_path / "metrics.jsonl", num_rounds=1, primary_metric="roc_auc")
    run_log.record_event("validation", 1, "reply_dropped", node=2, node_id=102, reason="array 'w' contains NaN or Inf")
    run_log.record_event("validation", 1, "round_skipped", replies=3)
    run_log.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["scope"] == "node"
    assert lines[0]["node"] == 2
    assert lines[0]["event"] == "reply_dropped"
    assert lines[1]["scope"] == "global"
    assert lines[1]["replies"] == 3

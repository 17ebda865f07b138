"""Canary promotion and rollback, with canary nodes running the real ClientApp handler on real data."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAvg

from clients import app as client_app
from clients.local import build_model
from conftest import make_reply
from provenance.audit import AuditLog
from scenarios.base import PartitionSettings, TrainSettings
from scenarios.spec import TASK_KEY, TaskSpec, scenario_for
from strategies.canary import CanaryPromotion, mean_delta

NODE_IDS = {101: 0, 202: 1}


class LocalGrid:
    """A Grid whose nodes run the ClientApp's query handler in this process."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.sent: list = []

    def get_node_ids(self):
        return list(NODE_IDS)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            metadata = Metadata(
                run_id=1, message_id=f"m{len(self.sent)}", src_node_id=0, dst_node_id=message.metadata.dst_node_id,
                reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type=message.metadata.message_type,
            )
            incoming = make_message(metadata=metadata, content=message.content)
            context = Context(
                run_id=1, node_id=message.metadata.dst_node_id,
                node_config={"partition-id": NODE_IDS[message.metadata.dst_node_id], "num-partitions": 2},
                state=RecordDict(), run_config={},
            )
            replies.append(client_app.canary(incoming, context))
        return replies


@pytest.fixture(scope="module")
def spec(data_root: Path) -> TaskSpec:
    return TaskSpec(
        scenario="maintenance",
        partition=PartitionSettings(num_nodes=2, scheme="iid", seed=0),
        train=TrainSettings(epochs=1, batch_size=64, lr=1e-3, seed=0),
        data_root=str(data_root),
        allow_download=False,
    )


@pytest.fixture(scope="module")
def trained_state(spec: TaskSpec) -> OrderedDict:
    """A model trained on node 0 for a few epochs: a reasonable global model."""
    from clients.local import train_node

    state = build_model(scenario_for(spec), 0).state_dict()
    for server_round in range(1, 4):
        state, _ = train_node(spec, 0, state, server_round)
    return state


def _replies(state: OrderedDict) -> list:
    arrays = ArrayRecord(state)
    return [make_reply(node_id, arrays, {"num-examples": 10.0}, partition) for node_id, partition in NODE_IDS.items()]


def _canary(spec: TaskSpec, audit: AuditLog) -> CanaryPromotion:
    return CanaryPromotion(FedAvg(), task=ConfigRecord({TASK_KEY: spec.to_json()}), metric="roc_auc", fraction=1.0, tolerance=0.01, audit=audit, flag_contributors=True)


def test_harmful_round_rolled_back(spec, trained_state, tmp_path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    canary = _canary(spec, audit)
    grid = LocalGrid(spec)
    current = ArrayRecord(trained_state)
    canary.configure_train(2, current, ConfigRecord(), grid)

    # Every contributor sends the global model with its signs flipped.
    harmful = OrderedDict((name, -tensor) for name, tensor in trained_state.items())
    arrays, _ = canary.aggregate_train(2, _replies(harmful))

    assert arrays is None
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["rollback"]
    assert entries[0]["mean_delta"] < -0.01
    assert entries[0]["flagged_contributors"] == [0, 1]
    assert sorted(entries[0]["canaries"]) == [101, 202]


def test_good_round_promoted(spec, trained_state, tmp_path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    canary = _canary(spec, audit)
    grid = LocalGrid(spec)
    canary.configure_train(2, ArrayRecord(trained_state), ConfigRecord(), grid)

    arrays, _ = canary.aggregate_train(2, _replies(trained_state))

    assert arrays is not None
    for name, tensor in arrays.to_torch_state_dict().items():
        assert torch.allclose(tensor, trained_state[name])
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["promotion"]
    assert entries[0]["mean_delta"] == pytest.approx(0.0, abs=1e-9)


def test_mean_delta_skips_nan() -> None:
    results = {1: {"candidate.roc_auc": 0.8, "current.roc_auc": 0.9}, 2: {"candidate.roc_auc": float("nan"), "current.roc_auc": 0.5}}

    assert mean_delta(results, "roc_auc") == pytest.approx(-0.1)


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="canary.fraction=0"):
        CanaryPromotion(FedAvg(), ConfigRecord(), "roc_auc", fraction=0)
    with pytest.raises(ValueError, match="canary.tolerance=-1"):
        CanaryPromotion(FedAvg(), ConfigRecord(), "roc_auc", tolerance=-1)

"""Sampled nodes without a reply: detection and their audit entries."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg

from provenance.audit import AuditLog
from strategies.checkpointing import RunCheckpoint
from strategies.dropouts import NO_REPLY_EVENT, TIMEOUT_REASON, find_dropouts
from tests.conftest import make_reply


def _sent(node_id: int) -> Message:
    message = Message(content=RecordDict(), message_type="train", dst_node_id=node_id)
    # What the grid does when it pushes the message.
    message.metadata.__dict__["_message_id"] = f"instruction-{node_id}"
    return message


def _unavailable(node_id: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return make_message(metadata=metadata, error=Error(code=5, reason="Error: Node Unavailable"))


def test_timeout_and_unavailable_found() -> None:
    sent = [_sent(node_id) for node_id in (11, 12, 13, 14)]
    replies = [make_reply(11, metrics={"num-examples": 1.0}), _unavailable(13), make_reply(14, error="budget exhausted")]

    dropouts = find_dropouts(sent, replies)

    assert [dropout.node_id for dropout in dropouts] == [12, 13]
    assert dropouts[0].reason == TIMEOUT_REASON
    assert dropouts[1].reason == "SuperLink: Error: Node Unavailable"


def test_all_replied_no_dropouts() -> None:
    sent = [_sent(node_id) for node_id in (11, 12)]
    replies = [make_reply(12), make_reply(11)]

    assert find_dropouts(sent, replies) == []


def test_unsent_ids_match_by_sender() -> None:
    sent = [Message(content=RecordDict(), message_type="train", dst_node_id=node_id) for node_id in (11, 12)]

    dropouts = find_dropouts(sent, [make_reply(11)])

    assert [dropout.node_id for dropout in dropouts] == [12]


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [11, 12]


def test_checkpoint_audits_missing_node(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    checkpoint = RunCheckpoint(FedAvg(min_available_nodes=2), run_dir=tmp_path, run_id="run", audit=audit)
    arrays = ArrayRecord(OrderedDict(w=torch.zeros(2)))

    messages = list(checkpoint.configure_train(1, arrays, ConfigRecord(), _Grid()))
    for message in messages:
        message.metadata.__dict__["_message_id"] = f"instruction-{message.metadata.dst_node_id}"
    checkpoint.aggregate_train(1, [make_reply(11, arrays=arrays, metrics={"num-examples": 3.0}, partition_id=0)])

    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    missing = [entry for entry in entries if entry["event"] == NO_REPLY_EVENT]
    assert len(missing) == 1
    assert missing[0]["node_id"] == 12
    assert missing[0]["round"] == 1
    assert missing[0]["phase"] == "train"
    assert missing[0]["reason"] == TIMEOUT_REASON

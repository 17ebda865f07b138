"""Shared fixtures: real-data location and Flower reply messages built by hand."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid


@pytest.fixture(autouse=True)
def task_identity():
    """Give Flower's message constructors the run and task ids a ServerApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets folder from FEDSEAL_DATA_DIR; tests that need data skip without it."""
    root = os.environ.get("FEDSEAL_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("FEDSEAL_DATA_DIR is not set to the datasets folder")
    return Path(root)


def make_reply(
    node_id: int,
    arrays: ArrayRecord | None = None,
    metrics: dict[str, float] | None = None,
    partition_id: int | None = None,
    error: str | None = None,
    message_type: str = "train",
) -> Message:
    """Build a reply as the server receives it from node ``node_id``."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    if error is not None:
        return make_message(metadata=metadata, error=Error(code=1, reason=error))

    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if partition_id is not None:
        content["node"] = ConfigRecord({"partition-id": partition_id})
    return make_message(metadata=metadata, content=content)


class ScriptedGrid(Grid):
    """A Flower grid whose k-th pull returns the k-th batch of replies (those still awaited); it records every call.

    Replies match messages by ``reply_to_message_id``: ``push_messages``
    gives the message to node N the id ``instruction-N``, as ``make_reply`` expects.
    """

    def __init__(self, node_ids: Iterable[int], batches: list[list[Message]], pull_interval: float | None = 0.01) -> None:
        self.node_ids = list(node_ids)
        self.batches = list(batches)
        if pull_interval is not None:
            self.pull_interval = pull_interval
        self.pushed: list[Message] = []
        self.pulls: list[set[str]] = []
        self.pull_times: list[float] = []
        self.send_and_receive_calls = 0

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushed.extend(messages)
        return [f"instruction-{message.metadata.dst_node_id}" for message in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        awaited = set(message_ids)
        self.pulls.append(awaited)
        self.pull_times.append(time.monotonic())
        batch = self.batches.pop(0) if self.batches else []
        return [reply for reply in batch if reply.metadata.reply_to_message_id in awaited]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.send_and_receive_calls += 1
        self.push_messages(messages)
        return [reply for batch in self.batches for reply in batch]

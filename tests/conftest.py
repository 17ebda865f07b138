"""Shared fixtures: real-data location and Flower reply messages built by hand."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata


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

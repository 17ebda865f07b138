"""Read back an offline W&B run from its ``run-ID.wandb`` file, without W&B's servers.

wandb 0.31 dropped its Python reader of this file, so this parses the format
directly: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB
log records in 32 KiB blocks (4-byte CRC, 2-byte little-endian length,
1-byte type: 1 full, 2 first, 3 middle, 4 last), each holding one serialized
``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
RECORD_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline run file holds: run metadata, history rows by step, summary and artifacts."""

    run_id: str = ""
    group: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[tuple[str, str, list[str]]] = field(default_factory=list)
    exit_code: int | None = None


def read_records(path: Path) -> list[bytes]:
    """Return the payload of every record in a ``.wandb`` file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records: list[bytes] = []
    pending = b""
    position = HEADER_SIZE
    while position + RECORD_HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < RECORD_HEADER_SIZE:
            position += left_in_block  # Zero padding at the end of a block.
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + RECORD_HEADER_SIZE : position + RECORD_HEADER_SIZE + length]
        position += RECORD_HEADER_SIZE + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """Parse the single ``run-*.wandb`` file in an ``offline-run-*`` folder."""
    (path,) = sorted(run_dir.glob("run-*.wandb"))
    run = OfflineRun()
    for payload in read_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            # A later run record may update some fields and leave the others empty.
            run.run_id = record.run.run_id or run.run_id
            run.group = record.run.run_group or run.group
            run.name = record.run.display_name or run.name
            run.config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history[int(row["_step"])] = row
        elif kind == "summary":
            run.summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "artifact":
            run.artifacts.append((record.artifact.name, record.artifact.type, [entry.path for entry in record.artifact.manifest.contents]))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def read_finished_run(run_dir: Path, timeout_s: float = 30.0) -> OfflineRun:
    """Parse the run once its ``exit`` record is on disk.

    ``run.finish()`` in wandb 0.31 can return before W&B's service process
    has written the file, so a reader in the same process polls.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_offline_run(run_dir)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)

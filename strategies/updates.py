"""Model updates as flat vectors, and robustness events for the run log and the audit log.

The robustness wrappers (attack simulation, update validation, trust
weighting) all work on *updates*: a reply's arrays minus the global arrays of
the round. Only floating-point arrays form the update vector. Integer buffers
(BatchNorm-style counters) are never averaged or attacked, so they are copied
from the global model when an update is turned back into arrays.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from strategies.recording import partition_of

logger = logging.getLogger(__name__)

# Key of the ArrayRecord in train messages and replies (Flower's default).
ARRAYS_KEY = "arrays"


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return the arrays of ``record`` as numpy copies, in the record's key order."""
    return {key: np.array(array.numpy(), copy=True) for key, array in record.items()}


def float_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """Return the keys of the floating-point arrays, in order."""
    return [key for key, value in arrays.items() if np.issubdtype(value.dtype, np.floating)]


def reply_arrays(message: Message) -> dict[str, np.ndarray]:
    """Return the arrays of a train reply as numpy arrays.

    Raises
    ------
    ValueError
        If the reply carries no ArrayRecord.
    """
    records = message.content.array_records
    if not records:
        raise ValueError(f"reply from node {message.metadata.src_node_id} carries no ArrayRecord")
    return to_numpy(next(iter(records.values())))


def flat_update(arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Flatten ``arrays - global_arrays`` over the global model's float arrays, in float64.

    Parameters
    ----------
    arrays : dict of str to np.ndarray
        One reply's arrays, with the same keys and shapes as ``global_arrays``.
    global_arrays : dict of str to np.ndarray
        The global model sent in this round.

    Returns
    -------
    np.ndarray
        1-D float64 vector; integer arrays are left out.
    """
    keys = float_keys(global_arrays)
    if not keys:
        return np.zeros(0, dtype=np.float64)

    parts = [arrays[key].astype(np.float64).ravel() - global_arrays[key].astype(np.float64).ravel() for key in keys]
    return np.concatenate(parts)


def stack_updates(replies: list[Message], global_arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Return the flat updates of ``replies`` as rows of a float64 matrix, shape ``(len(replies), d)``."""
    if not replies:
        return np.zeros((0, flat_update(global_arrays, global_arrays).size), dtype=np.float64)
    return np.stack([flat_update(reply_arrays(reply), global_arrays) for reply in replies])


def arrays_from_update(update: np.ndarray, global_arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Turn a flat update back into model arrays: ``global + update``.

    Float arrays take the global dtype and shape. Integer arrays are copied from
    the global model unchanged.

    Raises
    ------
    ValueError
        If ``update`` does not have one entry per float parameter of the global model.
    """
    keys = float_keys(global_arrays)
    expected = sum(global_arrays[key].size for key in keys)
    if update.size != expected:
        raise ValueError(f"update has {update.size} entries but the model has {expected} float parameters")

    record = ArrayRecord()
    offset = 0
    for key, value in global_arrays.items():
        if key not in keys:
            record[key] = Array(np.array(value, copy=True))
            continue
        size = value.size
        new_value = value.astype(np.float64) + update[offset : offset + size].reshape(value.shape)
        record[key] = Array(np.asarray(new_value, dtype=value.dtype))
        offset += size
    return record


def replace_arrays(message: Message, record: ArrayRecord) -> None:
    """Put ``record`` in place of the ArrayRecord of a train reply."""
    key = next(iter(message.content.array_records.keys()), ARRAYS_KEY)
    message.content[key] = record


def copy_integer_arrays(aggregated: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Return ``aggregated`` with every integer array of the global model copied in unchanged.

    Some rules (the median, for one) return float arrays for integer inputs;
    counters must keep the global model's dtype and value.
    """
    result = ArrayRecord()
    for key, value in global_arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            result[key] = aggregated[key]
        else:
            result[key] = Array(np.array(value, copy=True))
    return result


def node_label(message: Message) -> str:
    """Return ``node <id> (partition <id>)`` for log messages."""
    return f"node {message.metadata.src_node_id} (partition {partition_of(message)})"


def report_event(sink: Any, audit: Any, phase: str, server_round: int, event: str, **fields: Any) -> None:
    """Send one robustness event to the run log and the audit log.

    Parameters
    ----------
    sink : object or None
        The run log; used when it has ``record_event(phase, server_round, event, **fields)``.
    audit : object or None
        The audit log (``append(event, **fields)``); None skips it.
    phase : str
        The ``metrics.jsonl`` phase, such as ``validation`` or ``trust``.
    server_round : int
        The round the event belongs to.
    event : str
        What happened, such as ``reply_dropped`` or ``quarantined``.
    **fields
        JSON-serializable details (node and partition ids, scores, reasons).
    """
    if sink is not None and hasattr(sink, "record_event"):
        sink.record_event(phase, server_round, event, **fields)
    if audit is not None:
        audit.append(event, round=server_round, **fields)

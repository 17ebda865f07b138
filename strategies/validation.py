"""Update validation: drop malformed or outsized train replies before any aggregation rule.

Flower's strategies raise ``InconsistentMessageReplies`` on a reply with a
missing metric or array key, which ends the ServerApp. This wrapper checks
every train reply first and passes on only the ones that pass. A dropped
reply is logged with its node and partition id and written to the run log
and the audit log. The round then goes on with the other replies.

A train reply is dropped when

1. it has not exactly one ArrayRecord and one MetricRecord;
2. its metrics lack ``num-examples``, give a non-finite or non-positive
   count, or lack a key that the other replies have;
3. its array keys, shapes or dtypes differ from the global model's (this
   covers integer buffers sent as floats and the reverse);
4. a float array holds NaN or Inf;
5. its update norm (reply minus global) is more than ``max_norm_ratio``
   times the median norm of the replies that passed checks 1-4.

When every reply is dropped, the global model stays as it was and the round
is recorded as skipped. Integer arrays of the aggregate are always copied
from the global model, so counters are never averaged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.recording import partition_of
from strategies.updates import copy_integer_arrays, flat_update, node_label, report_event, to_numpy

logger = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"


def metric_problem(message: Message, expected_keys: frozenset[str] | None) -> str | None:
    """Return why the metrics of ``message`` are unusable, or None when they are fine.

    Parameters
    ----------
    message : Message
        A reply without an error.
    expected_keys : frozenset of str, optional
        The metric keys most replies of the round carry; None skips that check.
    """
    records = message.content.metric_records
    if len(records) != 1:
        return f"expected exactly one MetricRecord, found {len(records)}"

    metrics = next(iter(records.values()))
    if WEIGHT_KEY not in metrics:
        return f"metrics lack the key '{WEIGHT_KEY}'"

    examples = metrics[WEIGHT_KEY]
    if isinstance(examples, list) or not math.isfinite(float(examples)) or float(examples) <= 0:
        return f"'{WEIGHT_KEY}' is {examples!r}; it must be a finite number > 0"

    missing = sorted(expected_keys - set(metrics.keys())) if expected_keys is not None else []
    if missing:
        return f"metrics lack the keys {missing} that the other replies carry"
    return None


def array_problem(message: Message, global_arrays: dict[str, np.ndarray]) -> str | None:
    """Return why the arrays of ``message`` do not fit the global model, or None when they fit."""
    records = message.content.array_records
    if len(records) != 1:
        return f"expected exactly one ArrayRecord, found {len(records)}"

    record = next(iter(records.values()))
    if set(record.keys()) != set(global_arrays.keys()):
        missing = sorted(set(global_arrays) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(global_arrays))
        return f"array keys differ from the global model's (missing {missing}, extra {extra})"

    for key, expected in global_arrays.items():
        array = record[key]
        if tuple(array.shape) != expected.shape:
            return f"array '{key}' has shape {tuple(array.shape)}, the global model has {expected.shape}"
        if np.dtype(array.dtype) != expected.dtype:
            return f"array '{key}' has dtype {array.dtype}, the global model has {expected.dtype}"

    for key, expected in global_arrays.items():
        if np.issubdtype(expected.dtype, np.floating) and not np.isfinite(record[key].numpy()).all():
            return f"array '{key}' contains NaN or Inf"
    return None


def _common_metric_keys(replies: list[Message]) -> frozenset[str] | None:
    key_sets = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in replies if len(m.content.metric_records) == 1]
    if not key_sets:
        return None
    return Counter(key_sets).most_common(1)[0][0]


class UpdateValidation(Strategy):
    """Wrap ``strategy`` and pass it only train replies that pass the checks above.

    Parameters
    ----------
    strategy : Strategy
        The aggregation rule.
    max_norm_ratio : float or None
        Drop a reply whose update norm exceeds this multiple of the round's
        median update norm; None or 0 turns the norm check off.
    sink : object, optional
        The run log (``record_event``), for drops and skipped rounds.
    audit : object, optional
        The audit log (``append``), for drops and skipped rounds.
    """

    def __init__(self, strategy: Strategy, max_norm_ratio: float | None = 10.0, sink: Any = None, audit: Any = None) -> None:
        if max_norm_ratio is not None and max_norm_ratio < 0:
            raise ValueError(f"Invalid setting validation.max_norm_ratio={max_norm_ratio}: use a number > 1, or null to turn the check off.")
        self.strategy = strategy
        self.max_norm_ratio = max_norm_ratio or None
        self.sink = sink
        self.audit = audit
        self._global: dict[str, np.ndarray] = {}
        self._global_record: ArrayRecord | None = None

    def __repr__(self) -> str:
        return f"UpdateValidation({self.strategy!r})"

    def summary(self) -> None:
        """Log the checks, then the inner strategy's settings."""
        logger.info("\t├──> UpdateValidation: shapes, dtypes, NaN/Inf, '%s', norm ratio %s", WEIGHT_KEY, self.max_norm_ratio)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember the global arrays of the round, then delegate."""
        self._global = to_numpy(arrays)
        self._global_record = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies, aggregate the rest, and keep the global model when none is left."""
        replies = list(replies)
        errors = [reply for reply in replies if reply.has_error()]
        accepted = self.filter_train(server_round, [reply for reply in replies if not reply.has_error()])

        if not accepted:
            return self._skip(server_round, len(replies))

        arrays, metrics = self.strategy.aggregate_train(server_round, accepted + errors)
        if arrays is None:
            return self._skip(server_round, len(replies))
        return copy_integer_arrays(arrays, self._global), metrics

    def filter_train(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Return the replies that pass every check; report each dropped one."""
        expected_keys = _common_metric_keys(replies)
        passed = []
        for reply in replies:
            reason = metric_problem(reply, expected_keys) or array_problem(reply, self._global)
            if reason:
                self._drop(server_round, reply, reason)
            else:
                passed.append(reply)
        return self._filter_norms(server_round, passed)

    def _filter_norms(self, server_round: int, replies: list[Message]) -> list[Message]:
        if self.max_norm_ratio is None or len(replies) < 2:
            return replies

        norms = [float(np.linalg.norm(flat_update(to_numpy(next(iter(r.content.array_records.values()))), self._global))) for r in replies]
        median = float(np.median(norms))
        if median == 0.0:
            return replies

        limit = self.max_norm_ratio * median
        within_limit = []
        for reply, norm in zip(replies, norms):
            if norm > limit:
                self._drop(server_round, reply, f"update norm {norm:.4g} exceeds {self.max_norm_ratio:g} x the median norm {median:.4g}")
            else:
                within_limit.append(reply)
        return within_limit

    def _drop(self, server_round: int, reply: Message, reason: str) -> None:
        logger.warning("Round %d: dropped the reply of %s: %s", server_round, node_label(reply), reason)
        report_event(self.sink, self.audit, "validation", server_round, "reply_dropped", node_id=int(reply.metadata.src_node_id), node=partition_of(reply), reason=reason)

    def _skip(self, server_round: int, num_replies: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        logger.warning("Round %d skipped: none of %d replies could be aggregated; the global model is unchanged", server_round, num_replies)
        report_event(self.sink, self.audit, "validation", server_round, "round_skipped", replies=num_replies)
        return self._global_record, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate to the inner strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop evaluate replies with unusable metrics, then delegate."""
        replies = list(replies)
        valid = [reply for reply in replies if not reply.has_error()]
        expected_keys = _common_metric_keys(valid)
        forwarded = [reply for reply in replies if reply.has_error()]
        for reply in valid:
            reason = metric_problem(reply, expected_keys)
            if reason:
                logger.warning("Round %d: dropped the evaluate reply of %s: %s", server_round, node_label(reply), reason)
                report_event(self.sink, None, "validation", server_round, "evaluate_reply_dropped", node_id=int(reply.metadata.src_node_id), node=partition_of(reply), reason=reason)
            else:
                forwarded.append(reply)
        if not any(not reply.has_error() for reply in forwarded):
            return None
        return self.strategy.aggregate_evaluate(server_round, forwarded)

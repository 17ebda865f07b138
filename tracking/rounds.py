"""Fold a run's records into one W&B-ready log entry per round.

Two streams feed a round. The run log (``metrics.jsonl``, see
``server.run_log``) contains metrics, robustness and privacy events and the
``cost`` lines. The audit log (``audit.jsonl``) adds the events that only it
records: signature and decryption rejections (``update_rejected``) and canary
``promotion`` and ``rollback``. Both are plain dicts here, so this module
needs neither W&B nor a running federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Node-reported train metrics with the node's own timings (clients.app).
TRAIN_SECONDS_KEY = "train_seconds"
ENCRYPT_SECONDS_KEY = "encrypt_seconds"

# Audit events that the run log does not carry; every other audit event
# duplicates a run-log record or describes bookkeeping (versions, keys).
AUDIT_ONLY_EVENTS = ("update_rejected", "promotion", "rollback")

# Per-node table columns, in display order.
NODE_COLUMNS = ("round", "node", "status", "train_examples", "train_seconds", "encrypt_seconds", "trust", "reputation", "epsilon")


@dataclass
class RoundLog:
    """Everything tracked for one round.

    Parameters
    ----------
    round : int
        The server round (0 is the initial model).
    scalars : dict of str to float
        Flat W&B keys such as ``eval_pooled/roc_auc`` or ``time/aggregation_s``.
    nodes : dict of int to dict
        Per-node values keyed by partition id; the node table's rows.
    events : list of dict
        Rejections, quarantines, promotions and rollbacks with their reasons.
    """

    round: int
    scalars: dict[str, float] = field(default_factory=dict)
    nodes: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def node_rows(self, metric_names: list[str]) -> list[list[Any]]:
        """Return one row per node: ``NODE_COLUMNS`` then ``metric_names`` (evaluation on the node's test split)."""
        rows = []
        for node, values in sorted(self.nodes.items()):
            row = [self.round, node] + [values.get(column) for column in NODE_COLUMNS[2:]]
            rows.append(row + [values.get(f"eval/{name}") for name in metric_names])
        return rows


class RoundCollector:
    """Buffer records by round and turn each finished round into a ``RoundLog``.

    A round is finished once a record of a later round arrives, or when the
    run ends (``pop_all``). Records without a ``round`` key are ignored.
    """

    def __init__(self) -> None:
        self._rounds: dict[int, RoundLog] = {}

    def add(self, record: dict[str, Any]) -> None:
        """Fold one run-log record into its round."""
        if "round" not in record:
            return
        entry = self._round(int(record["round"]))
        handler = _RUN_LOG_HANDLERS.get(str(record.get("phase")))
        if handler is not None:
            handler(entry, record)

    def add_audit(self, entry: dict[str, Any]) -> None:
        """Fold one audit-log entry into its round, if it is an ``AUDIT_ONLY_EVENTS`` entry."""
        if entry.get("event") not in AUDIT_ONLY_EVENTS or "round" not in entry:
            return
        _audit_event(self._round(int(entry["round"])), entry)

    def pop_before(self, server_round: int) -> list[RoundLog]:
        """Remove and return the buffered rounds before ``server_round``, oldest first."""
        done = sorted(number for number in self._rounds if number < server_round)
        return [_finish(self._rounds.pop(number)) for number in done]

    def pop_all(self) -> list[RoundLog]:
        """Remove and return every buffered round, oldest first."""
        return self.pop_before(max(self._rounds, default=-1) + 1)

    def _round(self, number: int) -> RoundLog:
        if number not in self._rounds:
            self._rounds[number] = RoundLog(number)
        return self._rounds[number]


def _metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    # None is a metric undefined on this run (JSON has no NaN); W&B skips missing keys.
    return {f"{prefix}/{key}": float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and key != "num-examples"}


def _phase_record(entry: RoundLog, record: dict[str, Any], phase: str) -> None:
    metrics = record.get("metrics", {})
    if record.get("scope") == "node":
        node = entry.nodes.setdefault(int(record["node"]), {})
        if phase == "train":
            node["train_examples"] = metrics.get("num-examples")
            node["train_seconds"] = metrics.get(TRAIN_SECONDS_KEY)
            node["encrypt_seconds"] = metrics.get(ENCRYPT_SECONDS_KEY)
            node.setdefault("status", "accepted")
        else:
            node.update({f"eval/{key}": value for key, value in metrics.items() if key != "num-examples"})
        return

    prefix = "train" if phase == "train" else "eval_nodes"
    entry.scalars.update(_metrics(prefix, {k: v for k, v in metrics.items() if k not in (TRAIN_SECONDS_KEY, ENCRYPT_SECONDS_KEY)}))
    entry.scalars[f"nodes/{phase}_sampled"] = float(record.get("sampled", 0))
    entry.scalars[f"nodes/{phase}_replied"] = float(record.get("replied", 0))
    for reason in record.get("failures", []):
        entry.events.append({"round": entry.round, "node": None, "event": f"{phase}_reply_failed", "reason": str(reason)})


def _train(entry: RoundLog, record: dict[str, Any]) -> None:
    _phase_record(entry, record, "train")


def _evaluate(entry: RoundLog, record: dict[str, Any]) -> None:
    _phase_record(entry, record, "evaluate")


def _server_evaluate(entry: RoundLog, record: dict[str, Any]) -> None:
    entry.scalars.update(_metrics("eval_pooled", record.get("metrics", {})))
    if record.get("seconds") is not None:
        entry.scalars["time/server_evaluation_s"] = float(record["seconds"])


def _cost(entry: RoundLog, record: dict[str, Any]) -> None:
    phase = str(record.get("event"))
    entry.scalars[f"bytes/{phase}_sent"] = float(record.get("bytes_sent", 0))
    entry.scalars[f"bytes/{phase}_received"] = float(record.get("bytes_received", 0))
    entry.scalars[f"time/{phase}_wait_s"] = float(record.get("wait_s", 0.0))
    entry.scalars[f"time/{phase}_aggregate_s"] = float(record.get("aggregate_s", 0.0))


def _validation(entry: RoundLog, record: dict[str, Any]) -> None:
    event = str(record.get("event"))
    if event == "reply_dropped":
        _reject(entry, record.get("node"), "validation", str(record.get("reason", "")))
    elif event in ("round_skipped", "evaluate_reply_dropped"):
        entry.events.append({"round": entry.round, "node": record.get("node"), "event": f"validation_{event}", "reason": str(record.get("reason", ""))})


def _trust(entry: RoundLog, record: dict[str, Any]) -> None:
    event = str(record.get("event"))
    node = record.get("node")
    if event == "score" and node is not None:
        values = entry.nodes.setdefault(int(node), {})
        values["trust"] = record.get("trust")
        values["reputation"] = record.get("reputation")
    elif event == "quarantined" and node is not None:
        entry.nodes.setdefault(int(node), {})["status"] = "quarantined"
        entry.events.append({"round": entry.round, "node": int(node), "event": "quarantined", "reason": f"reputation {record.get('reputation', float('nan')):.4f}, quarantined through round {record.get('until_round')}"})
    elif event == "round_skipped":
        entry.events.append({"round": entry.round, "node": None, "event": "trust_round_skipped", "reason": "every trust score was 0"})


def _privacy(entry: RoundLog, record: dict[str, Any]) -> None:
    event = str(record.get("event"))
    if event == "epsilon" and record.get("partition") is not None and record.get("epsilon") is not None:
        entry.nodes.setdefault(int(record["partition"]), {})["epsilon"] = float(record["epsilon"])
    elif event == "central_release" and record.get("epsilon") is not None:
        entry.scalars["privacy/central_epsilon"] = float(record["epsilon"])
    elif event == "budget_exhausted":
        entry.events.append({"round": entry.round, "node": None, "event": "budget_exhausted", "reason": str(record.get("reason", ""))})


def _attack(entry: RoundLog, record: dict[str, Any]) -> None:
    if record.get("event") == "updates_replaced":
        entry.scalars["attack/replaced_updates"] = float(len(record.get("partitions", [])))


def _audit_event(entry: RoundLog, audit: dict[str, Any]) -> None:
    event = str(audit["event"])
    if event == "update_rejected":
        _reject(entry, audit.get("partition"), str(audit.get("check", "decryption")), str(audit.get("reason", "")))
        return

    delta = audit.get("mean_delta")
    entry.scalars["canary/promoted"] = 1.0 if event == "promotion" else 0.0
    entry.scalars["canary/rolled_back"] = 1.0 if event == "rollback" else 0.0
    if isinstance(delta, (int, float)):
        entry.scalars["canary/mean_delta"] = float(delta)
    reason = f"mean {audit.get('metric', 'metric')} change {delta:+.4f} on canary nodes" if isinstance(delta, (int, float)) else ""
    entry.events.append({"round": entry.round, "node": None, "event": event, "reason": reason})


def _reject(entry: RoundLog, node: Any, check: str, reason: str) -> None:
    if node is not None:
        entry.nodes.setdefault(int(node), {})["status"] = f"rejected ({check})"
    entry.events.append({"round": entry.round, "node": None if node is None else int(node), "event": f"rejected_{check}", "reason": reason})


def _finish(entry: RoundLog) -> RoundLog:
    """Add the totals that need the whole round: bytes, the time split, updates and per-node scalars."""
    scalars = entry.scalars
    scalars["bytes/sent"] = scalars.get("bytes/train_sent", 0.0) + scalars.get("bytes/evaluate_sent", 0.0)
    scalars["bytes/received"] = scalars.get("bytes/train_received", 0.0) + scalars.get("bytes/evaluate_received", 0.0)

    # Nodes train in parallel, so the slowest node is the round's training time.
    train_seconds = [v["train_seconds"] for v in entry.nodes.values() if v.get("train_seconds") is not None]
    encrypt_seconds = [v["encrypt_seconds"] for v in entry.nodes.values() if v.get("encrypt_seconds") is not None]
    if train_seconds:
        scalars["time/client_training_s"] = max(train_seconds)
    scalars["time/encryption_s"] = max(encrypt_seconds) if encrypt_seconds else 0.0
    if "time/train_aggregate_s" in scalars:
        scalars["time/aggregation_s"] = scalars["time/train_aggregate_s"]
    evaluation = [scalars.get(key) for key in ("time/evaluate_wait_s", "time/evaluate_aggregate_s", "time/server_evaluation_s")]
    if any(value is not None for value in evaluation):
        scalars["time/evaluation_s"] = sum(value for value in evaluation if value is not None)

    if "nodes/train_replied" in scalars:
        rejected = sum(1 for v in entry.nodes.values() if str(v.get("status", "")).startswith("rejected"))
        scalars["updates/rejected"] = float(rejected)
        scalars["updates/accepted"] = scalars["nodes/train_replied"] - rejected

    for node, values in entry.nodes.items():
        for key in ("trust", "reputation", "epsilon"):
            if values.get(key) is not None:
                scalars[f"{key}/node_{node}"] = float(values[key])
    epsilons = [v["epsilon"] for v in entry.nodes.values() if v.get("epsilon") is not None]
    if epsilons:
        scalars["privacy/max_epsilon"] = max(epsilons)
    return entry


_RUN_LOG_HANDLERS = {
    "train": _train,
    "evaluate": _evaluate,
    "server_evaluate": _server_evaluate,
    "cost": _cost,
    "validation": _validation,
    "trust": _trust,
    "privacy": _privacy,
    "attack": _attack,
}

"""The report's sections as plain data, computed from loaded runs.

Each function returns rows or series that ``reporting.html`` writes as tables
and ``reporting.figures`` draws; none of them formats text for display.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from reporting.runs import Run

# Train-reply metrics with the node's own timings (clients.app).
TRAIN_SECONDS_KEY = "train_seconds"
ENCRYPT_SECONDS_KEY = "encrypt_seconds"


def metric_series(run: Run) -> tuple[str, list[tuple[int, float]]]:
    """Return (source, [(round, primary metric)]): the pooled test split when scored there, else the nodes' mean.

    The nodes' mean per round is weighted by test examples (the run log's
    evaluate record), unlike ``summary.json``'s unweighted final mean.
    """
    metric = run.primary_metric
    for phase, source in (("server_evaluate", "pooled test split"), ("evaluate", "weighted mean over nodes")):
        points = [
            (int(r["round"]), float(r["metrics"][metric]))
            for r in run.records
            if r.get("phase") == phase and r.get("scope") == "global" and r.get("metrics", {}).get(metric) is not None
        ]
        if points:
            return source, sorted(points)
    return "none", []


@dataclass
class RobustnessCell:
    """One run in the robustness table."""

    scenario: str
    strategy: str
    attack: str
    fraction: float
    value: float
    drop: float | None
    source: str


def robustness_cells(runs: list[Run]) -> list[RobustnessCell]:
    """Return one cell per finished run without differential privacy, with its change from attack-free FedAvg.

    ``drop`` is ``value - reference`` (negative when the run scores lower).
    It is None when the folder contains no attack-free FedAvg run of that
    scenario. It is also None when the run's metric comes from another source
    than the reference's: an encrypted run is scored as the mean over the
    nodes, a plaintext run on the pooled test split. With several attack-free FedAvg
    runs, the first by folder order is the reference. DP runs are left out:
    they belong to the privacy-utility section.
    """
    reference: dict[str, tuple[float, str]] = {}
    for run in runs:
        if run.summary is not None and run.strategy == "fedavg" and run.attack == "none" and run.privacy == "none":
            reference.setdefault(run.scenario, (run.final_metric, run.metric_source))

    cells = []
    for run in runs:
        if run.summary is None or run.privacy != "none":
            continue
        base, base_source = reference.get(run.scenario, (None, ""))
        comparable = base is not None and base_source == run.metric_source and not math.isnan(run.final_metric)
        drop = run.final_metric - base if comparable else None
        cells.append(RobustnessCell(run.scenario, run.strategy, run.attack, run.attack_fraction, run.final_metric, drop, run.metric_source))
    return cells


def node_gains(runs: list[Run]) -> list[tuple[str, str, dict[str, float]]]:
    """Return (run label, node, {delta_<metric>: value}) for runs whose summary has per-node gains."""
    rows = []
    for run in runs:
        for node, deltas in sorted((run.summary or {}).get("gain", {}).items(), key=lambda item: int(item[0])):
            rows.append((run.label, node, {key: value for key, value in deltas.items() if value is not None}))
    return rows


@dataclass
class CostRow:
    """Payload and time per round of one run, from its ``cost`` records."""

    label: str
    strategy: str
    encrypted: bool
    preset: str
    parameters: int
    upload_bytes_per_parameter: float
    download_bytes_per_parameter: float
    round_seconds: float
    encrypt_seconds: float
    aggregate_seconds: float


def cost_rows(runs: list[Run]) -> list[CostRow]:
    """Return one row per finished run that has ``cost`` records and a parameter count.

    Upload is a train reply's payload per node, download a train message's
    payload per node, each divided by the model's float parameters. Seconds
    per round are the train phase (wait for replies plus aggregation). The
    median over rounds keeps round 1, which includes the nodes' start-up,
    from dominating. Encryption is the slowest node's encryption time per
    round, median over rounds (0 for plaintext runs).
    """
    rows = []
    for run in runs:
        parameters = int((run.summary or {}).get("parameters", 0))
        costs = [r for r in run.records if r.get("phase") == "cost" and r.get("event") == "train"]
        trains = {int(r["round"]): r for r in run.records if r.get("phase") == "train" and r.get("scope") == "global"}
        if not parameters or not costs:
            continue

        upload, download = [], []
        for cost in costs:
            train = trains.get(int(cost["round"]), {})
            if train.get("replied"):
                upload.append(cost["bytes_received"] / train["replied"] / parameters)
            if train.get("sampled"):
                download.append(cost["bytes_sent"] / train["sampled"] / parameters)

        encrypt = defaultdict(float)
        for record in run.records:
            seconds = record.get("metrics", {}).get(ENCRYPT_SECONDS_KEY) if record.get("phase") == "train" and record.get("scope") == "node" else None
            if seconds is not None:
                encrypt[int(record["round"])] = max(encrypt[int(record["round"])], float(seconds))

        rows.append(
            CostRow(
                label=run.label,
                strategy=run.strategy,
                encrypted=run.encrypted,
                preset=str((run.config.get("security") or {}).get("preset", "")) if run.encrypted else "plaintext",
                parameters=parameters,
                upload_bytes_per_parameter=_mean(upload),
                download_bytes_per_parameter=_mean(download),
                round_seconds=_median([c["wait_s"] + c["aggregate_s"] for c in costs]),
                encrypt_seconds=_median(list(encrypt.values())) if encrypt else 0.0,
                aggregate_seconds=_median([c["aggregate_s"] for c in costs]),
            )
        )
    return rows


@dataclass
class PrivacyPoint:
    """One run on the privacy-utility curve."""

    scenario: str
    strategy: str
    epsilon: float | None
    value: float
    label: str


def privacy_points(runs: list[Run]) -> list[PrivacyPoint]:
    """Return DP runs (``epsilon`` = largest epsilon over nodes) and one non-private reference (``epsilon`` None) per scenario.

    The reference is the first finished run of the same scenario and
    strategy without DP, attack or encryption; it becomes the curve's
    dashed line.
    """
    private = [run for run in runs if run.summary is not None and run.max_epsilon is not None]
    points = [PrivacyPoint(run.scenario, run.strategy, run.max_epsilon, run.final_metric, run.label) for run in private]
    missing_references = {(run.scenario, run.strategy) for run in private}
    for run in runs:
        key = (run.scenario, run.strategy)
        if key in missing_references and run.summary is not None and run.privacy == "none" and run.attack == "none" and not run.encrypted:
            points.append(PrivacyPoint(run.scenario, run.strategy, None, run.final_metric, run.label))
            missing_references.discard(key)
    return sorted(points, key=lambda p: (p.scenario, math.inf if p.epsilon is None else p.epsilon))


def timeline_events(runs: list[Run]) -> list[dict[str, Any]]:
    """Return rejections, quarantines, rollbacks and failed replies of every run, by run then round.

    Each event is ``{"run", "round", "node", "event", "reason"}``.
    """
    events: list[dict[str, Any]] = []
    for run in runs:
        for record in run.records:
            event = _record_event(record)
            if event is not None:
                events.append({"run": run.label, **event})
        for entry in run.audit:
            if entry.get("event") == "update_rejected":
                events.append({"run": run.label, "round": entry.get("round"), "node": entry.get("partition"), "event": f"rejected ({entry.get('check', 'decryption')})", "reason": entry.get("reason", "")})
            elif entry.get("event") == "rollback":
                events.append({"run": run.label, "round": entry.get("round"), "node": None, "event": "rollback", "reason": f"canary mean change {entry.get('mean_delta', float('nan')):+.4f}"})
        if run.failure is not None:
            events.append({"run": run.label, "round": None, "node": None, "event": "run failed", "reason": f"{run.failure.get('error')}: {run.failure.get('message')}"})
    return sorted(events, key=lambda e: (e["run"], -1 if e["round"] is None else e["round"]))


def _record_event(record: dict[str, Any]) -> dict[str, Any] | None:
    phase, event = record.get("phase"), record.get("event")
    server_round = record.get("round")
    if phase == "validation" and event == "reply_dropped":
        return {"round": server_round, "node": record.get("node"), "event": "rejected (validation)", "reason": record.get("reason", "")}
    if phase == "trust" and event == "quarantined":
        return {"round": server_round, "node": record.get("node"), "event": "quarantined", "reason": f"reputation {record.get('reputation', float('nan')):.4f}, out through round {record.get('until_round')}"}
    if phase == "privacy" and event == "budget_exhausted":
        return {"round": server_round, "node": record.get("node_id"), "event": "privacy budget exhausted", "reason": record.get("reason", "")}
    if phase == "train" and record.get("scope") == "global" and record.get("failures"):
        return {"round": server_round, "node": None, "event": f"{len(record['failures'])} failed replies", "reason": "; ".join(record["failures"])}
    return None


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan

"""The run's ``metrics.jsonl`` and the live progress display.

Each line of ``metrics.jsonl`` is one JSON object: one per round and phase
for the aggregate (``scope: "global"``) and one per node (``scope: "node"``).
Phases are ``train`` and ``evaluate`` (reported by nodes) and
``server_evaluate`` (the global model on the pooled test split, simulation
only). Robustness events (phases ``validation``, ``attack`` and ``trust``)
carry an ``event`` key, such as ``reply_dropped``. Phase ``cost`` lines hold
each train and evaluate phase's payload bytes and timings. Lines are flushed
as they are written, so a crashed run keeps every finished round.

Listeners (``add_listener``) receive every record as it is written; the
experiment trackers in ``tracking/`` consume the run through them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    # JSON has no NaN; an undefined metric is written as null.
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in metrics.items()}


class RunLog:
    """Writes ``metrics.jsonl`` and shows round progress.

    Parameters
    ----------
    path : Path
        The ``metrics.jsonl`` file; created with its parent folder.
    num_rounds : int
        Rounds planned, for the progress display and ETA.
    primary_metric : str
        The metric shown in the progress line.
    resume_after : int, optional
        The last committed round of a resumed run; later records in ``path`` are dropped.
    quiet : bool
        Show no progress bar; the progress line is still logged, and quiet
        mode's console handler (``server.console``) keeps it out of the console.
    """

    def __init__(self, path: Path, num_rounds: int, primary_metric: str, resume_after: int | None = None, quiet: bool = False) -> None:
        self.path = path
        self.num_rounds = num_rounds
        self.primary_metric = primary_metric
        self.last_node_evaluation: dict[int, dict[str, float]] = {}
        self.server_evaluations: dict[int, dict[str, float]] = {}
        self._answered = ""
        self._started = time.monotonic()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None and path.exists():
            self._keep_rounds_up_to(resume_after)
        self._file = path.open("a", encoding="utf-8")
        self._progress = _Progress(num_rounds, quiet)

    def _keep_rounds_up_to(self, last_round: int) -> None:
        """Drop records of rounds after ``last_round`` (an interrupted round) and reload the rest."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # A line cut short by the crash.
            if record.get("round", 0) > last_round:
                continue
            kept.append(line)
            metrics = {k: (math.nan if v is None else v) for k, v in record.get("metrics", {}).items()}
            if record.get("phase") == "server_evaluate":
                self.server_evaluations[record["round"]] = metrics
            elif record.get("phase") == "evaluate" and record.get("scope") == "node":
                if record["round"] == last_round:
                    self.last_node_evaluation[record["node"]] = metrics
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        logger.info("Resuming %s after round %d (%d records kept)", self.path, last_round, len(kept))

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(record)`` for every record written from now on.

        A listener that raises is removed with one warning, so a consumer
        such as an experiment tracker can never stop the run.
        """
        self._listeners.append(listener)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record with a timestamp and pass it to the listeners."""
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception as error:  # noqa: BLE001 - a consumer must not end the run.
                logger.warning("Run-log listener %r failed and is removed: %s", listener, error)
                self._listeners.remove(listener)

    def _write_phase(self, phase: str, server_round: int, sampled: int, nodes: dict[int, dict[str, float]], failures: list[str], aggregated: dict[str, float]) -> None:
        self.write(
            {
                "phase": phase,
                "round": server_round,
                "scope": "global",
                "sampled": sampled,
                "replied": len(nodes),
                "failures": failures,
                "metrics": _json_safe(aggregated),
            }
        )
        for partition_id, metrics in sorted(nodes.items()):
            self.write({"phase": phase, "round": server_round, "scope": "node", "node": partition_id, "metrics": _json_safe(metrics)})
        for reason in failures:
            logger.warning("%s round %d: reply failed: %s", phase, server_round, reason)

    def on_train(self, server_round: int, sampled: int, nodes: dict[int, dict[str, float]], failures: list[str], aggregated: dict[str, float]) -> None:
        """Record one training round."""
        self._write_phase("train", server_round, sampled, nodes, failures, aggregated)
        self._answered = f"{len(nodes)}/{sampled}"

    def on_evaluate(self, server_round: int, sampled: int, nodes: dict[int, dict[str, float]], failures: list[str], aggregated: dict[str, float]) -> None:
        """Record one federated evaluation and update the progress line."""
        self._write_phase("evaluate", server_round, sampled, nodes, failures, aggregated)
        self.last_node_evaluation = nodes
        if server_round not in self.server_evaluations:
            self._show(server_round, aggregated.get(self.primary_metric), "node avg")

    def record_event(self, phase: str, server_round: int, event: str, node: int | None = None, **fields: Any) -> None:
        """Record one robustness event (a dropped reply, a trust score, a quarantine).

        Parameters
        ----------
        phase : str
            ``validation``, ``attack`` or ``trust``.
        server_round : int
            The round of the event.
        event : str
            What happened, such as ``reply_dropped`` or ``quarantined``.
        node : int, optional
            The partition id the event is about; None makes it a ``global`` line.
        **fields
            JSON-serializable details.
        """
        record = {"phase": phase, "round": server_round, "scope": "global" if node is None else "node", "event": event, **fields}
        if node is not None:
            record["node"] = node
        self.write(record)

    def on_server_evaluate(self, server_round: int, metrics: dict[str, float], seconds: float | None = None) -> None:
        """Record the global model's score on the pooled test split and, if given, how long scoring took."""
        self.server_evaluations[server_round] = metrics
        record: dict[str, Any] = {"phase": "server_evaluate", "round": server_round, "scope": "global", "metrics": _json_safe(metrics)}
        if seconds is not None:
            record["seconds"] = round(seconds, 4)
        self.write(record)
        self._show(server_round, metrics.get(self.primary_metric), "pooled test")

    def _show(self, server_round: int, value: float | None, source: str) -> None:
        elapsed = time.monotonic() - self._started
        # Round 0 scores the initial model, so no round time is known yet.
        eta = f"{elapsed / server_round * (self.num_rounds - server_round):.0f}s" if server_round else "n/a"
        metric = "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
        line = (
            f"round {server_round}/{self.num_rounds} | nodes answered {self._answered or '-'} | "
            f"{self.primary_metric} {metric} ({source}) | elapsed {elapsed:.0f}s | eta {eta}"
        )
        self._progress.update(server_round, line)

    def close(self) -> None:
        """Close the file and the progress display."""
        self._progress.close()
        self._file.close()


class _Progress:
    """A rich progress bar on a terminal unless quiet, one log line per round otherwise."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self._bar = None
        if sys.stderr.isatty() and not quiet:
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("[bold]federated"), BarColumn(), TextColumn("{task.description}"), transient=False)
            self._task = self._bar.add_task("starting", total=total)
            self._bar.start()

    def update(self, completed: int, line: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, description=line)
        else:
            logger.info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

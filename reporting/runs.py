"""Load finished and failed runs from a run folder or a multirun folder.

A run folder is one that contains ``summary.json`` (finished) or
``failed.json`` (failed). Its configuration is ``config.yaml`` (resolved, written
when training starts) or, for a job that failed before that, Hydra's
``.hydra/config.yaml``. ``metrics.jsonl`` and ``audit.jsonl`` are read when present.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

# Audit events shown on the rejection and quarantine timeline.
TIMELINE_AUDIT_EVENTS = ("update_rejected", "rollback")


@dataclass
class Run:
    """One run's outputs, as the report reads them.

    Parameters
    ----------
    path : Path
        The run folder.
    config : dict
        ``config.yaml``, the resolved configuration.
    summary : dict, optional
        ``summary.json``; None for a failed run.
    failure : dict, optional
        ``failed.json``; None for a finished run.
    records : list of dict
        ``metrics.jsonl`` lines.
    audit : list of dict
        ``audit.jsonl`` entries of the kinds in ``TIMELINE_AUDIT_EVENTS``.
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def scenario(self) -> str:
        """Scenario name."""
        return str(self.config.get("scenario", {}).get("name", "?"))

    @property
    def strategy(self) -> str:
        """Aggregation strategy name."""
        return str(self.config.get("strategy", {}).get("name", "?"))

    @property
    def attack(self) -> str:
        """Simulated attack name (``none`` without one)."""
        return str((self.config.get("attack") or {}).get("name", "none"))

    @property
    def attack_fraction(self) -> float:
        """Share of attacking nodes; 0 without an attack."""
        return 0.0 if self.attack == "none" else float((self.config.get("attack") or {}).get("fraction", 0.0))

    @property
    def encrypted(self) -> bool:
        """Whether the strategy aggregates CKKS-encrypted updates."""
        return bool(self.config.get("strategy", {}).get("encrypted", False))

    @property
    def privacy(self) -> str:
        """Privacy mode name (``none``, ``dp_sgd``, ``central``)."""
        return str((self.config.get("privacy") or {}).get("name", "none"))

    @property
    def primary_metric(self) -> str:
        """The scenario's primary metric."""
        return str(self.config.get("scenario", {}).get("primary_metric", "metric"))

    @property
    def final_metric(self) -> float:
        """Final primary metric of the global model (pooled test split or node mean); NaN if unknown."""
        if self.summary is None:
            return math.nan
        value = self.summary.get("federated", {}).get("global", {}).get(self.primary_metric)
        return math.nan if value is None else float(value)

    @property
    def metric_source(self) -> str:
        """Where ``final_metric`` was measured: ``pooled test split`` or ``mean over nodes`` (``summary.json``'s ``global_source``)."""
        return str((self.summary or {}).get("global_source", "unknown"))

    @property
    def max_epsilon(self) -> float | None:
        """Largest epsilon over the nodes in the last round with privacy records; None without DP."""
        epsilons: dict[int, float] = {}
        for record in self.records:
            if record.get("phase") == "privacy" and record.get("event") == "epsilon" and record.get("epsilon") is not None:
                epsilons[int(record.get("partition", -1))] = float(record["epsilon"])
            elif record.get("phase") == "privacy" and record.get("event") == "central_release" and record.get("epsilon") is not None:
                epsilons[-1] = float(record["epsilon"])
        return max(epsilons.values()) if epsilons else None


def discover_runs(root: Path) -> list[Run]:
    """Return every run under ``root`` (``root`` itself included), ordered by folder path.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist or contains no run folder.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a run folder or a multirun folder (fedseal report DIR --out OUTDIR).")

    folders = sorted({path.parent for name in ("summary.json", "failed.json") for path in root.rglob(name)})
    if not folders:
        raise FileNotFoundError(f"No run found under {root}: no folder under it contains summary.json or failed.json; pass a run or multirun folder written by fedseal-train.")
    runs = [load_run(folder) for folder in folders]
    for run in runs:
        run.label = str(run.path.relative_to(root)) if run.path != root else run.path.name
    return runs


def load_run(folder: Path) -> Run:
    """Read one run folder."""
    config_path = next((path for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml") if path.exists()), None)
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path else {}
    run = Run(path=folder, config=config or {})
    if (folder / "summary.json").exists():
        run.summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    if (folder / "failed.json").exists():
        run.failure = json.loads((folder / "failed.json").read_text(encoding="utf-8"))
    run.records = _read_jsonl(folder / "metrics.jsonl")
    run.audit = [entry for entry in _read_jsonl(folder / "audit.jsonl") if entry.get("event") in TIMELINE_AUDIT_EVENTS]
    return run


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A run that crashed mid-write leaves a partial last line.
            logger.warning("Skipping unreadable line %d of %s", number, path)
    return records

"""``summary.json`` and the table printed at the end of a run.

Sections: ``round_0`` (the initial model), ``federated``, ``centralized`` and
``local_only``, each with ``global`` metrics (pooled test split) and/or
``nodes`` metrics (each node's own test split), plus ``gain``: for each node,
``delta_<metric>`` = federated minus local-only on that node's test split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _clean(value: Any) -> Any:
    """Replace NaN and infinities by None, recursively, because JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def node_gains(federated_nodes: dict[str, dict[str, float]], local_nodes: dict[str, dict[str, float]], metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Return ``{node: {delta_<metric>: federated - local}}`` for nodes in both inputs."""
    gains: dict[str, dict[str, float]] = {}
    for node, local in local_nodes.items():
        federated = federated_nodes.get(node)
        if federated is None:
            continue
        gains[node] = {f"delta_{m}": float(federated.get(m, math.nan)) - float(local.get(m, math.nan)) for m in metrics}
    return gains


def mean_metrics(per_node: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over nodes, skipping NaN."""
    keys = sorted({key for metrics in per_node.values() for key in metrics})
    result: dict[str, float] = {}
    for key in keys:
        values = [float(m[key]) for m in per_node.values() if key in m and not math.isnan(float(m[key]))]
        result[key] = sum(values) / len(values) if values else math.nan
    return result


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` as indented JSON with NaN replaced by null."""
    path.write_text(json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def print_table(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the final metrics of each run and each node's gain."""
    console = console or Console()
    metric_names = summary["metric_names"]

    table = Table(title=f"{summary['scenario']}: final metrics ({summary['global_source']})")
    table.add_column("run")
    for name in metric_names:
        table.add_column(name, justify="right")
    rows = [("round 0", summary.get("round_0", {}).get("global")), ("federated", summary["federated"].get("global"))]
    if "centralized" in summary:
        rows.append(("centralized", summary["centralized"].get("node_mean", summary["centralized"]["global"])))
        rows.append(("local-only (node mean)", summary["local_only"]["mean"]))
    for label, metrics in rows:
        if metrics:
            table.add_row(label, *[_fmt(metrics.get(name)) for name in metric_names])
    console.print(table)

    if summary.get("gain"):
        gains = Table(title="gain from federating, per node (federated - local-only, own test split)")
        gains.add_column("node")
        delta_names = sorted(next(iter(summary["gain"].values())).keys())
        for name in delta_names:
            gains.add_column(name, justify="right")
        for node, deltas in sorted(summary["gain"].items(), key=lambda item: int(item[0])):
            gains.add_row(node, *[_fmt(deltas.get(name), signed=True) for name in delta_names])
        console.print(gains)


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"

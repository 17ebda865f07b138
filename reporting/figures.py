"""PNG figures of the report, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

# Choose the file-only backend before pyplot loads, so no display is needed.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from reporting.sections import PrivacyPoint

WIDTH_IN = 9.0
DPI = 110


def metric_per_round(series: dict[str, tuple[str, list[tuple[int, float]]]], metric: str, path: Path) -> Path:
    """Draw the primary metric per round, one line per run; the legend names each line's source when they differ."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.5))
    mixed = len({source for source, _ in series.values()}) > 1
    for label, (source, points) in series.items():
        if points:
            name = f"{label} ({source})" if mixed else label
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = initial model)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of the global model per round")
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    return _save(fig, path)


def node_gains(rows: list[tuple[str, str, dict[str, float]]], delta_key: str, path: Path) -> Path:
    """Draw each node's gain from federating (federated minus local-only), grouped by run."""
    runs = sorted({row[0] for row in rows})
    nodes = sorted({row[1] for row in rows}, key=int)
    values = {(row[0], row[1]): row[2].get(delta_key) for row in rows}
    width = 0.8 / max(1, len(runs))

    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.0))
    for index, run in enumerate(runs):
        xs = [position + index * width for position in range(len(nodes))]
        ax.bar(xs, [values.get((run, node)) or 0.0 for node in nodes], width=width, label=run)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks([position + 0.4 - width / 2 for position in range(len(nodes))], [f"node {node}" for node in nodes])
    ax.set_ylabel(f"{delta_key} (federated - local-only)")
    ax.set_title("Gain from federating, per node, on each node's own test split")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, len(runs))
    return _save(fig, path)


def privacy_utility(points: list[PrivacyPoint], metric: str, path: Path) -> Path:
    """Draw the final metric against epsilon per scenario; non-private runs are dashed reference lines."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.0))
    by_scenario: dict[str, list[PrivacyPoint]] = defaultdict(list)
    for point in points:
        by_scenario[point.scenario].append(point)
    for scenario, group in sorted(by_scenario.items()):
        private = sorted((p for p in group if p.epsilon is not None), key=lambda p: p.epsilon)
        line = ax.plot([p.epsilon for p in private], [p.value for p in private], marker="o", label=f"{scenario}, DP-SGD")[0]
        for reference in (p for p in group if p.epsilon is None):
            ax.axhline(reference.value, linestyle="--", color=line.get_color(), label=f"{scenario}, no DP ({reference.value:.3f})")
    ax.set_xscale("log")
    # Label the measured epsilons in plain numbers instead of powers of ten.
    epsilons = sorted({p.epsilon for p in points if p.epsilon is not None})
    ax.set_xticks(epsilons, [f"{value:g}" for value in epsilons])
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("epsilon (largest over nodes, log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"Privacy-utility: final {metric} against epsilon")
    ax.grid(alpha=0.3)
    _legend(ax, len(by_scenario) * 2)
    return _save(fig, path)


def timeline(events: list[dict[str, Any]], run_labels: list[str], path: Path) -> Path:
    """Draw rejections, quarantines and rollbacks per round (x) and run (y)."""
    kinds = sorted({event["event"] for event in events if event["round"] is not None})
    rows = {label: index for index, label in enumerate(run_labels)}
    fig, ax = plt.subplots(figsize=(WIDTH_IN, max(2.5, 0.45 * len(run_labels) + 1.5)))
    markers = "oXs^vD*P"
    for index, kind in enumerate(kinds):
        chosen = [e for e in events if e["event"] == kind and e["round"] is not None]
        ax.scatter([e["round"] for e in chosen], [rows[e["run"]] for e in chosen], marker=markers[index % len(markers)], s=60, label=kind)
    ax.set_yticks(range(len(run_labels)), run_labels)
    ax.set_ylim(-0.5, len(run_labels) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_title("Rejected updates, quarantines and rollbacks")
    ax.grid(alpha=0.3)
    if kinds:
        # Outside the axes: the marks sit on every row, so any inside corner covers some.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _legend(ax: Any, entries: int) -> None:
    if entries == 0:
        return
    # Long legends go to the right of the plot, where they cover no data.
    if entries > 6:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path

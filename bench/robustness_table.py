"""Summarise a robustness sweep (aggregator x attack x malicious fraction) as Markdown tables.

Reads every ``summary.json`` under the given multirun folders and writes, per
scenario and malicious fraction, a table of the final primary metric with its
difference from attack-free FedAvg of the same scenario. Under the tables it
lists trust-weighting quarantines (attackers and honest nodes) and replies
dropped by update validation, read from each run's ``metrics.jsonl``.

    python bench/robustness_table.py multirun/2026-12-05/00-00-00 --out table.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("robustness_table")

ATTACK_ORDER = (
    "none",
    "sign_flip",
    "gaussian",
    "scaling",
    "label_flip",
    "alie",
    "ipm",
    "min_max",
)
STRATEGY_ORDER = (
    "fedavg",
    "krum",
    "multikrum",
    "bulyan",
    "trimmed_mean",
    "median",
    "trust",
)
# Largest accepted drop of the trust strategy from attack-free FedAvg at 20 % attackers.
TRUST_TOLERANCE = 0.02


@dataclass
class RunResult:
    """One finished run of the sweep."""

    scenario: str
    strategy: str
    attack: str
    fraction: float
    attackers: list[int]
    metric: str
    value: float
    quarantined: dict[int, int] = field(default_factory=dict)
    dropped: int = 0


def read_run(summary_path: Path) -> RunResult:
    """Read one run's summary and robustness events."""
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    attack = summary.get("attack") or {"name": "none", "fraction": 0.0, "attackers": []}
    metric = summary["primary_metric"]
    value = summary["federated"]["global"].get(metric)

    result = RunResult(
        scenario=summary["scenario"],
        strategy=summary["strategy"],
        attack=attack["name"],
        fraction=float(attack.get("fraction", 0.0))
        if attack["name"] != "none"
        else 0.0,
        attackers=list(attack.get("attackers", [])),
        metric=metric,
        value=float("nan") if value is None else float(value),
    )

    events = summary_path.parent / "metrics.jsonl"
    if events.exists():
        for line in events.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == "quarantined":
                result.quarantined.setdefault(int(record["node"]), int(record["round"]))
            elif record.get("event") == "reply_dropped":
                result.dropped += 1
    return result


def collect(folders: list[Path]) -> list[RunResult]:
    """Read every run under ``folders``; a later run with the same settings replaces an earlier one."""
    runs: dict[tuple, RunResult] = {}
    for folder in folders:
        for path in sorted(folder.rglob("summary.json")):
            run = read_run(path)
            runs[(run.scenario, run.strategy, run.attack, run.fraction)] = run
    return list(runs.values())


def _order(values, preferred) -> list:
    return [v for v in preferred if v in values] + sorted(
        v for v in values if v not in preferred
    )


def _cell(value: float, reference: float | None) -> str:
    if math.isnan(value):
        return "n/a"
    if reference is None or math.isnan(reference):
        return f"{value:.3f}"
    return f"{value:.3f} ({value - reference:+.3f})"


def render(runs: list[RunResult]) -> str:
    """Return the Markdown tables and notes for ``runs``."""
    lines: list[str] = []
    by_scenario: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_scenario[run.scenario].append(run)

    for scenario in sorted(by_scenario):
        scenario_runs = by_scenario[scenario]
        index = {(r.strategy, r.attack, r.fraction): r for r in scenario_runs}
        baseline = index.get(("fedavg", "none", 0.0))
        reference = baseline.value if baseline else None
        strategies = _order({r.strategy for r in scenario_runs}, STRATEGY_ORDER)
        attacks = _order(
            {r.attack for r in scenario_runs if r.attack != "none"}, ATTACK_ORDER
        )
        fractions = sorted({r.fraction for r in scenario_runs if r.attack != "none"})
        metric = scenario_runs[0].metric

        ref_text = "missing" if reference is None else f"{reference:.3f}"
        lines.append(
            f"### {scenario}: final {metric} (difference from attack-free FedAvg, {ref_text})\n"
        )
        for fraction in fractions or [None]:
            if fraction is not None:
                lines.append(f"Malicious fraction {fraction:.0%}:\n")
            header = ["aggregator", "no attack", *attacks]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|---" * len(header) + "|")
            for strategy in strategies:
                clean = index.get((strategy, "none", 0.0))
                cells = [_cell(clean.value, reference) if clean else "-"]
                for attack in attacks:
                    run = index.get((strategy, attack, fraction))
                    cells.append(_cell(run.value, reference) if run else "-")
                lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
            lines.append("")

        lines.extend(_notes(scenario_runs, reference))
    return "\n".join(lines)


def _notes(runs: list[RunResult], reference: float | None) -> list[str]:
    lines = []
    for run in sorted(runs, key=lambda r: (r.fraction, r.attack)):
        if run.strategy != "trust":
            continue
        attackers = set(run.attackers)
        caught = sorted(node for node in run.quarantined if node in attackers)
        honest = sorted(node for node in run.quarantined if node not in attackers)
        if caught or honest:
            lines.append(
                f"- trust, {run.attack} at {run.fraction:.0%}: quarantined attackers {caught}, honest nodes {honest}"
            )

    failing = [
        r
        for r in runs
        if r.strategy == "trust"
        and r.attack != "none"
        and abs(r.fraction - 0.2) < 1e-9
        and reference is not None
        and not (r.value >= reference - TRUST_TOLERANCE)
    ]
    trust_at_20 = [
        r
        for r in runs
        if r.strategy == "trust" and r.attack != "none" and abs(r.fraction - 0.2) < 1e-9
    ]
    if reference is not None and trust_at_20:
        verdict = (
            f"all {len(trust_at_20)} attacks"
            if not failing
            else "all but " + ", ".join(r.attack for r in failing)
        )
        lines.append(
            f"- trust at 20 % stays within {TRUST_TOLERANCE} of attack-free FedAvg under {verdict}."
        )

    dropped = sum(r.dropped for r in runs)
    lines.append(
        f"- update validation dropped {dropped} replies over {len(runs)} runs.\n"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, read the runs and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders",
        nargs="+",
        type=Path,
        help="multirun folders (searched recursively for summary.json)",
    )
    parser.add_argument(
        "--out", type=Path, help="Markdown file to write; default standard output"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    runs = collect(args.folders)
    if not runs:
        logger.error(
            "No summary.json found under %s; pass the multirun folders of the sweep.",
            ", ".join(map(str, args.folders)),
        )
        return 1

    text = render(runs)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
        logger.info("Wrote %d runs to %s", len(runs), args.out)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

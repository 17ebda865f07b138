"""Summarise a robustness sweep (aggregator x attack x malicious fraction) as Markdown tables.

Reads every ``summary.json`` under the given multirun folders and writes, per
scenario and malicious fraction, a table of the final primary metric with its
difference from attack-free FedAvg of the same scenario. Under the tables it
lists trust-weighting quarantines (attackers and honest nodes) and replies
dropped by update validation, read from each run's ``metrics.jsonl``.

Min-Max runs are labelled with their direction (``min_max/sign``), and ALIE
runs with a fixed z with it (``alie/z=1.5``). With ``--per-round`` it also
writes, per scenario, one row per run with the metric after each round
(``train_loss`` reads the nodes' mean training loss of the round), and a table
of how far the aggregate update was from the honest mean in attacked rounds.
With ``--compare BASE OTHER`` it writes one table per scenario and malicious
fraction with both strategies' metric under each attack and OTHER minus BASE
in points (hundredths), and the largest gap.

    python bench/robustness_table.py multirun/2026-12-05/00-00-00 --out table.md
    python bench/robustness_table.py runs/ --per-round accuracy,train_loss
    python bench/robustness_table.py runs/ --compare trust he_robust/trust
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
    "min_max/std",
    "min_max/unit_mean",
    "min_max/sign",
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
    # Metric name -> round -> value, from the server evaluations and the train phase.
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    # Round -> ``aggregate_deviation`` event, for each attacked round.
    deviations: dict[int, dict] = field(default_factory=dict)
    # Round -> distance of the crafted update from the honest mean.
    injected: dict[int, float] = field(default_factory=dict)


def attack_label(attack: dict) -> str:
    """Return the table label of an attack: its name, with the Min-Max direction or a fixed ALIE z."""
    name = attack["name"]
    if name == "min_max":
        return f"min_max/{attack.get('direction', 'std')}"
    if name == "alie" and attack.get("z") is not None:
        return f"alie/z={attack['z']:g}"
    return name


def strategy_label(run_dir: Path, name: str) -> str:
    """Return the table label of a run's strategy: its name, with the rule for ``he_robust`` (``he_robust/trust``).

    The rule comes from the run's ``config.yaml``; a run without one keeps the bare name.
    """
    if name != "he_robust":
        return name
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return name
    import yaml

    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    rule = (config.get("strategy") or {}).get("rule")
    return f"{name}/{rule}" if rule else name


def read_run(summary_path: Path) -> RunResult:
    """Read one run's summary and robustness events."""
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    attack = summary.get("attack") or {"name": "none", "fraction": 0.0, "attackers": []}
    metric = summary["primary_metric"]
    value = summary["federated"]["global"].get(metric)

    result = RunResult(
        scenario=summary["scenario"],
        strategy=strategy_label(summary_path.parent, summary["strategy"]),
        attack=attack_label(attack),
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
            _read_event(result, json.loads(line))
    return result


def _read_event(result: RunResult, record: dict) -> None:
    event = record.get("event")
    if event == "quarantined":
        result.quarantined.setdefault(int(record["node"]), int(record["round"]))
    elif event == "reply_dropped":
        result.dropped += 1
    elif event == "aggregate_deviation":
        result.deviations[int(record["round"])] = record
    elif event == "updates_replaced" and record.get("distances_to_honest_mean"):
        # Every attacker sends the same crafted update, so the first distance applies to all of them.
        result.injected[int(record["round"])] = float(
            record["distances_to_honest_mean"][0]
        )
    elif record.get("phase") == "server_evaluate":
        for name, value in record["metrics"].items():
            result.curves.setdefault(name, {})[int(record["round"])] = float(value)
    elif record.get("phase") == "train" and record.get("scope") == "global":
        loss = record.get("metrics", {}).get("train_loss")
        if loss is not None:
            result.curves.setdefault("train_loss", {})[int(record["round"])] = float(
                loss
            )


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


def render_rounds(runs: list[RunResult], metrics: list[str]) -> str:
    """Return per-round tables of ``metrics`` and the aggregate-deviation table for ``runs``."""
    lines: list[str] = []
    for scenario in sorted({r.scenario for r in runs}):
        scenario_runs = _sorted_runs([r for r in runs if r.scenario == scenario])
        for metric in metrics:
            lines.extend(_curve_table(scenario, metric, scenario_runs))
        lines.extend(_deviation_table(scenario, scenario_runs))
    return "\n".join(lines)


def _sorted_runs(runs: list[RunResult]) -> list[RunResult]:
    strategies = _order({r.strategy for r in runs}, STRATEGY_ORDER)
    attacks = _order({r.attack for r in runs}, ATTACK_ORDER)
    return sorted(
        runs,
        key=lambda r: (
            strategies.index(r.strategy),
            attacks.index(r.attack),
            r.fraction,
        ),
    )


def _curve_table(scenario: str, metric: str, runs: list[RunResult]) -> list[str]:
    rounds = sorted({n for r in runs for n in r.curves.get(metric, {})})
    if not rounds:
        return [f"No {metric} per round in the {scenario} runs.\n"]
    lines = [f"### {scenario}: {metric} after each round\n"]
    lines.append("| aggregator | attack | " + " | ".join(str(n) for n in rounds) + " |")
    lines.append("|---|---" + "|---" * len(rounds) + "|")
    for run in runs:
        curve = run.curves.get(metric, {})
        cells = [f"{curve[n]:.3f}" if n in curve else "-" for n in rounds]
        lines.append(
            f"| {run.strategy} | {_run_attack(run)} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    return lines


def _run_attack(run: RunResult) -> str:
    return "none" if run.attack == "none" else f"{run.attack} {run.fraction:.0%}"


def _deviation_table(scenario: str, runs: list[RunResult]) -> list[str]:
    attacked = [r for r in runs if r.deviations]
    if not attacked:
        return []
    note = (
        "Distances and norms are relative to the norm of the round's honest mean"
        " update. The crafted update's distance is the attack's own, before any rule.\n"
    )
    lines = [
        f"### {scenario}: aggregate update against the honest mean, over attacked rounds\n",
        note,
        "| aggregator | attack | crafted update distance | aggregate distance (mean) | aggregate distance (max) | aggregate norm (mean) | cosine (mean) | cosine (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in attacked:
        lines.append(
            f"| {run.strategy} | {_run_attack(run)} | "
            + " | ".join(_deviation_cells(run))
            + " |"
        )
    lines.append("")
    return lines


def _deviation_cells(run: RunResult) -> list[str]:
    norms = {
        n: d["honest_mean_norm"]
        for n, d in run.deviations.items()
        if d["honest_mean_norm"] > 0
    }
    relative = [run.deviations[n]["distance"] / norm for n, norm in norms.items()]
    injected = [
        run.injected[n] / norm for n, norm in norms.items() if n in run.injected
    ]
    sizes = [run.deviations[n]["aggregate_norm"] / norm for n, norm in norms.items()]
    cosines = [
        d["cosine"] for d in run.deviations.values() if not math.isnan(d["cosine"])
    ]
    return [
        _mean_text(injected),
        _mean_text(relative),
        f"{max(relative):.2f}" if relative else "-",
        _mean_text(sizes),
        _mean_text(cosines),
        f"{min(cosines):.2f}" if cosines else "-",
    ]


def _mean_text(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "-"


def render_comparison(runs: list[RunResult], base: str, other: str) -> str:
    """Return, per scenario and fraction, ``base`` and ``other`` under each attack and their gap in points."""
    lines: list[str] = []
    cells = {(r.scenario, r.strategy, r.attack, r.fraction): r.value for r in runs}
    for scenario in sorted({r.scenario for r in runs}):
        scenario_runs = [r for r in runs if r.scenario == scenario and r.strategy in (base, other)]
        metric = scenario_runs[0].metric if scenario_runs else "metric"
        for fraction in sorted({r.fraction for r in scenario_runs if r.fraction > 0}):
            attacks = _order({r.attack for r in scenario_runs}, ATTACK_ORDER)
            lines += [
                f"#### {scenario}: final {metric}, {base} against {other}, malicious fraction {fraction:.0%}",
                "",
                f"| attack | {base} | {other} | {other} - {base}, points |",
                "|---|---:|---:|---:|",
            ]
            gaps, attack_free = [], False
            for attack in attacks:
                # Attack-free runs carry fraction 0.
                key_fraction = 0.0 if attack == "none" else fraction
                a = cells.get((scenario, base, attack, key_fraction), float("nan"))
                b = cells.get((scenario, other, attack, key_fraction), float("nan"))
                gap = 100 * (b - a)
                if not math.isnan(gap):
                    gaps.append(gap)
                    attack_free = attack_free or attack == "none"
                lines.append(f"| {attack} | {_cell(a, None)} | {_cell(b, None)} | {gap:+.2f} |")
            if gaps:
                worst = max(gaps, key=abs)
                counted = "the attack-free run included" if attack_free else "no attack-free pair"
                lines += ["", f"Largest gap: {worst:+.2f} points over {len(gaps)} runs ({counted})."]
            lines.append("")
    return "\n".join(lines)


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
    parser.add_argument(
        "--per-round",
        metavar="METRICS",
        help="comma-separated metrics (server evaluation names or train_loss) to tabulate after every round",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("BASE", "OTHER"),
        help="write only the comparison of two strategies, e.g. --compare trust he_robust/trust (he_robust runs are labelled with their rule)",
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

    if args.compare:
        names = {run.strategy for run in runs}
        missing = [name for name in args.compare if name not in names]
        if missing:
            logger.error("No runs of %s under %s; strategies found: %s.", ", ".join(missing), ", ".join(map(str, args.folders)), ", ".join(sorted(names)))
            return 1
    text = render_comparison(runs, *args.compare) if args.compare else render(runs)
    if args.per_round:
        text += "\n" + render_rounds(runs, [m for m in args.per_round.split(",") if m])
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
        logger.info("Wrote %d runs to %s", len(runs), args.out)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

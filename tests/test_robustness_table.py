"""The robustness table script on hand-written run folders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "robustness_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("robustness_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write_run(
    folder: Path, strategy: str, attack: dict | None, events: list[dict]
) -> None:
    folder.mkdir(parents=True)
    summary = {
        "scenario": "imaging",
        "strategy": strategy,
        "attack": attack,
        "primary_metric": "roc_auc",
        "federated": {"global": {"roc_auc": 0.9}},
    }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    lines = [json.dumps(event) for event in events]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_attack_label_names_options(table) -> None:
    assert (
        table.attack_label({"name": "min_max", "direction": "sign"}) == "min_max/sign"
    )
    assert table.attack_label({"name": "min_max"}) == "min_max/std"
    assert table.attack_label({"name": "alie", "z": None}) == "alie"
    assert table.attack_label({"name": "alie", "z": 1.5}) == "alie/z=1.5"
    assert table.attack_label({"name": "ipm", "direction": "std"}) == "ipm"


def test_read_run_collects_rounds(table, tmp_path: Path) -> None:
    attack = {
        "name": "min_max",
        "fraction": 0.2,
        "direction": "unit_mean",
        "attackers": [2],
    }
    events = [
        {
            "phase": "server_evaluate",
            "round": 1,
            "scope": "global",
            "metrics": {"accuracy": 0.7},
        },
        {
            "phase": "train",
            "round": 1,
            "scope": "global",
            "metrics": {"train_loss": 0.5},
        },
        {
            "phase": "train",
            "round": 1,
            "scope": "node",
            "node": 0,
            "metrics": {"train_loss": 9.0},
        },
        {
            "phase": "attack",
            "round": 1,
            "event": "updates_replaced",
            "distances_to_honest_mean": [3.0],
        },
        {
            "phase": "attack",
            "round": 1,
            "event": "aggregate_deviation",
            "distance": 1.0,
            "honest_mean_norm": 2.0,
            "aggregate_norm": 1.0,
            "cosine": 0.5,
        },
    ]
    _write_run(tmp_path / "0_run", "krum", attack, events)

    run = table.read_run(tmp_path / "0_run" / "summary.json")

    assert run.attack == "min_max/unit_mean"
    assert run.curves["accuracy"] == {1: 0.7}
    assert run.curves["train_loss"] == {1: 0.5}
    assert run.injected == {1: 3.0}
    assert run.deviations[1]["distance"] == 1.0


def test_per_round_tables_show_values(table, tmp_path: Path) -> None:
    attack = {"name": "alie", "fraction": 0.2, "z": None, "attackers": [2]}
    events = [
        {
            "phase": "server_evaluate",
            "round": 0,
            "scope": "global",
            "metrics": {"accuracy": 0.4},
        },
        {
            "phase": "server_evaluate",
            "round": 1,
            "scope": "global",
            "metrics": {"accuracy": 0.8},
        },
        {
            "phase": "attack",
            "round": 1,
            "event": "updates_replaced",
            "distances_to_honest_mean": [3.0],
        },
        {
            "phase": "attack",
            "round": 1,
            "event": "aggregate_deviation",
            "distance": 1.0,
            "honest_mean_norm": 2.0,
            "aggregate_norm": 3.0,
            "cosine": 0.25,
        },
    ]
    _write_run(tmp_path / "0_run", "median", attack, events)
    _write_run(tmp_path / "1_run", "fedavg", None, events[:2])

    text = table.render_rounds(table.collect([tmp_path]), ["accuracy"])

    assert "| fedavg | none | 0.400 | 0.800 |" in text
    assert "| median | alie 20% | 0.400 | 0.800 |" in text
    # Crafted 3.0 / 2.0, aggregate distance 1.0 / 2.0 (mean and max), aggregate
    # norm 3.0 / 2.0, cosine 0.25 (mean and min).
    assert "| median | alie 20% | 1.50 | 0.50 | 0.50 | 1.50 | 0.25 | 0.25 |" in text
    assert "| fedavg | none | 1" not in text


def _summary_run(folder: Path, strategy: str, attack: str, value: float) -> None:
    folder.mkdir(parents=True)
    fraction = 0.0 if attack == "none" else 0.2
    summary = {
        "scenario": "fraud",
        "strategy": strategy,
        "attack": {"name": attack, "fraction": fraction, "attackers": [2, 4] if fraction else []},
        "primary_metric": "roc_auc",
        "federated": {"global": {"roc_auc": value}},
    }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def test_compare_reports_gap_in_points(table, tmp_path: Path) -> None:
    _summary_run(tmp_path / "a", "trust", "none", 0.930)
    _summary_run(tmp_path / "b", "he_robust", "none", 0.925)
    _summary_run(tmp_path / "c", "trust", "sign_flip", 0.931)
    _summary_run(tmp_path / "d", "he_robust", "sign_flip", 0.901)

    text = table.render_comparison(table.collect([tmp_path]), "trust", "he_robust")

    assert "#### fraud: final roc_auc, trust against he_robust, malicious fraction 20%" in text
    assert "| none | 0.930 | 0.925 | -0.50 |" in text
    assert "| sign_flip | 0.931 | 0.901 | -3.00 |" in text
    assert "Largest gap: -3.00 points over 2 runs (the attack-free run included)." in text


def test_he_robust_runs_labelled_by_rule(table, tmp_path: Path) -> None:
    _summary_run(tmp_path / "a", "he_robust", "sign_flip", 0.969)
    _summary_run(tmp_path / "b", "he_robust", "sign_flip", 0.988)
    (tmp_path / "a" / "config.yaml").write_text("strategy:\n  name: he_robust\n  rule: trust\n", encoding="utf-8")
    (tmp_path / "b" / "config.yaml").write_text("strategy:\n  name: he_robust\n  rule: norm_bound\n", encoding="utf-8")

    runs = {run.strategy: run.value for run in table.collect([tmp_path])}

    assert runs == {"he_robust/trust": 0.969, "he_robust/norm_bound": 0.988}


def test_compare_missing_strategy_fails(table, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _summary_run(tmp_path / "a", "trust", "sign_flip", 0.93)

    code = table.main([str(tmp_path), "--compare", "trust", "fedavg"])

    assert code == 1
    assert "No runs of fedavg under" in caplog.text

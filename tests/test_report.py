"""``fedseal report`` on a constructed sweep: every section with its real numbers, valid PNGs, no network resources."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from reporting import build_report
from reporting.cli import add_parser
from reporting.runs import discover_runs
from reporting.sections import cost_rows, robustness_cells

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC = "roc_auc"


def _write_run(
    folder: Path,
    *,
    strategy: str = "fedavg",
    attack: str = "none",
    fraction: float = 0.0,
    privacy: str = "none",
    encrypted: bool = False,
    curve: tuple[float, ...] = (0.30, 0.80, 0.90),
    gains: dict[str, float] | None = None,
    epsilons: tuple[float, ...] = (),
    bytes_per_node: tuple[int, int] = (40_000, 40_000),
    encrypt_seconds: float | None = None,
    source: str = "pooled test split",
    extra_records: tuple[dict, ...] = (),
    audit: tuple[dict, ...] = (),
) -> None:
    """Write the outputs of one 2-node run: config.yaml, summary.json, metrics.jsonl, audit.jsonl."""
    folder.mkdir(parents=True)
    config = {
        "scenario": {"name": "fraud", "primary_metric": METRIC},
        "strategy": {"name": strategy, "encrypted": encrypted},
        "security": {"preset": "tenseal_default"},
        "attack": {"name": attack, "fraction": fraction},
        "privacy": {"name": privacy},
        "nodes": 2,
        "rounds": len(curve) - 1,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))

    records = []
    for server_round, value in enumerate(curve):
        if server_round > 0:
            sent, received = bytes_per_node
            node_metrics = {"num-examples": 100.0, "train_seconds": 1.0}
            if encrypt_seconds is not None:
                node_metrics["encrypt_seconds"] = encrypt_seconds
            records.append({"phase": "train", "round": server_round, "scope": "global", "sampled": 2, "replied": 2, "failures": [], "metrics": {"num-examples": 200.0}})
            records += [{"phase": "train", "round": server_round, "scope": "node", "node": node, "metrics": node_metrics} for node in (0, 1)]
            records.append({"phase": "cost", "round": server_round, "event": "train", "scope": "global", "bytes_sent": 2 * sent, "bytes_received": 2 * received, "wait_s": 2.0, "aggregate_s": 0.5})
            records += [{"phase": "privacy", "round": server_round, "event": "epsilon", "partition": node, "epsilon": epsilons[node] * server_round / (len(curve) - 1), "scope": "global"} for node in range(len(epsilons))]
        if source == "pooled test split":
            records.append({"phase": "server_evaluate", "round": server_round, "scope": "global", "metrics": {METRIC: value}})
        elif server_round > 0:
            # The server cannot score an encrypted model; only the nodes' evaluation exists.
            records.append({"phase": "evaluate", "round": server_round, "scope": "global", "sampled": 2, "replied": 2, "failures": [], "metrics": {METRIC: value}})
    records += list(extra_records)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "audit.jsonl").write_text("".join(json.dumps(e) + "\n" for e in audit))

    summary = {"federated": {"global": {METRIC: curve[-1]}}, "global_source": source, "parameters": 1000, "seconds": {"total": 12.5}, "primary_metric": METRIC}
    if gains is not None:
        summary["gain"] = {node: {f"delta_{METRIC}": delta} for node, delta in gains.items()}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A small sweep: attack-free FedAvg, two attacked rules, encrypted FedAvg, DP-SGD at two epsilons and a failed job."""
    root = tmp_path / "sweep"
    _write_run(root / "0_fedavg", gains={"0": 0.0512, "1": -0.0123})
    _write_run(
        root / "1_fedavg_sign_flip",
        attack="sign_flip",
        fraction=0.5,
        curve=(0.30, 0.55, 0.612),
        extra_records=({"phase": "validation", "round": 2, "event": "reply_dropped", "node": 1, "reason": "update norm 93.1 exceeds 10 x median", "scope": "node"},),
    )
    _write_run(
        root / "2_trust_sign_flip",
        strategy="trust",
        attack="sign_flip",
        fraction=0.5,
        curve=(0.30, 0.85, 0.905),
        extra_records=({"phase": "trust", "round": 2, "event": "quarantined", "node": 1, "reputation": 0.0811, "until_round": 7, "scope": "node"},),
        audit=({"event": "update_rejected", "check": "signature", "round": 1, "partition": 1, "reason": "signature does not match the payload"},),
    )
    _write_run(root / "3_he_fedavg", strategy="he_fedavg", encrypted=True, bytes_per_node=(82_500, 83_000), encrypt_seconds=0.375, source="mean over nodes")
    _write_run(root / "4_dp_eps1", privacy="dp_sgd", epsilons=(0.98, 1.0), curve=(0.30, 0.70, 0.8125))
    _write_run(root / "5_dp_eps8", privacy="dp_sgd", epsilons=(7.5, 8.0), curve=(0.30, 0.75, 0.8875))
    failed = root / "6_fedavg"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"scenario": {"name": "fraud", "primary_metric": METRIC}, "strategy": {"name": "fedavg"}}))
    (failed / "failed.json").write_text(json.dumps({"status": "failed", "error": "ValueError", "message": "Invalid setting train.lr=-1"}))
    return root


def _text(page: str) -> str:
    """Return the page's visible text (tags stripped, entities kept)."""
    return re.sub(r"<[^>]+>", " ", page)


def test_report_sections_have_numbers(sweep: Path, tmp_path: Path) -> None:
    index = build_report(sweep, tmp_path / "report")
    page = index.read_text()
    text = _text(page)

    for heading in ("Runs", "Metric per round", "Robustness", "Gain per node against local-only training", "Encryption cost", "Privacy-utility", "Rejections and quarantines"):
        assert f"<h2>{heading}</h2>" in page, heading
    # Metric per round: the sign-flip run's round-2 value.
    assert "0.6120" in text
    # Robustness: value and change from attack-free FedAvg (0.900).
    assert "0.612 (-0.288)" in text
    assert "0.905 (+0.005)" in text
    assert "sign_flip 50 %" in text
    # The encrypted run is scored on the nodes, the reference on the pooled split: no change shown.
    assert "0.900 (other source)" in text
    assert "mean over nodes" in text
    assert "weighted mean over nodes" in text
    # Per-node gain against local-only.
    assert "+0.0512" in text
    assert "-0.0123" in text
    # Encryption: 2 nodes x 82,500 B sent per round over 1,000 parameters.
    assert "82.50" in text
    assert "83.00" in text
    assert "40.00" in text
    assert "0.375" in text
    assert "2.500" in text
    # Privacy-utility: largest epsilon over nodes, final metric.
    assert "8.000" in text
    assert "0.8875" in text
    assert "none (no DP)" in text
    # Timeline: reasons from the run log, the audit log and the failed job.
    assert "update norm 93.1 exceeds 10 x median" in text
    assert "reputation 0.0811, out through round 7" in text
    assert "signature does not match the payload" in text
    assert "Invalid setting train.lr=-1" in text
    assert "7 runs" in text
    assert "1 failed" in text
    assert "No run in this folder" not in text


def test_report_figures_are_valid_pngs(sweep: Path, tmp_path: Path) -> None:
    index = build_report(sweep, tmp_path / "report")
    page = index.read_text()

    sources = re.findall(r"<img src='([^']+)'", page)
    assert sorted(sources) == ["node_gains.png", "privacy_utility.png", "rounds_roc_auc.png", "timeline.png"]
    for source in sources:
        path = index.parent / source
        assert path.read_bytes()[:8] == PNG_SIGNATURE, source
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 400, source
        assert height > 200, source


def test_report_loads_nothing_remote(sweep: Path, tmp_path: Path) -> None:
    page = build_report(sweep, tmp_path / "report").read_text()

    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    assert "<link" not in page


def test_report_says_what_to_run(tmp_path: Path) -> None:
    _write_run(tmp_path / "runs" / "plain", curve=(0.3, 0.7))

    text = _text(build_report(tmp_path / "runs", tmp_path / "report").read_text())

    assert "No run in this folder used an encrypted strategy" in text
    assert "fedseal-train -m +sweep=encryption" in text
    assert "fedseal-train -m +sweep=privacy_utility" in text
    assert "fedseal-train -m +sweep=robustness" in text
    assert "baselines=true" in text
    assert "No update was rejected" in text


def test_robustness_without_reference(tmp_path: Path) -> None:
    _write_run(tmp_path / "runs" / "trust", strategy="trust", attack="ipm", fraction=0.2, curve=(0.3, 0.9))

    runs = discover_runs(tmp_path / "runs")
    (cell,) = robustness_cells(runs)
    text = _text(build_report(tmp_path / "runs", tmp_path / "report").read_text())

    assert cell.drop is None
    assert "no attack-free FedAvg run of fraud" in text


def test_cost_rows_per_parameter(sweep: Path) -> None:
    rows = {row.label: row for row in cost_rows(discover_runs(sweep))}

    assert rows["3_he_fedavg"].upload_bytes_per_parameter == pytest.approx(83.0)
    assert rows["3_he_fedavg"].download_bytes_per_parameter == pytest.approx(82.5)
    assert rows["3_he_fedavg"].encrypt_seconds == pytest.approx(0.375)
    assert rows["0_fedavg"].encrypt_seconds == 0.0
    assert rows["0_fedavg"].round_seconds == pytest.approx(2.5)
    assert "6_fedavg" not in rows


def test_report_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        build_report(tmp_path / "missing", tmp_path / "report")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No run found under"):
        build_report(tmp_path / "empty", tmp_path / "report")


def _run_cli(*argv: str) -> int:
    """Parse ``fedseal report ...`` arguments as the ``fedseal`` command does and run the handler."""
    parser = argparse.ArgumentParser(prog="fedseal")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_cli_report_exit_codes(sweep: Path, tmp_path: Path) -> None:
    assert _run_cli("report", str(sweep), "--out", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "index.html").exists()
    assert _run_cli("report", str(tmp_path / "missing"), "--out", str(tmp_path / "out2")) == 1


def test_cli_report_requires_out(sweep: Path) -> None:
    with pytest.raises(SystemExit):
        _run_cli("report", str(sweep))

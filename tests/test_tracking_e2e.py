"""Tracking and reports on real runs: a Hydra multirun on Ray with offline W&B, and a run with broken W&B settings.

The multirun (fraud, 2 nodes, 2 rounds, three jobs of which the middle one
fails its config check) starts Ray three times, so it runs once per module.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_offline import read_finished_run

from reporting import build_report
from server.config import compose_config
from server.simulation import run_in_simulation

pytestmark = pytest.mark.e2e

GOOD_JOBS = ("0_fraud_fedavg", "2_fraud_fedavg")
FAILED_JOB = "1_fraud_fedavg"


def _sandbox_env(home: Path) -> dict[str, str]:
    """Return the environment of the sweep: no W&B key, and W&B's caches in the test folder."""
    env = {key: value for key, value in os.environ.items() if key != "WANDB_API_KEY"}
    env["NETRC"] = str(home / "no-netrc")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[name] = str(home / name.lower())
    return env


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Run ``fedseal-train -m train.lr=0.3,-1,0.2`` once; lr=-1 fails inside the job."""
    base = tmp_path_factory.mktemp("tracked-sweep")
    sweep_dir = base / "sweep"
    result = subprocess.run(
        [
            sys.executable, "-m", "server.train", "-m",
            "scenario=fraud", "nodes=2", "rounds=2", "baselines=false",
            "train.lr=0.3,-1,0.2", "tracking=wandb", "tracking.mode=offline",
            f"data.root={data_root}", f"hydra.sweep.dir={sweep_dir}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        env=_sandbox_env(base / "wandb-home"),
    )
    return sweep_dir, result


def _metrics_jsonl(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def test_sweep_survives_failed_job(sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, result = sweep

    assert result.returncode == 0, result.stderr[-3000:]
    failure = json.loads((sweep_dir / FAILED_JOB / "failed.json").read_text())
    assert failure["error"] == "ConfigError"
    assert "train.lr=-1" in failure["message"]
    assert "train.lr=-1" in failure["overrides"]
    assert not (sweep_dir / FAILED_JOB / "summary.json").exists()
    for job in GOOD_JOBS:
        assert (sweep_dir / job / "summary.json").exists(), job
    log = result.stdout + result.stderr
    assert "1 job(s) of the sweep" in log
    assert "Ray was still running" not in log


def test_each_job_has_own_wandb_run(sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, _ = sweep
    run_ids = set()

    for job, lr in zip(GOOD_JOBS, (0.3, 0.2)):
        offline_dirs = sorted((sweep_dir / job / "wandb").glob("offline-run-*"))
        assert len(offline_dirs) == 1, job
        run = read_finished_run(offline_dirs[0])
        run_ids.add(run.run_id)

        assert run.exit_code == 0
        assert run.group == "tracked-sweep0_sweep"
        assert run.name == job
        assert run.config["train"]["lr"] == lr
        assert sorted(run.history) == [0, 1, 2]

        records = _metrics_jsonl(sweep_dir / job)
        pooled = {r["round"]: r["metrics"]["roc_auc"] for r in records if r["phase"] == "server_evaluate"}
        assert run.history[2]["eval_pooled/roc_auc"] == pooled[2]
        assert run.history[1]["eval_pooled/roc_auc"] == pooled[1]
        cost = next(r for r in records if r["phase"] == "cost" and r["event"] == "train" and r["round"] == 2)
        assert run.history[2]["bytes/train_sent"] == cost["bytes_sent"]
        assert run.history[2]["bytes/train_received"] == cost["bytes_received"]
        assert run.history[2]["time/encryption_s"] == 0
        assert run.history[2]["updates/accepted"] == 2
        assert run.history[2]["nodes/nrows"] == 2

        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert run.summary["federated/global/roc_auc"] == summary["federated"]["global"]["roc_auc"]
        assert run.summary["parameters"] == summary["parameters"]
        assert ("model-" + run.run_id, "model", ["model_final.pt"]) in run.artifacts

    assert len(run_ids) == 2
    assert not (sweep_dir / FAILED_JOB / "wandb").exists()


def test_report_of_real_sweep(sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    sweep_dir, _ = sweep

    index = build_report(sweep_dir, tmp_path / "report")

    page = index.read_text()
    records = _metrics_jsonl(sweep_dir / GOOD_JOBS[0])
    round_2 = next(r for r in records if r["phase"] == "server_evaluate" and r["round"] == 2)
    summary = json.loads((sweep_dir / GOOD_JOBS[0] / "summary.json").read_text())
    assert f"{round_2['metrics']['roc_auc']:.4f}" in page
    assert f"{summary['parameters']:,}" in page
    assert "failed" in page
    assert "Invalid setting train.lr=-1" in page
    assert "fedseal-train -m +sweep=encryption" in page


def test_broken_wandb_setting_run_completes(tmp_path: Path, data_root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_config(["nodes=2", "rounds=1", "baselines=false", f"data.root={data_root}", f"output_dir={tmp_path}", "tracking=wandb", "tracking.mode=sometimes"])

    with caplog.at_level(logging.WARNING):
        summary = run_in_simulation(cfg, tmp_path)

    assert summary["rounds"] == 1
    assert (tmp_path / "model_final.pt").exists()
    tracking_warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "W&B" in r.getMessage()]
    assert len(tracking_warnings) == 1
    assert "tracking.mode='sometimes'" in tracking_warnings[0].getMessage()
    assert not (tmp_path / "wandb").exists()

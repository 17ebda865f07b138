"""Kill a training run with SIGKILL in the middle of a round, resume it, compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from provenance.audit import verify_chain

pytestmark = pytest.mark.e2e

ARGS = ["nodes=2", "rounds=4", "baselines=false", "scenario=fraud"]


def _train(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.train", *ARGS, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *extra]


def _committed_round(run_dir: Path) -> int:
    path = run_dir / "state" / "run_state.json"
    try:
        return json.loads(path.read_text())["server_round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_kill_and_resume_matches(tmp_path: Path, data_root: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_train(reference, data_root), check=True, capture_output=True, timeout=600)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_train(resumed, data_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _committed_round(resumed) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert _committed_round(resumed) == 2, "the run did not reach round 2 in time"
        # Round 3 starts right after the commit of round 2.
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not (resumed / "summary.json").exists()

    finished = subprocess.run(_train(resumed, data_root, "resume=true"), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    expected = torch.load(reference / "model_final.pt")
    actual = torch.load(resumed / "model_final.pt")
    for key in expected:
        assert float((expected[key] - actual[key]).abs().max()) <= 1e-6, key

    assert verify_chain(resumed / "audit.jsonl").ok
    events = [json.loads(line)["event"] for line in (resumed / "audit.jsonl").read_text().splitlines()]
    assert events.count("run_resume") == 1
    assert events.count("version") == 4 or events.count("version") == 5
    summary = json.loads((resumed / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["federated"]["global"] == pytest.approx(reference_summary["federated"]["global"], abs=1e-6)

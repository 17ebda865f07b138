"""`fedseal deploy local` end to end: a SuperLink and SuperNodes with TLS and node authentication.

The deployment runs as a subprocess, as a user would start it. Its daemons
run in their own sessions, so each test also looks for stray processes by
the test's unique state folder and stops them by PID.
"""

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

from clients.local import build_model, evaluate_model
from crypto.ckks import SECRET_CONTEXT_FILENAME
from scenarios.spec import load_all_nodes, scenario_for
from server.cli import main as fedseal
from server.config import compose_config, task_spec
from tests.deploy_helpers import (
    audit_entries,
    lingering_processes,
    processes_using,
    stop_pids,
)

# The `fedseal` command of the Python that runs the tests, also when its venv is not activated.
FEDSEAL = [sys.executable, "-m", "server.cli"]
OVERRIDES = ["strategy=he_fedavg", "rounds=2", "security=tenseal_default", "security.update_bound=5"]


def _deploy(state: Path, data_root: Path, arguments: list[str], timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, "FEDSEAL_DATA_DIR": str(data_root), "FEDSEAL_OFFLINE": "1"}
    command = [*FEDSEAL, "deploy", "local", "--state-dir", str(state), *arguments]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _deploy_to_end(state: Path, data_root: Path, arguments: list[str], timeout_s: float = 600) -> tuple[subprocess.Popen, str, dict[int, str]]:
    """Run ``fedseal deploy local`` to its end; return the process, its output and the processes still running for ``state``.

    Fails the test when the command runs longer than ``timeout_s``, and always stops what is left.
    """
    process = _deploy(state, data_root, arguments, timeout_s)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        leftovers = lingering_processes(state)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
        pytest.fail(f"fedseal deploy local did not finish in {timeout_s:.0f} s:\n{output[-4000:]}")
    finally:
        stop_pids(processes_using(state))
    return process, output, leftovers


def _pooled_roc_auc(state: dict, data_root: Path) -> float:
    cfg = compose_config(["strategy=he_fedavg", "nodes=3", f"data.root={data_root}"])
    spec = task_spec(cfg)
    scenario = scenario_for(spec)
    pooled = scenario.pool(load_all_nodes(spec))
    return evaluate_model(scenario, build_model(scenario, spec.train.seed, state), pooled)["roc_auc"]


@pytest.mark.e2e
def test_deploy_local_tls_encrypted(tmp_path: Path, data_root: Path) -> None:
    state = tmp_path / "state"
    process, output, leftovers = _deploy_to_end(state, data_root, ["--nodes", "3", "--timeout", "480", "--", *OVERRIDES])

    assert process.returncode == 0, output[-6000:]
    assert leftovers == {}
    assert "SuperNodes online: 3/3" in output
    assert "[ROUND 2/2]" in output
    last_run = json.loads((state / "last-run.json").read_text())
    assert last_run["status"] == "finished:completed"
    run_dir = Path(last_run["run_dir"])

    # TLS on the SuperLink's port, and three SuperNodes that authenticated with registered keys.
    superlink_log = (state / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id=") == 3
    assert "No SuperNode found with the given public key" not in superlink_log

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == "he_fedavg"
    assert summary["rounds"] == 2
    assert summary["nodes"] == 3
    assert (run_dir / "model_final.ckks").exists()

    verified = subprocess.run([*FEDSEAL, "audit", "verify", str(run_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    entries = audit_entries(run_dir)
    starts = [entry for entry in entries if entry["event"] == "round_start"]
    assert [entry["round"] for entry in starts] == [1, 2]
    assert all(len(entry["sampled"]) == 3 for entry in starts)
    signed = [entry for entry in entries if entry["event"] == "update_accepted" and entry.get("check") == "signature"]
    assert sorted((entry["round"], entry["partition"]) for entry in signed) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert not [entry for entry in entries if entry["event"] in ("update_rejected", "node_no_reply")]

    # The server side never held a CKKS secret context; each site did.
    server_files = {path.name for path in [*(state / "server").rglob("*"), *(state / "superlink").rglob("*")]}
    assert SECRET_CONTEXT_FILENAME not in server_files
    for partition_id in range(3):
        assert (state / "nodes" / f"node-{partition_id}" / "keys" / "ckks" / SECRET_CONTEXT_FILENAME).exists()
        # The evaluate message of each round reused the model its train message decrypted.
        assert (state / "nodes" / f"node-{partition_id}" / "state" / "model-cache" / "global-latest.pt").exists()

    # A site decrypts the final model; it beats the initial model on the pooled test split.
    final_path = tmp_path / "final.pt"
    assert fedseal(["models", "decrypt", str(run_dir), "--secret-dir", str(state / "nodes" / "node-0" / "keys" / "ckks"), "--out", str(final_path)]) == 0
    initial_auc = _pooled_roc_auc(torch.load(run_dir / "model_initial.pt"), data_root)
    final_auc = _pooled_roc_auc(torch.load(final_path), data_root)
    assert final_auc > initial_auc + 0.1, (initial_auc, final_auc)
    assert final_auc > 0.9
    assert summary["federated"]["global"]["roc_auc"] > 0.9


@pytest.mark.e2e
def test_deploy_local_he_robust_trust_validator(tmp_path: Path, data_root: Path) -> None:
    state = tmp_path / "state"
    overrides = ["strategy=he_robust", "strategy.rule=trust", "rounds=2", "data.holdout=200"]
    process, output, leftovers = _deploy_to_end(state, data_root, ["--nodes", "3", "--timeout", "480", "--", *overrides])

    assert process.returncode == 0, output[-6000:]
    assert leftovers == {}
    # Three sites and the validator authenticated with registered keys.
    superlink_log = (state / "logs" / "superlink.log").read_text()
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id=") == 4
    run_dir = Path(json.loads((state / "last-run.json").read_text())["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == "he_robust"
    assert summary["federated"]["global"]["roc_auc"] > 0.9

    # The validator's signed reference was checked each round, and only sites' updates were summed.
    verified = subprocess.run([*FEDSEAL, "audit", "verify", str(run_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    entries = audit_entries(run_dir)
    references = [entry for entry in entries if entry["event"] == "reference_accepted"]
    assert [(entry["round"], entry["partition"]) for entry in references] == [(1, 3), (2, 3)]
    signed = [entry for entry in entries if entry["event"] == "update_accepted" and entry.get("check") == "signature"]
    assert sorted({entry["partition"] for entry in signed}) == [0, 1, 2]
    assert not [entry for entry in entries if entry["event"] in ("update_rejected", "reference_rejected", "he_robust_round_skipped")]

    # The server has no scoring secret; a site's key decrypts the final model.
    server_files = {path.name for path in [*(state / "server").rglob("*"), *(state / "superlink").rglob("*")]}
    assert not [name for name in server_files if "secret" in name]
    final_path = tmp_path / "final.pt"
    assert fedseal(["models", "decrypt", str(run_dir), "--secret-dir", str(state / "nodes" / "node-0" / "keys" / "ckks"), "--out", str(final_path)]) == 0
    assert _pooled_roc_auc(torch.load(final_path), data_root) > 0.9


@pytest.mark.e2e
def test_deploy_interrupt_stops_everything(tmp_path: Path, data_root: Path) -> None:
    state = tmp_path / "state"
    process = _deploy(state, data_root, ["--nodes", "2", "--timeout", "300", "--", "rounds=1"], 300)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (state / "logs" / "supernode-1.log").exists() and process.poll() is None:
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert processes_using(state) != []

        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
        leftovers = lingering_processes(state)
    finally:
        if process.poll() is None:
            process.kill()
        stop_pids(processes_using(state))

    assert process.returncode == 130, output[-4000:]
    assert "Interrupted by SIGINT" in output
    assert leftovers == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--nodes", "3", "--timeout", "0"], "--timeout must be > 0"),
        (["--nodes", "3", "--", "nodes=4"], "nodes=4 differs from --nodes 3"),
        (["--nodes", "3", "--", "security.keys_dir=/tmp/keys"], "security.keys_dir is set by `fedseal deploy`"),
        (["--nodes", "3", "--", "rounds"], "Invalid override 'rounds'"),
        (["--nodes", "3", "--", "train.nope=1"], "invalid overrides"),
        (["--nodes", "3", "--", "strategy=nope"], "invalid overrides"),
        (["--nodes", "3", "--", "train.lr=-1"], "Invalid setting train.lr=-1"),
    ],
)
def test_deploy_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str) -> None:
    state = tmp_path / "state"
    code = fedseal(["deploy", "local", "--state-dir", str(state), *arguments])

    assert code == 2
    assert message in capsys.readouterr().err
    # Rejected before any key or process was made.
    assert not state.exists()


def test_deploy_reused_state_other_node_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.layout import provision

    provision(tmp_path / "state", 2, "compact", tls=True)
    code = fedseal(["deploy", "local", "--state-dir", str(tmp_path / "state"), "--nodes", "3"])

    assert code == 2
    assert "contains keys for 2 nodes, not 3" in capsys.readouterr().err
    assert not (tmp_path / "state" / "logs" / "superlink.log").exists()

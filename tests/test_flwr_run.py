"""`flwr run .` against Flower's managed local SuperLink in simulation mode.

The SuperLink that `flwr run` starts is detached and outlives the command,
so the test gives it its own FLWR_HOME and ports and stops it by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _superlink_pids(flwr_home: Path) -> list[int]:
    result = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    return [int(pid) for pid in result.stdout.split()]


def _stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("scenario", "strategy"), [("maintenance", "fedavg"), ("fraud", "he_fedavg")])
def test_flwr_run_local_simulation(scenario: str, strategy: str, tmp_path: Path, data_root: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    out_dir = tmp_path / "runs"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FEDSEAL_DATA_DIR": str(data_root),
    }
    # Under `flwr run` nobody provisions keys for the run: create them first, as an operator would.
    keys = tmp_path / "keys"
    subprocess.run(["fedseal", "keys", "init", "--out", str(keys), "--nodes", "2"], check=True, capture_output=True, timeout=120)
    overrides = f"nodes=2 rounds=2 baselines=false provenance.keys_dir={keys}"
    if strategy == "he_fedavg":
        # The ServerApp only reads keys/server; the simulated nodes read keys/node.
        overrides += f" evaluate.server_side=false security.keys_dir={keys}"
    run_config = f'scenario="{scenario}" strategy="{strategy}" overrides="{overrides}" output-dir="{out_dir}"'
    try:
        submitted = subprocess.run(
            ["flwr", "run", ".", "--format", "json", "--federation-config", "num-supernodes=2 client-resources-num-cpus=1", "-c", run_config],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]

        # `flwr run --stream` exits 0 even when the run failed, so poll the status.
        status = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listed = subprocess.run(
                ["flwr", "ls", "--run-id", str(run_id), "--format", "json"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
            )
            runs = json.loads(listed.stdout).get("runs", [])
            status = runs[0]["status"] if runs else ""
            if status.startswith("finished"):
                break
            time.sleep(2)

        assert status == "finished:completed", listed.stdout
        summaries = list(out_dir.glob("*/summary.json"))
        assert len(summaries) == 1
        summary = json.loads(summaries[0].read_text())
        assert summary["scenario"] == scenario
        assert summary["strategy"] == strategy
        assert summary["rounds"] == 2
        run_folder = summaries[0].parent
        if strategy == "fedavg":
            assert summary["federated"]["global"]["roc_auc"] > summary["round_0"]["global"]["roc_auc"]
        else:
            assert (run_folder / "model_final.ckks").exists()
            assert summary["federated"]["global"]["roc_auc"] > 0.8
        verified = subprocess.run(["fedseal", "audit", "verify", str(run_folder)], capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0, verified.stdout
    finally:
        _stop(_superlink_pids(flwr_home))

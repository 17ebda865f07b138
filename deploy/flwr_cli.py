"""The ``flwr`` commands a deployment needs, with JSON output parsed.

Every call runs with ``FLWR_HOME`` set to the deployment's own folder, so the
connection file (``config.toml``) and the CLI's state never touch the user's
``~/.flwr``. Telemetry and update checks are off.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONNECTION_NAME = "fedseal-local"
COMMAND_TIMEOUT_S = 120.0
COMPLETED = "finished:completed"

LOCAL_ONLY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class FlwrCommandError(RuntimeError):
    """A ``flwr`` command failed or printed output that is not the expected JSON."""


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for Flower processes: this Python's ``bin`` first on PATH, FLWR_HOME, no telemetry.

    The SuperNode starts ``flower-superexec`` and ``flwr-clientapp`` by name,
    so they must resolve to the same virtual environment as this process.
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **LOCAL_ONLY_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None, name: str = CONNECTION_NAME) -> Path:
    """Write ``flwr_home/config.toml`` with one default SuperLink connection; return its path.

    With ``ca_cert`` the CLI verifies the SuperLink's certificate against it;
    without, the connection is plaintext (``insecure = true``).
    """
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if ca_cert is not None:
        lines.append(f'root-certificates = "{Path(ca_cert).resolve()}"')
    else:
        lines.append("insecure = true")
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_flwr(args: list[str], env: Mapping[str, str], cwd: Path | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``flwr ARGS`` and return the completed process (any exit code)."""
    return subprocess.run(["flwr", *args], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)


def _json_output(result: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    """Parse the JSON object that ``--format json`` prints as the last stdout block."""
    text = result.stdout.strip()
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        payload = None
    if result.returncode != 0 or not isinstance(payload, dict) or payload.get("success") is False:
        detail = (result.stdout + result.stderr).strip()[-2000:]
        raise FlwrCommandError(f"{what} failed (exit code {result.returncode}): {detail}")
    return payload


def register_node(public_key: Path, env: Mapping[str, str], name: str | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink; return the node id it assigns.

    Raises
    ------
    FlwrCommandError
        If the SuperLink rejects the key (e.g. already registered) or is unreachable.
    """
    args = ["supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"]
    if name:
        args += ["--name", name]
    payload = _json_output(run_flwr(args, env), f"Registering {public_key}")
    return int(payload["node-id"])


def list_nodes(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Return the SuperLink's SuperNodes as dicts (``node-id``, ``status``, ...)."""
    payload = _json_output(run_flwr(["supernode", "list", CONNECTION_NAME, "--format", "json"], env), "Listing SuperNodes")
    return list(payload.get("nodes", []))


def submit_run(app_dir: Path, run_config_file: Path, env: Mapping[str, str]) -> int:
    """Submit the Flower app in ``app_dir`` with a run config TOML file; return the run id."""
    args = ["run", str(app_dir), CONNECTION_NAME, "--format", "json", "--run-config", str(run_config_file)]
    payload = _json_output(run_flwr(args, env, cwd=app_dir, timeout_s=300), "Submitting the run")
    return int(payload["run-id"])


def run_status(run_id: int, env: Mapping[str, str]) -> str:
    """Return the run's status as ``flwr ls`` reports it, e.g. ``running`` or ``finished:completed``."""
    payload = _json_output(run_flwr(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"], env), f"Reading the status of run {run_id}")
    runs = payload.get("runs", [])
    return str(runs[0]["status"]) if runs else ""

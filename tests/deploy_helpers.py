"""Helpers for the deployment tests: stray-process cleanup and audit log reading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def processes_using(path: Path) -> list[int]:
    """Return the PIDs whose command line contains ``path`` (the test's unique state folder)."""
    result = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True, check=False)
    return [int(pid) for pid in result.stdout.split() if int(pid) != os.getpid()]


def stop_pids(pids: list[int], grace_s: float = 15.0) -> None:
    """SIGTERM each PID, wait up to ``grace_s``, then SIGKILL the ones still running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def audit_entries(run_dir: Path) -> list[dict[str, Any]]:
    """Return the run's audit log entries."""
    return [json.loads(line) for line in (run_dir / "audit.jsonl").read_text(encoding="utf-8").splitlines()]

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


def lingering_processes(path: Path, timeout_s: float = 10.0) -> dict[int, str]:
    """Return {PID: command line} of processes that still use ``path`` after up to ``timeout_s``.

    A process that received SIGKILL can match for a moment before the kernel ends it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        pids = processes_using(path)
        if not pids or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


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

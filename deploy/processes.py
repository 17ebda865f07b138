"""Daemon processes that are started in their own session and stopped by PID.

Each daemon runs as ``timeout -k GRACE LIMIT COMMAND`` in a new session
(``setsid``), so

- the ``timeout`` bound ends it even if the supervising Python process dies
  without cleaning up;
- its process group id equals the PID we recorded, and the children it
  starts (a SuperNode starts ``flower-superexec``, which starts one
  ``flwr-clientapp`` per message) share that group, so ``stop`` can reach
  them through that one id;
- a signal sent to one daemon never reaches another, which shared process
  groups under one ``timeout`` did with Flower 1.42 (repeated signals, hangs).

Output goes to a log file per daemon.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Seconds between SIGTERM and SIGKILL, both in ``stop`` and in ``timeout -k``.
STOP_GRACE_S = 15.0


class Daemon:
    """One long-running command with a log file, stopped by its PID.

    Parameters
    ----------
    name : str
        Label for log messages, e.g. ``superlink`` or ``supernode-2``.
    command : sequence of str
        The program and its arguments.
    log_path : Path
        File that receives the command's stdout and stderr (appended to).
    env : mapping of str to str
        The complete environment of the process.
    time_limit_s : float
        Wall-clock bound after which ``timeout`` sends SIGTERM (> 0).
    cwd : Path, optional
        Working directory.
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str], time_limit_s: float, cwd: Path | None = None) -> None:
        if time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}.")
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = dict(env)
        self.time_limit_s = float(time_limit_s)
        self.cwd = cwd
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """PID of the ``timeout`` wrapper, which is also the process group id; None before ``start``."""
        return self._process.pid if self._process is not None else None

    def start(self) -> int:
        """Start the command; return its PID."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        wrapped = ["timeout", "-k", str(int(STOP_GRACE_S)), str(int(self.time_limit_s)), *self.command]
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(wrapped, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, start_new_session=True)
        logger.info("Started %s, pid %d, log %s", self.name, self._process.pid, self.log_path)
        return self._process.pid

    def poll(self) -> int | None:
        """Return the exit code, or None while it runs (or before ``start``)."""
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        """Return whether the process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for the exit; return the exit code or None if it still runs."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """Send SIGTERM, wait ``grace_s``, then SIGKILL the whole group; return the exit code."""
        if self._process is None:
            return None
        # Collected first: once the parent exits, its children are reparented and untraceable.
        descendants = descendant_pids(self._process.pid)
        if self._process.poll() is None:
            logger.info("Stopping %s (pid %d)", self.name, self._process.pid)
            _signal_pid(self._process.pid, signal.SIGTERM)
            if self.wait(grace_s) is None:
                logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; sending SIGKILL to its process group", self.name, self._process.pid, grace_s)
        # Children (superexec, ServerApp, ClientApps) can outlive their parent,
        # and some start their own session, outside the group; end them too.
        _kill_group(self._process.pid)
        for pid in descendants:
            _signal_pid(pid, signal.SIGKILL)
        code = self.wait(grace_s)
        logger.info("%s (pid %d) stopped with exit code %s", self.name, self._process.pid, code)
        return code

    def kill(self) -> int | None:
        """SIGKILL the process, its group and its descendants at once, as a crash would; return the exit code."""
        if self._process is None:
            return None
        logger.info("Killing %s (pid %d) with SIGKILL", self.name, self._process.pid)
        descendants = descendant_pids(self._process.pid)
        _kill_group(self._process.pid)
        for pid in descendants:
            _signal_pid(pid, signal.SIGKILL)
        return self.wait(STOP_GRACE_S)

    def log_text(self) -> str:
        """Return the log file's content so far ('' if it does not exist yet)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


def descendant_pids(root: int) -> list[int]:
    """Return the PIDs of every live descendant of ``root`` (Linux ``/proc``), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces; the parent PID follows it.
        parent = int(stat_line.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))

    found: list[int] = []
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop(0)
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # PermissionError: the group is gone and its id was reused by another user's group.
        pass


def wait_for(condition, timeout_s: float, interval_s: float = 1.0, describe=None) -> bool:
    """Poll ``condition()`` until it is true or ``timeout_s`` passes; return the last result.

    ``describe()``, when given, returns a progress line that is logged
    whenever it changes, so long waits show what they are waiting for.
    """
    deadline = time.monotonic() + timeout_s
    last_line = None
    while True:
        if condition():
            return True
        if describe is not None:
            line = describe()
            if line != last_line:
                logger.info("%s", line)
                last_line = line
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)

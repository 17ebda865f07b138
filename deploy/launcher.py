"""A complete Flower federation on 127.0.0.1: one SuperLink, N SuperNodes, one run.

``LocalFederation`` owns every process it starts and stops each by PID in
``stop``; use it as a context manager so that happens on any exit. The steps
of ``fedseal deploy local`` are its methods, in this order:

1. ``start_superlink``: TLS on, SuperNode authentication on (unless
   insecure), a state database in the state directory, a free port.
2. ``register_nodes``: ``flwr supernode register`` for each site's public key
   (skipped for keys the SuperLink's database already holds).
3. ``start_supernode`` for each site and, for ``strategy=he_robust
   strategy.rule=trust``, the validator (partition id N), then ``wait_nodes_online``.
4. ``submit`` the app with the Hydra overrides as run config, then
   ``follow`` its log until it ends and read the final status with ``flwr ls``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from deploy import flwr_cli
from deploy.layout import Layout
from deploy.processes import Daemon, wait_for

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
NODE_IDS_FILE = "node-ids.json"
ROUND_PATTERN = re.compile(r"\[ROUND (\d+)/(\d+)\]")
# Seconds between status checks and between SuperNode listings while a run
# is going. Each `flwr` call took about 4 s on a 2-core machine, mostly
# imports, and that CPU time is taken from the SuperNodes on the same machine.
STATUS_INTERVAL_S = 30.0
ONLINE_INTERVAL_S = 90.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RunOutcome:
    """The end state of a submitted run.

    Parameters
    ----------
    run_id : int
        Flower's run id.
    status : str
        Final status from ``flwr ls`` (``finished:completed`` on success), or
        ``timed-out`` when the time limit passed first.
    run_dir : Path
        The run's output folder.
    rounds_seen : int
        Highest round announced in the run's log.
    seconds : float
        Wall time from submission to the final status.
    """

    run_id: int
    status: str
    run_dir: Path
    rounds_seen: int = 0
    seconds: float = 0.0

    @property
    def completed(self) -> bool:
        """Return whether Flower reports the run as ``finished:completed``."""
        return self.status == flwr_cli.COMPLETED


@dataclass
class LocalFederation:
    """The processes of one local deployment.

    Parameters
    ----------
    layout : Layout
        The provisioned state directory.
    time_limit_s : float
        Bound on every daemon's lifetime (passed to ``timeout``).
    echo : callable, optional
        Receives run log lines and progress lines for the user (default: ``print``).
    """

    layout: Layout
    time_limit_s: float = 3600.0
    echo: Callable[[str], None] = print
    superlink: Daemon | None = None
    supernodes: dict[int, Daemon] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)
    port: int = 0
    _restarts: dict[int, int] = field(default_factory=dict)
    _online_line: tuple[float, str] = (float("-inf"), "")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment of every Flower process of this deployment."""
        return flwr_cli.flower_env(self.layout.flwr_home)

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the SuperLink."""
        return f"127.0.0.1:{self.port}"

    # --- SuperLink -----------------------------------------------------------

    def superlink_command(self) -> list[str]:
        """Return the ``flower-superlink`` command line."""
        command = [
            "flower-superlink",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            "--database", str(self.layout.database),
        ]  # fmt: skip
        if self.layout.tls:
            tls = self.layout.superlink_tls
            command += [
                "--ssl-ca-certfile", str(tls / "ca.crt"),
                "--ssl-certfile", str(tls / "server.pem"),
                "--ssl-keyfile", str(tls / "server.key"),
                "--enable-supernode-auth",
            ]  # fmt: skip
        else:
            command.append("--insecure")
        return command

    def start_superlink(self, ready_timeout_s: float = 60.0) -> None:
        """Start the SuperLink on a free port, write the CLI connection, wait until it listens.

        Raises
        ------
        RuntimeError
            If it exits or does not listen within ``ready_timeout_s``; the message contains its log tail.
        """
        self.port = free_port()
        self.layout.superlink_dir.mkdir(parents=True, exist_ok=True)
        flwr_cli.write_connection(self.layout.flwr_home, self.address, self.layout.ca_cert)
        self.superlink = Daemon("superlink", self.superlink_command(), self.layout.logs_dir / "superlink.log", self.env, self.time_limit_s)
        self.superlink.start()

        ready = wait_for(lambda: port_open(self.port) or not self.superlink.is_running(), ready_timeout_s, 0.5)
        if not ready or not self.superlink.is_running():
            raise RuntimeError(f"The SuperLink did not start on {self.address} (exit code {self.superlink.poll()}). Log tail:\n{self.superlink.log_text()[-3000:]}")
        logger.info("SuperLink listening on %s (%s)", self.address, "TLS, SuperNode authentication" if self.layout.tls else "plaintext, no authentication")

    # --- SuperNodes ----------------------------------------------------------

    def register_nodes(self) -> dict[int, int]:
        """Register every site's public key that the SuperLink does not know yet; return {partition: node id}.

        Node ids are kept in ``superlink/node-ids.json`` beside the SuperLink's
        database, because a key registered once cannot be registered again.
        Without TLS there is no authentication and nothing to register.
        """
        if not self.layout.tls:
            return {}
        ids_file = self.layout.superlink_dir / NODE_IDS_FILE
        known = {int(key): int(value) for key, value in json.loads(ids_file.read_text()).items()} if ids_file.exists() else {}
        for node in self.layout.supernodes():
            if node.partition_id in known:
                continue
            name = "validator" if node.partition_id == self.layout.num_nodes else f"site-{node.partition_id}"
            known[node.partition_id] = flwr_cli.register_node(node.auth_public_key, self.env, name=name)
            logger.info("Registered the key of %s (partition %d) as SuperNode %d", name, node.partition_id, known[node.partition_id])
            ids_file.write_text(json.dumps({str(key): value for key, value in known.items()}), encoding="utf-8")
        self.node_ids = known
        return known

    def supernode_command(self, partition_id: int, auth_key: Path | None = None) -> list[str]:
        """Return the ``flower-supernode`` command line of site ``partition_id``.

        ``auth_key`` replaces the site's own authentication key (tests use it
        to present a key the SuperLink does not know).
        """
        node = self.layout.node(partition_id)
        command = [
            "flower-supernode",
            "--superlink", self.address,
            "--port", str(free_port()),
            "--node-config", str(node.node_config),
            # Give up after a minute without the SuperLink instead of retrying forever.
            "--max-wait-time", "60",
        ]  # fmt: skip
        if self.layout.tls:
            command += ["--root-certificates", str(node.ca_cert), "--auth-supernode-private-key", str(auth_key or node.auth_key)]
        else:
            command.append("--insecure")
        return command

    def start_supernode(self, partition_id: int, auth_key: Path | None = None) -> Daemon:
        """Start (or restart) site ``partition_id``'s SuperNode; return its daemon."""
        previous = self.supernodes.get(partition_id)
        if previous is not None and previous.is_running():
            raise RuntimeError(f"SuperNode {partition_id} is already running (pid {previous.pid}); stop it first.")
        if previous is not None:
            self._restarts[partition_id] = self._restarts.get(partition_id, 0) + 1
            logger.info("Restarting SuperNode of site %d (restart %d)", partition_id, self._restarts[partition_id])
        suffix = f".{self._restarts[partition_id]}" if self._restarts.get(partition_id) else ""
        log_path = self.layout.logs_dir / f"supernode-{partition_id}{suffix}.log"
        daemon = Daemon(f"supernode-{partition_id}", self.supernode_command(partition_id, auth_key), log_path, self.env, self.time_limit_s)
        daemon.start()
        self.supernodes[partition_id] = daemon
        return daemon

    def online_partitions(self) -> list[int]:
        """Return the sites whose SuperNode the SuperLink lists as online."""
        statuses = {int(entry["node-id"]): str(entry.get("status", "")) for entry in flwr_cli.list_nodes(self.env)}
        return sorted(partition for partition, node_id in self.node_ids.items() if statuses.get(node_id) == "online")

    def wait_nodes_online(self, partitions: Sequence[int] | None = None, timeout_s: float = 120.0) -> None:
        """Wait until the given sites (default: every SuperNode, the validator included) are online; log who is online while waiting.

        Raises
        ------
        RuntimeError
            If a SuperNode exits first or the wait times out; the message names the sites and their log tails.
        """
        expected = sorted(partitions if partitions is not None else [node.partition_id for node in self.layout.supernodes()])
        online: list[int] = []

        def all_online() -> bool:
            nonlocal online
            exited = [p for p in expected if p in self.supernodes and self.supernodes[p].poll() is not None]
            if exited:
                raise RuntimeError(self._exit_report(exited))
            if not self.layout.tls:
                # Without authentication the SuperLink assigns fresh ids; a running process is all we can check.
                online = [p for p in expected if "SuperNode ID" in self.supernodes[p].log_text()]
            else:
                online = [p for p in self.online_partitions() if p in expected]
            return online == expected

        def progress() -> str:
            return f"SuperNodes online: {len(online)}/{len(expected)} (sites {online or 'none'})"

        if not wait_for(all_online, timeout_s, 2.0, progress):
            raise RuntimeError(f"Timed out after {timeout_s:.0f} s waiting for SuperNodes; online: {online}, expected: {expected}.")
        self.echo(f"SuperNodes online: {len(expected)}/{len(expected)}")

    def _exit_report(self, partitions: list[int]) -> str:
        parts = [f"SuperNode {p} exited with code {self.supernodes[p].poll()}. Log tail:\n{self.supernodes[p].log_text()[-2000:]}" for p in partitions]
        return "\n".join(parts)

    # --- the run -------------------------------------------------------------

    def submit(self, run_config: dict[str, str], app_dir: Path = REPO_DIR) -> int:
        """Write ``run_config`` as TOML into the state directory and submit the app; return the run id."""
        path = self.layout.root / "run-config.toml"
        path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()), encoding="utf-8")
        run_id = flwr_cli.submit_run(app_dir, path, self.env)
        logger.info("Submitted run %d to %s", run_id, self.address)
        return run_id

    def follow(self, run_id: int, run_dir: Path, timeout_s: float) -> RunOutcome:
        """Stream the run's log to ``echo`` until the run ends or ``timeout_s`` passes; return the outcome.

        The final status comes from ``flwr ls``, never from the log
        stream's exit code, which is 0 also for failed runs (Flower 1.42).
        """
        started = time.monotonic()
        outcome = RunOutcome(run_id, "", run_dir)
        log_path = self.layout.logs_dir / "run.log"
        stream = Daemon("run-log", ["flwr", "log", str(run_id), flwr_cli.CONNECTION_NAME, "--stream"], log_path, self.env, timeout_s + 60)
        offset = log_path.stat().st_size if log_path.exists() else 0
        stream.start()
        last_check = 0.0
        try:
            while True:
                offset = self._echo_new_lines(log_path, offset, outcome)
                now = time.monotonic()
                if not stream.is_running() or now - last_check >= STATUS_INTERVAL_S:
                    last_check = now
                    outcome.status = flwr_cli.run_status(run_id, self.env)
                    if outcome.status.startswith("finished"):
                        break
                    if not stream.is_running():
                        # The stream can end early (SuperLink restart); resume it.
                        stream.start()
                    self.echo(f"run {run_id}: {outcome.status or 'unknown'}, round {outcome.rounds_seen or '-'}, {self._online_summary()}, {now - started:.0f} s")
                if now - started > timeout_s:
                    outcome.status = "timed-out"
                    break
                time.sleep(1.0)
        finally:
            stream.stop(grace_s=5)
            self._echo_new_lines(log_path, offset, outcome)
        outcome.seconds = time.monotonic() - started
        return outcome

    def _online_summary(self) -> str:
        """Return which sites are online for progress lines, listed at most every ONLINE_INTERVAL_S ("unknown" if listing fails)."""
        if not self.layout.tls:
            running = [p for p, daemon in sorted(self.supernodes.items()) if daemon.is_running()]
            return f"SuperNode processes running: {running}"
        listed_at, line = self._online_line
        if time.monotonic() - listed_at < ONLINE_INTERVAL_S:
            return line
        try:
            line = f"sites online: {self.online_partitions()}"
        except (flwr_cli.FlwrCommandError, OSError, subprocess.SubprocessError) as error:
            logger.warning("Listing SuperNodes failed: %s", error)
            line = "sites online: unknown"
        self._online_line = (time.monotonic(), line)
        return line

    def _echo_new_lines(self, log_path: Path, offset: int, outcome: RunOutcome) -> int:
        if not log_path.exists():
            return offset
        with log_path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        # Only whole lines; a partial last line waits for the next call.
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.decode("utf-8", errors="replace").splitlines():
            self.echo(line)
            match = ROUND_PATTERN.search(line)
            if match:
                outcome.rounds_seen = max(outcome.rounds_seen, int(match.group(1)))
        return offset + len(complete)

    # --- teardown --------------------------------------------------------------

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, each by PID (safe to call twice)."""
        for partition_id, daemon in sorted(self.supernodes.items()):
            if daemon.pid is not None:
                daemon.stop()
        if self.superlink is not None:
            self.superlink.stop()

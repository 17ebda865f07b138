"""``fedseal deploy local``: a whole federation on this machine with one command.

    fedseal deploy local --nodes 3 --state-dir /tmp/fedseal-deploy -- strategy=he_fedavg rounds=2
    fedseal deploy local --nodes 3 --state-dir /tmp/fedseal-robust -- strategy=he_robust strategy.rule=trust rounds=2

With ``strategy=he_robust strategy.rule=trust`` a fourth SuperNode, the
validator (partition id 3), starts beside the three sites.

Everything after ``--`` is a Hydra override, exactly as for ``fedseal-train``.
The command exits 0 only if ``flwr ls`` reports the run as
``finished:completed``; 1 if the run failed, timed out or a process did not
start; 2 on invalid input; 130 when interrupted (SIGINT or SIGTERM). Every
process it started is stopped by PID before it returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

# Overrides the launcher sets itself, because it provisions the keys.
RESERVED_OVERRIDES = ("security.keys_dir", "provenance.keys_dir", "provenance.registry_url")
# Defaults for a deployment, because its server has no data. The user may override them.
DEPLOY_DEFAULTS = {"evaluate.server_side": "false", "baselines": "false"}
LAST_RUN_FILE = "last-run.json"


class DeployInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the launcher stops its processes and exits."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``deploy local`` to the ``fedseal`` subcommands."""
    deploy = commands.add_parser("deploy", help="run a real Flower federation (SuperLink and SuperNodes)")
    deploy_commands = deploy.add_subparsers(dest="deploy_command", required=True)
    local = deploy_commands.add_parser(
        "local",
        help="start a SuperLink and N SuperNodes on 127.0.0.1, run one training job, stop them all",
        description="Start a SuperLink and N SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, "
        "run one job with the given Hydra overrides, and stop every process. Exit code 0 only if the run completed.",
    )
    local.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (sites), >= 1")
    local.add_argument("--state-dir", required=True, help="folder for keys, certificates, the SuperLink database, logs and run outputs (reused on the next call)")
    local.add_argument("--insecure", action="store_true", help="turn off TLS and SuperNode authentication (never on a real network)")
    local.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take before everything is stopped (default 1800)")
    local.add_argument("--san", action="append", default=[], help="extra host name or IP for the SuperLink certificate (repeatable)")
    local.add_argument("overrides", nargs="*", help="Hydra overrides after `--`, e.g. -- strategy=he_fedavg rounds=2")
    local.set_defaults(handler=deploy_local)


def split_overrides(overrides: list[str], num_nodes: int) -> tuple[dict[str, str], list[str]]:
    """Return (group choices for the run config, the remaining overrides with deploy settings added).

    Raises
    ------
    ValueError
        If an override is not ``key=value``, sets a key the launcher owns, or
        sets ``nodes`` to another value than ``--nodes``.
    """
    groups: dict[str, str] = {}
    rest: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid override {item!r}; use key=value, e.g. rounds=2.")
        bare_key = key.lstrip("+~")
        if bare_key in RESERVED_OVERRIDES:
            raise ValueError(f"{bare_key} is set by `fedseal deploy`, which provisions the keys in --state-dir; remove {item!r}.")
        if bare_key == "nodes" and value != str(num_nodes):
            raise ValueError(f"Override nodes={value} differs from --nodes {num_nodes}; drop the override or make them equal.")
        if bare_key in ("scenario", "strategy") and key == bare_key:
            groups[bare_key] = value
            continue
        rest.append(item)

    given = {item.partition("=")[0].lstrip("+~") for item in overrides}
    rest += [f"{key}={value}" for key, value in DEPLOY_DEFAULTS.items() if key not in given]
    if "nodes" not in given:
        rest.append(f"nodes={num_nodes}")
    return groups, rest


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    # Ignore further signals, so a second Ctrl-C cannot cut the teardown short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise DeployInterrupted(signal.Signals(signum).name)


def deploy_local(args: argparse.Namespace) -> int:
    """Run ``fedseal deploy local``; return the exit code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from server.config import compose_config, validate_config

    if args.nodes < 1:
        print(f"error: --nodes must be >= 1, got {args.nodes}.", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print(f"error: --timeout must be > 0 seconds, got {args.timeout}.", file=sys.stderr)
        return 2
    try:
        groups, overrides = split_overrides(list(args.overrides), args.nodes)
        # Compose here too, so a mistyped key fails before any process starts.
        cfg = compose_config([f"{key}={value}" for key, value in groups.items()] + overrides)
        validate_config(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        print(f"error: invalid overrides: {error}", file=sys.stderr)
        return 2
    if args.insecure:
        logger.warning("--insecure: TLS and SuperNode authentication are OFF; any process that reaches the port can join. Use this only on a closed test machine.")

    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, cfg, groups, overrides)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, cfg, groups: dict[str, str], overrides: list[str]) -> int:
    """Provision, start, run and stop; return the exit code."""
    from deploy.launcher import LocalFederation
    from deploy.layout import provision
    from scenarios.datasets import resolve_data_root
    from server.config import uses_validator

    started = time.monotonic()
    try:
        layout = provision(
            Path(args.state_dir),
            args.nodes,
            str(cfg.security.preset),
            tls=not args.insecure,
            hosts=["127.0.0.1", "localhost", *args.san],
            data_root=resolve_data_root(cfg.data.root),
            validator=uses_validator(cfg),
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    run_name = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{cfg.scenario.name}_{cfg.strategy.name}"
    run_dir = layout.runs_dir / run_name
    keys = str(layout.server_keys)
    run_config = {
        **groups,
        "overrides": " ".join([*overrides, f"security.keys_dir={keys}", f"provenance.keys_dir={keys}"]),
        "output-dir": str(layout.runs_dir),
        "run-name": run_name,
    }
    federation = LocalFederation(layout, time_limit_s=args.timeout + 600)
    outcome = None
    try:
        with federation:
            federation.start_superlink()
            federation.register_nodes()
            # The sites, then the he_robust trust validator when the run needs one.
            for node in layout.supernodes():
                federation.start_supernode(node.partition_id)
            federation.wait_nodes_online()
            run_id = federation.submit(run_config)
            print(f"Run {run_id} submitted; outputs in {run_dir}")
            outcome = federation.follow(run_id, run_dir, args.timeout)
    except DeployInterrupted as signal_name:
        print(f"Interrupted by {signal_name}; every process was stopped.", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        logger.error("Deployment failed: %s", error)
        print(f"error: {error}", file=sys.stderr)
        return 1

    _write_last_run(layout.root, outcome, time.monotonic() - started)
    print(f"Run {outcome.run_id}: {outcome.status} after {outcome.seconds:.0f} s ({outcome.rounds_seen} rounds seen); outputs in {outcome.run_dir}")
    if not outcome.completed:
        print(f"error: run {outcome.run_id} did not complete (status {outcome.status}); see {layout.logs_dir}.", file=sys.stderr)
        return 1
    return 0


def _write_last_run(root: Path, outcome, total_seconds: float) -> None:
    """Record the run id, status and folder for scripts that run after this command."""
    record = {
        "run_id": outcome.run_id,
        "status": outcome.status,
        "run_dir": str(outcome.run_dir),
        "rounds_seen": outcome.rounds_seen,
        "run_seconds": round(outcome.seconds, 1),
        "total_seconds": round(total_seconds, 1),
    }
    (root / LAST_RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

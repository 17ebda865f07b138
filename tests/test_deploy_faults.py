"""Deployment faults with TLS and SuperNode authentication on: unknown keys, crashes, restarts.

The crash and the restart share one federation (``interrupted_run``), because
each deployment costs minutes. Site 1's SuperNode is killed with SIGKILL
while it trains in round 1 and restarted once the SuperLink reports it
offline, and the run is followed to its end. Round 1 completes with site 0
alone. Round 2 waits for the restarted node, because every node must be
connected before a phase starts (``min_available_nodes``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from deploy import pki
from deploy.cli import split_overrides
from deploy.launcher import LocalFederation
from deploy.layout import provision
from deploy.processes import wait_for
from tests.deploy_helpers import (
    audit_entries,
    lingering_processes,
    processes_using,
    stop_pids,
)

pytestmark = pytest.mark.e2e

# Two sites keep the test short: each message costs a process start per site.
NUM_SITES = 2
CRASHED_SITE = 1


def _run_config(layout, overrides: list[str], run_name: str) -> dict[str, str]:
    groups, rest = split_overrides(overrides, layout.num_nodes)
    keys = str(layout.server_keys)
    return {
        **groups,
        "overrides": " ".join([*rest, f"security.keys_dir={keys}", f"provenance.keys_dir={keys}"]),
        "output-dir": str(layout.runs_dir),
        "run-name": run_name,
    }


def test_superlink_admits_only_registered_keys(tmp_path: Path, data_root: Path) -> None:
    layout = provision(tmp_path / "state", 1, "compact", tls=True, data_root=data_root)
    stranger_key, _ = pki.write_auth_key_pair(tmp_path / "stranger")
    lines: list[str] = []
    try:
        with LocalFederation(layout, time_limit_s=300, echo=lines.append) as federation:
            federation.start_superlink()
            node_ids = federation.register_nodes()
            stranger = federation.start_supernode(0, auth_key=stranger_key)

            code = stranger.wait(120)
            rejected = wait_for(lambda: "No SuperNode found with the given public key" in federation.superlink.log_text(), 30)
            online_after_rejection = federation.online_partitions()
            superlink_running = federation.superlink.is_running()

            # A new SuperLink process on the same database still accepts the registered key.
            federation.superlink.stop()
            federation.start_superlink()
            assert federation.register_nodes() == node_ids
            registered = federation.start_supernode(0)
            federation.wait_nodes_online(timeout_s=120)
            online_after_restart = federation.online_partitions()
    finally:
        stop_pids(processes_using(layout.root))

    assert code == 1
    assert "Failed to activate SuperNode" in stranger.log_text()
    assert rejected
    assert online_after_rejection == []
    assert superlink_running
    assert online_after_restart == [0]
    assert f"SuperNode ID: {node_ids[0]}" in registered.log_text()


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """Run 2 rounds with 2 sites; crash site 1 during round 1 training and restart it."""
    root = tmp_path_factory.mktemp("faults")
    layout = provision(root / "state", NUM_SITES, "compact", tls=True, data_root=data_root)
    lines: list[str] = []
    federation = LocalFederation(layout, time_limit_s=900, echo=lines.append)
    try:
        federation.start_superlink()
        node_ids = federation.register_nodes()
        for partition_id in range(NUM_SITES):
            federation.start_supernode(partition_id)
        federation.wait_nodes_online()

        # runtime.timeout_s bounds a round if the SuperLink reported the crash late.
        # No evaluate phases: they cost a message exchange each and test nothing here.
        run_config = _run_config(layout, ["strategy=fedavg", "rounds=2", "runtime.timeout_s=240", "evaluate.fraction=0"], "faults")
        run_id = federation.submit(run_config)
        crashed = federation.supernodes[CRASHED_SITE]
        assert wait_for(lambda: "Receiving: train message" in crashed.log_text(), 300), crashed.log_text()[-3000:]
        crashed.kill()
        killed_at = time.monotonic()

        # The SuperLink marks a node offline after two missed heartbeats (30 s each in Flower 1.42).
        assert wait_for(lambda: CRASHED_SITE not in federation.online_partitions(), 150, 3.0)
        offline_after_s = time.monotonic() - killed_at
        print(f"SuperLink reported site {CRASHED_SITE} offline {offline_after_s:.0f} s after the kill")
        # The SuperLink answers for an offline node only while it is offline, so the
        # site restarts after the server has recorded the missing reply.
        run_dir = layout.runs_dir / "faults"
        assert wait_for(lambda: _has_event(run_dir, "node_no_reply"), 300, 3.0)
        restarted = federation.start_supernode(CRASHED_SITE)
        outcome = federation.follow(run_id, layout.runs_dir / "faults", timeout_s=600)
    finally:
        federation.stop()
        leftovers = lingering_processes(layout.root)
        stop_pids(list(leftovers))

    return {
        "layout": layout,
        "node_ids": node_ids,
        "outcome": outcome,
        "offline_after_s": offline_after_s,
        "restarted_log": restarted.log_text(),
        "crashed_log": crashed.log_text(),
        "leftovers": leftovers,
        "lines": lines,
    }


def _has_event(run_dir: Path, event: str) -> bool:
    """Tell whether the run's audit log already contains an ``event`` entry.

    Searches the text, because the server may be writing the last line while it is read.
    """
    path = run_dir / "audit.jsonl"
    return path.exists() and f'"event":"{event}"' in path.read_text(encoding="utf-8")


def test_killed_supernode_round_completes(interrupted_run: dict[str, Any]) -> None:
    outcome = interrupted_run["outcome"]
    crashed_id = interrupted_run["node_ids"][CRASHED_SITE]

    assert outcome.status == "finished:completed", "\n".join(interrupted_run["lines"][-80:])
    assert interrupted_run["leftovers"] == {}
    entries = audit_entries(outcome.run_dir)

    dropped = [entry for entry in entries if entry["event"] == "node_no_reply"]
    assert len(dropped) == 1
    assert dropped[0]["round"] == 1
    assert dropped[0]["phase"] == "train"
    assert dropped[0]["node_id"] == crashed_id
    assert "Node Unavailable" in dropped[0]["reason"]

    round_one = [entry["partition"] for entry in entries if entry["event"] == "update_accepted" and entry["round"] == 1]
    assert sorted(round_one) == [0]
    versions = [entry["round"] for entry in entries if entry["event"] == "version"]
    assert versions == [1, 2]


def test_restarted_supernode_rejoins(interrupted_run: dict[str, Any]) -> None:
    outcome = interrupted_run["outcome"]
    crashed_id = interrupted_run["node_ids"][CRASHED_SITE]
    entries = audit_entries(outcome.run_dir)

    # Same key, so the SuperLink gives the restarted SuperNode its old node id.
    assert f"SuperNode ID: {crashed_id}" in interrupted_run["restarted_log"]
    assert "Receiving: train message" in interrupted_run["restarted_log"]

    round_two = [entry for entry in entries if entry["event"] == "round_start" and entry["round"] == 2]
    assert len(round_two) == 1
    assert crashed_id in round_two[0]["sampled"]
    accepted = [entry["partition"] for entry in entries if entry["event"] == "update_accepted" and entry["round"] == 2]
    assert sorted(accepted) == [0, 1]
    assert interrupted_run["offline_after_s"] < 120

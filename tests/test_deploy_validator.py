"""`fedseal deploy local` with the he_robust trust validator: its files, node config and SuperNode."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from typing import ClassVar

import pytest

from crypto import signing
from crypto.ckks import scoring
from deploy import pki
from deploy.launcher import LocalFederation, RunOutcome
from deploy.layout import provision
from provenance.registry import (
    DEFAULT_FILENAME,
    VALIDATOR_ORGANISATION,
    NodeRegistry,
    sqlite_url,
)

SITES = 2


def _node_config(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def test_validator_layout_and_node_config(tmp_path: Path) -> None:
    layout = provision(tmp_path / "state", SITES, "compact", tls=True, data_root=tmp_path / "data", validator=True)

    assert [node.partition_id for node in layout.supernodes()] == [0, 1, 2]
    validator = layout.validator_node()
    assert validator is not None
    assert validator.root == layout.root / "nodes" / "node-2"
    config = _node_config(validator.node_config)
    assert config["partition-id"] == SITES
    assert config["num-partitions"] == SITES + 1
    assert config["signing-key"] == str(validator.signing_key)
    assert config["ckks-secret-dir"] == str(validator.ckks_dir)
    assert config["state-dir"] == str(validator.state_dir)
    assert config["data-root"] == str((tmp_path / "data").resolve())
    assert validator.state_dir.is_dir()
    for site in layout.nodes():
        assert _node_config(site.node_config)["num-partitions"] == SITES


def test_validator_gets_its_own_keys(tmp_path: Path) -> None:
    layout = provision(tmp_path / "state", SITES, "compact", tls=True, validator=True)
    validator = layout.validator_node()

    secret_file = validator.ckks_dir / scoring.SCORING_SECRET_CONTEXT_FILENAME
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(validator.signing_key.stat().st_mode) == 0o600
    assert validator.auth_key.exists()
    assert validator.auth_public_key.exists()
    assert validator.ca_cert.exists()

    registry = NodeRegistry(sqlite_url(layout.server_keys / DEFAULT_FILENAME))
    entry = registry.get(SITES)
    sites = [registry.get(partition) for partition in range(SITES)]
    registry.close()
    assert entry is not None
    assert entry.organisation == VALIDATOR_ORGANISATION
    assert entry.public_key == signing.public_key_hex(signing.load_private_key(validator.signing_key))
    assert all(site.organisation != VALIDATOR_ORGANISATION for site in sites)
    # Each SuperNode has its own signing key.
    keys = {node.signing_key.read_bytes() for node in layout.supernodes()}
    assert len(keys) == SITES + 1


def test_no_validator_without_trust(tmp_path: Path) -> None:
    layout = provision(tmp_path / "state", SITES, "compact", tls=True)

    assert layout.validator_node() is None
    assert [node.partition_id for node in layout.supernodes()] == [0, 1]
    assert not (layout.root / "nodes" / "node-2").exists()
    assert not (pki.node_auth_dir(layout.dealer, SITES) / pki.AUTH_PRIVATE_KEY).exists()


def test_validator_added_to_existing_state(tmp_path: Path) -> None:
    first = provision(tmp_path / "state", SITES, "compact", tls=True)
    site_key = first.node(0).signing_key.read_bytes()

    again = provision(tmp_path / "state", SITES, "compact", tls=True, validator=True)

    assert again.validator_node().signing_key.exists()
    assert again.validator_node().auth_key.exists()
    assert again.node(0).signing_key.read_bytes() == site_key
    # A third call reuses the validator's keys instead of failing on them.
    validator_key = again.validator_node().signing_key.read_bytes()
    provision(tmp_path / "state", SITES, "compact", tls=True, validator=True)
    assert again.validator_node().signing_key.read_bytes() == validator_key


def test_validator_supernode_command(tmp_path: Path) -> None:
    layout = provision(tmp_path / "state", SITES, "compact", tls=True, validator=True)
    federation = LocalFederation(layout)
    federation.port = 9

    command = federation.supernode_command(SITES)

    assert command[command.index("--node-config") + 1] == str(layout.validator_node().node_config)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(layout.validator_node().auth_key)
    assert command[command.index("--superlink") + 1] == "127.0.0.1:9"


class RecordingFederation:
    """Stands in for LocalFederation: records the SuperNodes started, starts no process."""

    started: ClassVar[list[int]] = []
    run_config: ClassVar[dict[str, str]] = {}

    def __init__(self, layout, time_limit_s: float = 0.0) -> None:
        self.layout = layout

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def start_superlink(self) -> None:
        return None

    def register_nodes(self) -> dict[int, int]:
        return {}

    def start_supernode(self, partition_id: int) -> None:
        RecordingFederation.started.append(partition_id)

    def wait_nodes_online(self) -> None:
        return None

    def submit(self, run_config: dict[str, str]) -> int:
        RecordingFederation.run_config = run_config
        return 1

    def follow(self, run_id: int, run_dir: Path, timeout_s: float) -> RunOutcome:
        return RunOutcome(run_id, "finished:completed", run_dir)


@pytest.mark.parametrize(
    "overrides, started",
    [
        (["strategy=he_robust", "strategy.rule=trust"], [0, 1, 2]),
        (["strategy=he_robust", "strategy.rule=norm_bound"], [0, 1]),
    ],
)
def test_deploy_starts_validator_for_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], started: list[int]) -> None:
    from server.cli import main

    monkeypatch.setenv("FEDSEAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr("deploy.launcher.LocalFederation", RecordingFederation)
    RecordingFederation.started = []

    code = main(["deploy", "local", "--nodes", str(SITES), "--state-dir", str(tmp_path / "state"), "--insecure", "--", *overrides, "strategy.committee_size=1", "strategy.max_faulty=0"])

    assert code == 0
    assert RecordingFederation.started == started
    assert (tmp_path / "state" / "nodes" / "node-2").exists() == (SITES in started)

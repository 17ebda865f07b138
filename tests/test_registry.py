"""The node registry on SQLite and PostgreSQL, and its CLI commands.

The PostgreSQL cases need ``FEDSEAL_TEST_POSTGRES_URL`` (set by ``.ci/run``,
which starts a server on 127.0.0.1) and skip without it.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from crypto import signing
from provenance.registry import (
    ACTIVE,
    REVOKED,
    Base,
    NodeExistsError,
    NodeRegistry,
    RegistryError,
    UnknownNodeError,
    redact,
    sqlite_path,
    sqlite_url,
)
from server.cli import main as cli_main

POSTGRES_ENV = "FEDSEAL_TEST_POSTGRES_URL"
KEY_A = "a1" * 32
KEY_B = "b2" * 32


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set; .ci/run starts a PostgreSQL server and sets it")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty registry database: an SQLite file, or the test PostgreSQL database with the table dropped."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "registry.sqlite")
        return

    url = _postgres_url()
    registry = NodeRegistry(url)
    Base.metadata.drop_all(registry.engine)
    registry.close()
    yield url
    registry = NodeRegistry(url)
    Base.metadata.drop_all(registry.engine)
    registry.close()


@pytest.fixture
def registry(registry_url: str) -> Iterator[NodeRegistry]:
    opened = NodeRegistry(registry_url)
    yield opened
    opened.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_register_and_read_back(registry: NodeRegistry) -> None:
    created = registry.register(0, KEY_A, "bank")
    registry.register(2, KEY_B, "hospital")

    fetched = registry.get(0)
    assert fetched == created
    assert fetched.public_key == KEY_A
    assert fetched.organisation == "bank"
    assert fetched.status == ACTIVE
    assert (fetched.accepted, fetched.rejected) == (0, 0)
    assert fetched.created_at.tzinfo is not None
    assert fetched.created_at.utcoffset() == timezone.utc.utcoffset(None)
    assert [node.node_id for node in registry.list_nodes()] == [0, 2]
    assert registry.get(1) is None


def test_data_survives_reopening(registry_url: str) -> None:
    first = NodeRegistry(registry_url)
    first.register(5, KEY_A, "retailer")
    first.close()

    second = NodeRegistry(registry_url)
    assert second.get(5).organisation == "retailer"
    second.close()


def test_same_key_updates_label(registry: NodeRegistry) -> None:
    registry.register(0, KEY_A, "bank")

    updated = registry.register(0, KEY_A, "bank-eu")

    assert updated.organisation == "bank-eu"
    assert updated.updated_at >= updated.created_at


def test_other_key_needs_replace(registry: NodeRegistry) -> None:
    registry.register(0, KEY_A, "bank")
    registry.revoke(0)

    with pytest.raises(NodeExistsError, match="Node 0 is already registered with another key"):
        registry.register(0, KEY_B, "bank")
    rotated = registry.register(0, KEY_B, "bank", replace=True)

    assert rotated.public_key == KEY_B
    assert rotated.status == REVOKED


def test_register_rejects_bad_values(registry: NodeRegistry) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex characters"):
        registry.register(0, "xyz", "bank")
    with pytest.raises(ValueError, match="64 lowercase hex characters"):
        registry.register(0, KEY_A.upper(), "bank")
    with pytest.raises(ValueError, match="node_id must be >= 0"):
        registry.register(-1, KEY_A, "bank")
    assert registry.list_nodes() == []


def test_status_changes(registry: NodeRegistry) -> None:
    registry.register(1, KEY_A, "factory")

    assert registry.set_status(1, "quarantined").status == "quarantined"
    assert registry.revoke(1).status == REVOKED
    assert registry.get(1).status == REVOKED
    with pytest.raises(ValueError, match="Unknown node status 'deleted'"):
        registry.set_status(1, "deleted")
    with pytest.raises(UnknownNodeError, match="Node 9 is not registered"):
        registry.revoke(9)


def test_contribution_counts(registry: NodeRegistry) -> None:
    registry.register(0, KEY_A, "bank")
    registry.register(1, KEY_B, "hospital")

    registry.record_contributions(accepted=[0, 0, 1], rejected=[1, 42])
    registry.record_contributions(accepted=[0])

    assert (registry.get(0).accepted, registry.get(0).rejected) == (3, 0)
    assert (registry.get(1).accepted, registry.get(1).rejected) == (1, 1)
    assert registry.get(42) is None


def test_invalid_url_names_fix() -> None:
    with pytest.raises(RegistryError, match="Invalid registry URL 'not a url'.*sqlite:////path/registry.sqlite"):
        NodeRegistry("not a url")
    with pytest.raises(RegistryError, match="No database driver for registry URL nosuchdb://"):
        NodeRegistry("nosuchdb://host/db")


def test_unreachable_database_hides_password() -> None:
    url = f"postgresql+psycopg://fedseal:s3cret-pw@127.0.0.1:{_free_port()}/fedseal"

    with pytest.raises(RegistryError) as error:
        NodeRegistry(url)

    message = str(error.value)
    assert "s3cret-pw" not in message
    assert "postgresql+psycopg://fedseal:***@127.0.0.1:" in message
    assert "Check that the database server is running" in message


def test_redact_unparsable_url() -> None:
    assert redact("postgresql+psycopg://user:pw@host/db") == "postgresql+psycopg://user:***@host/db"
    assert "pw" not in redact("bad url //user:pw@host")


def test_postgres_wrong_password_hides_it() -> None:
    wrong = make_url(_postgres_url()).set(password="wrong-pw-123").render_as_string(hide_password=False)

    with pytest.raises(RegistryError) as error:
        NodeRegistry(wrong)

    assert "wrong-pw-123" not in str(error.value)
    assert "password authentication failed" in str(error.value)


def test_cli_keys_init_registers_nodes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"

    code = cli_main(["keys", "init", "--out", str(out), "--nodes", "3", "--org", "bank", "--org", "factory", "--org", "hospital"])

    assert code == 0
    assert (out / "server").is_dir()
    assert (out / "node").is_dir()
    registry = NodeRegistry(sqlite_url(out / "registry.sqlite"))
    nodes = registry.list_nodes()
    registry.close()
    assert [(node.node_id, node.organisation) for node in nodes] == [(0, "bank"), (1, "factory"), (2, "hospital")]
    for node in nodes:
        key_file = out / "signing" / f"node-{node.node_id}" / "signing.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
        assert signing.public_key_hex(signing.load_private_key(key_file)) == node.public_key
    assert "hospital" in capsys.readouterr().out


def test_cli_keys_init_label_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"
    code = cli_main(["keys", "init", "--out", str(out), "--nodes", "3", "--org", "a", "--org", "b"])

    # Checked before any key is written, so a corrected rerun needs no --overwrite.
    assert code == 2
    assert "--org was given 2 times for 3 nodes" in capsys.readouterr().err
    assert not out.exists()


def test_cli_list_and_revoke(registry_url: str, capsys: pytest.CaptureFixture) -> None:
    registry = NodeRegistry(registry_url)
    registry.register(0, KEY_A, "bank")
    registry.register(1, KEY_B, "factory")
    registry.close()

    revoked = cli_main(["nodes", "revoke", "1", "--db", registry_url])
    listed = cli_main(["nodes", "list", "--db", registry_url])

    assert (revoked, listed) == (0, 0)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:3] for row in rows] == [["0", "active", "bank"], ["1", "revoked", "factory"]]
    assert rows[1][-1] == KEY_B


def test_cli_revoke_unknown_exits_1(registry_url: str, capsys: pytest.CaptureFixture) -> None:
    NodeRegistry(registry_url).close()

    code = cli_main(["nodes", "revoke", "7", "--db", registry_url])

    assert code == 1
    assert "Node 7 is not registered" in capsys.readouterr().err


def test_cli_bad_database_exits_2(capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["nodes", "list", "--db", f"postgresql+psycopg://u:hidden@127.0.0.1:{_free_port()}/x"])

    err = capsys.readouterr().err
    assert code == 2
    assert "Cannot open the node registry" in err
    assert "hidden" not in err


def test_cli_keys_init_adds_nodes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"
    assert cli_main(["keys", "init", "--out", str(out), "--nodes", "2"]) == 0
    first_key = (out / "signing" / "node-0" / "signing.key").read_bytes()
    fingerprint = (out / "fingerprint.txt").read_text()
    capsys.readouterr()

    code = cli_main(["keys", "init", "--out", str(out), "--nodes", "4"])

    output = capsys.readouterr().out
    assert code == 0
    assert "CKKS keys kept" in output
    assert "Ed25519 signing keys for 2 nodes" in output
    assert (out / "signing" / "node-0" / "signing.key").read_bytes() == first_key
    assert (out / "fingerprint.txt").read_text() == fingerprint
    registry = NodeRegistry(sqlite_url(out / "registry.sqlite"))
    nodes = registry.list_nodes()
    registry.close()
    assert [node.node_id for node in nodes] == [0, 1, 2, 3]
    for node in nodes:
        key = signing.load_private_key(out / "signing" / f"node-{node.node_id}" / "signing.key")
        assert signing.public_key_hex(key) == node.public_key


def test_cli_keys_init_nothing_to_add(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"
    assert cli_main(["keys", "init", "--out", str(out), "--nodes", "2"]) == 0
    capsys.readouterr()

    code = cli_main(["keys", "init", "--out", str(out), "--nodes", "2"])

    assert code == 1
    assert f"error: Every node already has a signing key in {out / 'signing'}; pass --overwrite to replace them." in capsys.readouterr().err


def test_cli_missing_sqlite_not_created(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "typo" / "registry.sqlite"

    code = cli_main(["nodes", "list", "--db", sqlite_url(missing)])

    assert code == 2
    assert f"error: node registry {missing} not found" in capsys.readouterr().err
    assert not missing.parent.exists()


def test_cli_list_accepts_key_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"
    assert cli_main(["keys", "init", "--out", str(out), "--nodes", "2"]) == 0
    capsys.readouterr()

    code = cli_main(["nodes", "list", "--db", str(out)])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "created (UTC)" in lines[0]
    assert [line.split()[:3] for line in lines[1:]] == [["0", "active", "site-0"], ["1", "active", "site-1"]]


def test_cli_set_status_reinstates(registry_url: str, capsys: pytest.CaptureFixture) -> None:
    registry = NodeRegistry(registry_url)
    registry.register(0, KEY_A, "bank")
    registry.close()
    assert cli_main(["nodes", "revoke", "0", "--db", registry_url]) == 0

    quarantined = cli_main(["nodes", "set-status", "0", "quarantined", "--db", registry_url])
    reinstated = cli_main(["nodes", "set-status", "0", "active", "--db", registry_url])
    unknown = cli_main(["nodes", "set-status", "5", "active", "--db", registry_url])

    captured = capsys.readouterr()
    assert (quarantined, reinstated, unknown) == (0, 0, 1)
    assert "Node 0 (bank) is quarantined; the server rejects its updates from the next round on." in captured.out
    assert "Node 0 (bank) is active; the server accepts its signed updates from the next round on." in captured.out
    assert "Node 5 is not registered" in captured.err
    registry = NodeRegistry(registry_url)
    assert registry.get(0).status == "active"
    registry.close()


def test_repeated_revoke_keeps_updated_time(registry_url: str) -> None:
    registry = NodeRegistry(registry_url)
    registry.register(0, KEY_A, "bank")
    first = registry.revoke(0)

    again = registry.revoke(0)

    assert again.status == "revoked"
    assert again.updated_at == first.updated_at
    registry.close()


def test_sqlite_path_of_urls(tmp_path: Path) -> None:
    assert sqlite_path(sqlite_url(tmp_path / "registry.sqlite")) == tmp_path / "registry.sqlite"
    assert sqlite_path("sqlite:///relative/registry.sqlite") == Path("relative/registry.sqlite")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("postgresql+psycopg://user@127.0.0.1/db") is None

"""TLS material, SuperNode keys, the deploy layout and `fedseal keys init --tls`."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from crypto.ckks import SECRET_CONTEXT_FILENAME
from deploy import pki
from deploy.layout import provision
from server.cli import main as fedseal


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return ips, names.get_values_for_type(x509.DNSName)


def test_server_certificate_chain_and_sans(tmp_path: Path) -> None:
    files = pki.init_tls(tmp_path, ["127.0.0.1", "localhost", "10.0.0.7", "superlink.example.org"])

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    ips, dns = _sans(server)
    assert ips == ["127.0.0.1", "10.0.0.7"]
    assert dns == ["localhost", "superlink.example.org"]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_private_keys_are_0600(tmp_path: Path) -> None:
    files = pki.init_tls(tmp_path)
    pairs = pki.init_node_auth_keys(tmp_path, 2)

    assert _mode(files.server_key) == 0o600
    assert _mode(files.ca_key) == 0o600
    for private, public in pairs:
        assert _mode(private) == 0o600
        assert _mode(private.parent) == 0o700
        assert _mode(public) & 0o044 == 0o044


def test_auth_keys_are_openssh_p384(tmp_path: Path) -> None:
    private_path, public_path = pki.init_node_auth_keys(tmp_path, 1)[0]

    private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private.curve, ec.SECP384R1)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    # The check `flwr supernode register` applies to the key (Flower 1.42).
    assert uses_nist_ec_curve(public)


def test_supplied_ca_signs_server_certificate(tmp_path: Path) -> None:
    first = pki.init_tls(tmp_path / "first")
    second = pki.init_tls(tmp_path / "second", ca_cert=first.ca_cert, ca_key=first.ca_key)

    server = x509.load_pem_x509_certificate(second.server_cert.read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(first.ca_cert.read_bytes()))
    assert second.ca_key is None
    assert not (tmp_path / "second" / pki.TLS_DIR / pki.CA_KEY).exists()
    assert second.ca_cert.read_bytes() == first.ca_cert.read_bytes()


@pytest.mark.parametrize("host", ["", "bad host", "https://x.org", "a/b", "-lead.example.org"])
def test_invalid_host_rejected(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="Invalid host"):
        pki.init_tls(tmp_path, ["127.0.0.1", host])


def test_ipv6_host_accepted(tmp_path: Path) -> None:
    files = pki.init_tls(tmp_path, ["::1"])
    ips, _ = _sans(x509.load_pem_x509_certificate(files.server_cert.read_bytes()))
    assert [ipaddress.ip_address(ip) for ip in ips] == [ipaddress.ip_address("::1")]


def test_mismatched_ca_key_rejected(tmp_path: Path) -> None:
    first = pki.init_tls(tmp_path / "first")
    other = pki.init_tls(tmp_path / "other")
    with pytest.raises(ValueError, match="does not belong"):
        pki.init_tls(tmp_path / "third", ca_cert=first.ca_cert, ca_key=other.ca_key)


def test_non_ca_certificate_rejected(tmp_path: Path) -> None:
    files = pki.init_tls(tmp_path / "first")
    with pytest.raises(ValueError, match="not a CA"):
        pki.init_tls(tmp_path / "second", ca_cert=files.server_cert, ca_key=files.server_key)


def test_existing_keys_need_overwrite(tmp_path: Path) -> None:
    pki.init_tls(tmp_path)
    pki.init_node_auth_keys(tmp_path, 2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pki.init_tls(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pki.init_node_auth_keys(tmp_path, 2)

    before = (tmp_path / "auth/node-0/auth.pub").read_bytes()
    pki.init_node_auth_keys(tmp_path, 2, overwrite=True)
    assert (tmp_path / "auth/node-0/auth.pub").read_bytes() != before


def test_layout_keeps_secrets_off_server(tmp_path: Path) -> None:
    layout = provision(tmp_path / "state", 2, "compact", tls=True, data_root=tmp_path / "data")

    server_side = [*layout.server_keys.rglob("*"), *layout.superlink_dir.rglob("*")]
    names = {path.name for path in server_side}
    assert SECRET_CONTEXT_FILENAME not in names
    assert "signing.key" not in names
    assert pki.AUTH_PRIVATE_KEY not in names
    assert pki.CA_KEY not in names
    assert (layout.server_keys / "server").is_dir()
    assert (layout.superlink_tls / pki.SERVER_KEY).exists()

    for node in layout.nodes():
        assert (node.ckks_dir / SECRET_CONTEXT_FILENAME).exists()
        assert _mode(node.ckks_dir / SECRET_CONTEXT_FILENAME) == 0o600
        assert _mode(node.signing_key) == 0o600
        assert _mode(node.auth_key) == 0o600
        config = node.node_config.read_text()
        assert f"partition-id = {node.partition_id}" in config
        assert "num-partitions = 2" in config
        assert f'state-dir = "{node.state_dir}"' in config
        assert f'data-root = "{(tmp_path / "data").resolve()}"' in config
    # Each site gets its own signing key.
    assert layout.node(0).signing_key.read_bytes() != layout.node(1).signing_key.read_bytes()


def test_layout_reuse_checks_node_count(tmp_path: Path) -> None:
    first = provision(tmp_path / "state", 2, "compact", tls=True)
    fingerprint = (first.server_keys / "fingerprint.txt").read_text()

    again = provision(tmp_path / "state", 2, "compact", tls=True)
    assert (again.server_keys / "fingerprint.txt").read_text() == fingerprint
    with pytest.raises(ValueError, match="contains keys for 2 nodes, not 3"):
        provision(tmp_path / "state", 3, "compact", tls=True)
    with pytest.raises(ValueError, match="preset compact, not tenseal_default"):
        provision(tmp_path / "state", 2, "tenseal_default", tls=True)


def test_layout_rejects_whitespace_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        provision(tmp_path / "my state", 1, "compact", tls=True)


def test_keys_init_tls_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    code = fedseal(["keys", "init", "--out", str(out), "--nodes", "2", "--tls", "--san", "superlink.example.org"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "superlink.example.org" in printed
    _, dns = _sans(x509.load_pem_x509_certificate((out / "tls/server.pem").read_bytes()))
    assert dns == ["localhost", "superlink.example.org"]
    assert (out / "auth/node-1/auth.pub").exists()
    assert (out / "signing/node-1/signing.key").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--ca-cert", "ca.crt"], "--ca-cert and --ca-key together"),
        (["--san", "x.example.org"], "--san only applies with --tls"),
        (["--ca-cert", "missing.crt", "--ca-key", "missing.key"], "missing.crt not found"),
    ],
)
def test_keys_init_tls_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str) -> None:
    out = tmp_path / "keys"
    code = fedseal(["keys", "init", "--out", str(out), *arguments])

    assert code == 2
    assert message in capsys.readouterr().err
    # Rejected before anything is written.
    assert not out.exists()

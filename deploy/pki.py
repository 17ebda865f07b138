"""TLS certificates for the SuperLink and authentication keys for SuperNodes.

Files written by ``init_tls`` under ``out_dir/tls/``:

``ca.crt``, ``ca.key``
    The federation's certificate authority. Every party gets ``ca.crt``; keep
    ``ca.key`` (mode 0600) offline, with the operator who issues certificates.
``server.pem``, ``server.key``
    The SuperLink's certificate, signed by the CA, with a subjectAltName for
    each host the SuperNodes and the ``flwr`` CLI dial (127.0.0.1 and localhost
    by default), and its private key (mode 0600).

``init_node_auth_keys`` writes ``out_dir/auth/node-<id>/auth.key`` (mode 0600)
and ``auth.pub``: the SuperNode's EC key on NIST P-384, in OpenSSH format, as
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
register`` read them (Flower 1.42).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

TLS_DIR = "tls"
AUTH_DIR = "auth"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
AUTH_PRIVATE_KEY = "auth.key"
AUTH_PUBLIC_KEY = "auth.pub"

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the federation's TLS material.

    Parameters
    ----------
    ca_cert : Path
        The CA certificate that SuperNodes and the ``flwr`` CLI trust.
    ca_key : Path or None
        The CA's private key; None when the CA was supplied without writing its key here.
    server_cert : Path
        The SuperLink certificate (PEM).
    server_key : Path
        The SuperLink private key (PEM, mode 0600).
    """

    ca_cert: Path
    ca_key: Path | None
    server_cert: Path
    server_key: Path


def write_private(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte on.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    descriptor = os.open(path, flags, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    # O_CREAT applies the mode only to a new file; an overwritten one keeps its old mode.
    os.chmod(path, 0o600)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseal"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """Return a SAN extension with an IP entry for each address and a DNS entry for each name."""
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    """Return ``hosts`` without duplicates, in order; reject empty or malformed names."""
    unique: list[str] = []
    for host in hosts:
        if not _is_valid_host(host):
            raise ValueError(f"Invalid host {host!r} for the server certificate; pass an IP address or a DNS name, e.g. --san superlink.example.org.")
        if host not in unique:
            unique.append(host)
    return unique


def _is_valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return bool(host) and all(re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels)


def generate_ca(common_name: str = "fedseal federation CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed CA certificate and its P-384 key."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return certificate, key


def issue_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    valid_days: int = SERVER_VALID_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create the SuperLink's certificate, signed by the CA, valid for ``hosts``.

    Parameters
    ----------
    ca_cert : cryptography.x509.Certificate
        The issuing CA certificate.
    ca_key : EllipticCurvePrivateKey
        The CA's private key.
    hosts : sequence of str
        IP addresses and DNS names the SuperLink is reached by; the first is the common name.
    valid_days : int
        Validity from now, in days.

    Raises
    ------
    ValueError
        If ``hosts`` is empty or contains a malformed entry, or the CA key does not match the certificate.
    """
    hosts = _check_hosts(hosts)
    if not hosts:
        raise ValueError("The server certificate needs at least one host; pass --san HOST.")
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise ValueError("The CA key does not belong to the CA certificate; pass the matching --ca-cert and --ca-key.")

    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return certificate, key


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read an existing CA certificate and its EC private key (PEM, unencrypted).

    Raises
    ------
    FileNotFoundError
        If either file is missing.
    ValueError
        If a file is not PEM of the expected kind, or the certificate is not a CA.
    TypeError
        If the key is not an elliptic-curve key.
    """
    for path in (cert_path, key_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found; pass the CA certificate with --ca-cert and its key with --ca-key.")
    certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{key_path} is a {type(key).__name__}; the CA key must be an elliptic-curve key (e.g. P-384).")
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE is missing).")
    return certificate, key


def init_tls(
    out_dir: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    ca_cert: Path | None = None,
    ca_key: Path | None = None,
    overwrite: bool = False,
) -> TlsFiles:
    """Write the CA (new, or the one given) and a fresh SuperLink certificate under ``out_dir/tls``.

    Parameters
    ----------
    out_dir : Path
        Key folder; the files go to ``out_dir/tls/``.
    hosts : sequence of str
        Hosts for the server certificate's subjectAltName.
    ca_cert, ca_key : Path, optional
        An existing CA to sign with, given together. Its certificate is copied
        to ``tls/ca.crt``; its key is read but not copied.
    overwrite : bool
        Replace existing files.

    Raises
    ------
    ValueError
        If only one of ``ca_cert`` and ``ca_key`` is given, or a host is malformed.
    FileExistsError
        If the files exist and ``overwrite`` is False.
    """
    if (ca_cert is None) != (ca_key is None):
        raise ValueError("Pass --ca-cert and --ca-key together, or neither to create a new CA.")
    folder = Path(out_dir) / TLS_DIR
    if (folder / SERVER_KEY).exists() and not overwrite:
        raise FileExistsError(f"{folder / SERVER_KEY} exists; pass --overwrite to issue a new server certificate.")

    if ca_cert is not None and ca_key is not None:
        certificate, key = load_ca(Path(ca_cert), Path(ca_key))
        written_ca_key = None
    else:
        certificate, key = generate_ca()
        written_ca_key = folder / CA_KEY
        write_private(written_ca_key, _private_pem(key), overwrite=True)
    server_cert, server_key = issue_server_certificate(certificate, key, hosts)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CA_CERT).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(folder / SERVER_KEY, _private_pem(server_key), overwrite=True)
    logger.info("TLS material written to %s (server certificate for %s)", folder, ", ".join(_check_hosts(hosts)))
    return TlsFiles(folder / CA_CERT, written_ca_key, folder / SERVER_CERT, folder / SERVER_KEY)


def node_auth_dir(out_dir: Path, node_id: int) -> Path:
    """Return the folder of node ``node_id``'s SuperNode authentication key pair."""
    return Path(out_dir) / AUTH_DIR / f"node-{node_id}"


def write_auth_key_pair(folder: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new P-384 key pair in OpenSSH format to ``folder``; return (private, public) paths.

    Raises
    ------
    FileExistsError
        If the private key exists and ``overwrite`` is False.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    write_private(folder / AUTH_PRIVATE_KEY, private, overwrite=overwrite)
    (folder / AUTH_PUBLIC_KEY).write_bytes(public + b"\n")
    return folder / AUTH_PRIVATE_KEY, folder / AUTH_PUBLIC_KEY


def init_node_auth_keys(out_dir: Path, num_nodes: int, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """Write a SuperNode authentication key pair for nodes ``0 .. num_nodes - 1``.

    Parameters
    ----------
    out_dir : Path
        Key folder; node ``i`` gets ``auth/node-<i>/``.
    num_nodes : int
        Number of SuperNodes (>= 1).
    overwrite : bool
        Replace existing key pairs (the new public keys must then be registered again).

    Raises
    ------
    ValueError
        If ``num_nodes`` < 1.
    FileExistsError
        If a node's key exists and ``overwrite`` is False; nothing is written then.
    """
    if num_nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {num_nodes}.")
    folders = [node_auth_dir(out_dir, node_id) for node_id in range(num_nodes)]
    existing = [folder / AUTH_PRIVATE_KEY for folder in folders if (folder / AUTH_PRIVATE_KEY).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the SuperNode authentication keys.")

    pairs = [write_auth_key_pair(folder, overwrite=overwrite) for folder in folders]
    logger.info("SuperNode authentication keys (P-384) for %d nodes written to %s", num_nodes, Path(out_dir) / AUTH_DIR)
    return pairs

"""Ed25519 signatures over model updates: keys, the update digest, sign and verify.

A node signs the digest of one training reply. The digest binds the run id,
the server round, the node id, the hash of the global model version the node
trained from, and the SHA-256 of the update payload. So a signed reply cannot
be replayed in another round or run, nor be altered after signing.

The digest is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8)
of those five fields plus a format tag::

    {"base":"<hex>","format":"fedseal-update-v1","node":3,"payload":"<hex>","round":2,"run":"<run id>"}

Any language with a JSON encoder and SHA-256 can recompute it.

Key files: the private key is PKCS8 PEM (unencrypted, file mode 0600 in a
0700 folder) and the public key SubjectPublicKeyInfo PEM. Registries and the
audit log store public keys as the raw 32 bytes in hex.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

DIGEST_FORMAT = "fedseal-update-v1"
# Key layout: <keys dir>/signing/node-<node id>/signing.key and signing.pub.
SIGNING_DIR = "signing"
PRIVATE_KEY_FILENAME = "signing.key"
PUBLIC_KEY_FILENAME = "signing.pub"
SIGNATURE_SIZE = 64

# Reply record that carries a node's signature, and its keys. ``digest`` is
# what the node signed. The remaining keys repeat the signed fields so the
# server can name the field that differs when a digest does not match.
SIGNATURE_RECORD = "signature"
SIGNATURE_KEY = "signature"
DIGEST_KEY = "digest"
RUN_ID_KEY = "run-id"
ROUND_KEY = "server-round"
BASE_HASH_KEY = "base-hash"
PAYLOAD_HASH_KEY = "payload-hash"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class KeyFileError(ValueError):
    """A key file or key string cannot be read as an Ed25519 key."""


def generate_private_key() -> Ed25519PrivateKey:
    """Return a new Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Return the raw 32-byte public key of ``key`` as lowercase hex."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def node_key_dir(root: Path, node_id: int) -> Path:
    """Return the folder of node ``node_id``'s key pair under a ``signing/`` root."""
    return Path(root) / f"node-{int(node_id)}"


def save_key_pair(key: Ed25519PrivateKey, folder: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into ``folder`` (mode 0700).

    Returns
    -------
    tuple of Path
        The private and the public key file.

    Raises
    ------
    FileExistsError
        If ``signing.key`` exists and ``overwrite`` is False.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    private_path = folder / PRIVATE_KEY_FILENAME
    public_path = folder / PUBLIC_KEY_FILENAME
    if private_path.exists() and not overwrite:
        raise FileExistsError(f"{private_path} exists; pass --overwrite to replace the node's signing key.")

    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    # Create the file with mode 0600 so the key is never readable by others,
    # not even between open and chmod.
    private_path.unlink(missing_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS8 PEM Ed25519 private key.

    Logs a warning when group or others may read the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    KeyFileError
        If the file is not an unencrypted Ed25519 private key in PEM.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Signing key {path} not found; create node keys with `fedseal keys init --out DIR --nodes N`.")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("Signing key %s is accessible to group or others; run `chmod 600 %s`", path, path)

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({error}); use a signing.key from `fedseal keys init`.") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} contains a {type(key).__name__}, but update signatures use Ed25519; use a signing.key from `fedseal keys init`.")
    return key


def load_public_key(value: str | bytes) -> Ed25519PublicKey:
    """Parse an Ed25519 public key given as 64 hex characters (raw key) or as PEM.

    Raises
    ------
    KeyFileError
        If ``value`` is neither.
    """
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))

    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as error:
        raise KeyFileError(f"Public key {text[:20]!r}... is neither 64 hex characters nor PEM; pass the raw key in hex or a signing.pub file.") from error
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"The PEM public key is a {type(key).__name__}, but update signatures use Ed25519.")
    return key


def update_digest(run_id: str, server_round: int, node_id: int, base_version_hash: str, payload_sha256: str) -> bytes:
    """Return the 32-byte SHA-256 digest that a node signs for one update.

    Parameters
    ----------
    run_id : str
        The server's id of this training run.
    server_round : int
        The round the update belongs to (>= 0).
    node_id : int
        The node's partition id.
    base_version_hash : str
        SHA-256 hex of the global model version the node trained from.
    payload_sha256 : str
        SHA-256 hex of the update payload (arrays or ciphertexts).

    Raises
    ------
    ValueError
        If a field has the wrong type or a hash is not 64 lowercase hex characters.
    """
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}.")
    for name, number in (("server_round", server_round), ("node_id", node_id)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {number!r}.")
    for name, value in (("base_version_hash", base_version_hash), ("payload_sha256", payload_sha256)):
        if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
            raise ValueError(f"{name} must be a SHA-256 in 64 lowercase hex characters, got {value!r}.")

    fields = {
        "format": DIGEST_FORMAT,
        "run": run_id,
        "round": server_round,
        "node": node_id,
        "base": base_version_hash,
        "payload": payload_sha256,
    }
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).digest()


def sign_digest(key: Ed25519PrivateKey, digest: bytes) -> bytes:
    """Return the 64-byte Ed25519 signature of ``digest``."""
    return key.sign(digest)


def verify_digest(public_key: Ed25519PublicKey, digest: bytes, signature: bytes) -> bool:
    """Return whether ``signature`` is ``public_key``'s valid signature of ``digest``."""
    try:
        public_key.verify(signature, digest)
    except InvalidSignature:
        return False
    return True

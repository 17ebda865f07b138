"""Key provisioning for a federation: the CKKS contexts and the nodes' signing keys.

Layout written by ``init_ckks_keys(out_dir)`` (and ``fedseal keys init``):

``out_dir/server/``
    The public context only. This is all the server ever loads.
``out_dir/node/``
    The secret context (file mode 0600), to be installed on every node.
``out_dir/fingerprint.txt``
    SHA-256 of the serialized public context.

``init_scoring_keys(out_dir)`` (``fedseal keys init --scoring``) writes the
scoring key pair of ``strategy=he_robust`` into the same two folders:
``server/ckks_scoring_public_context.bin`` (parameters, relinearization and
Galois keys, no secret key), ``node/ckks_scoring_secret_context.bin`` (mode
0600) and ``out_dir/scoring_fingerprint.txt``.

``init_signing_keys(out_dir, num_nodes, ...)`` (``fedseal keys init --nodes N``) adds:

``out_dir/signing/node-<id>/``
    Node ``id``'s Ed25519 key pair: ``signing.key`` (mode 0600, install on
    that site only) and ``signing.pub``.
``out_dir/registry.sqlite``
    The default node registry with every public key, unless another
    database URL is given.

With ``validator=True`` (``fedseal keys init --nodes N --validator``) the
validator of ``strategy=he_robust strategy.rule=trust`` gets the same files
under node id ``N``, the partition id after the training nodes, and the
organisation label ``validator``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from crypto import ckks, signing
from provenance.registry import (
    DEFAULT_FILENAME,
    VALIDATOR_ORGANISATION,
    NodeInfo,
    NodeRegistry,
    sqlite_url,
)

logger = logging.getLogger(__name__)

SERVER_DIR = "server"
NODE_DIR = "node"


def init_ckks_keys(out_dir: Path, preset: str = ckks.DEFAULT_PRESET, overwrite: bool = False) -> str:
    """Create a federation's CKKS material under ``out_dir``; return the fingerprint.

    Raises
    ------
    FileExistsError
        If keys exist there and ``overwrite`` is False, because replacing a
        key makes every stored encrypted model unreadable.
    """
    out_dir = Path(out_dir)
    secret_file = out_dir / NODE_DIR / ckks.SECRET_CONTEXT_FILENAME
    if secret_file.exists() and not overwrite:
        raise FileExistsError(f"{secret_file} exists; pass --overwrite to replace the key (old encrypted models become unreadable).")

    secret = ckks.generate_context(preset)
    ckks.write_secret_context(secret, out_dir / NODE_DIR)
    ckks.write_public_context(secret, out_dir / SERVER_DIR)
    (out_dir / "fingerprint.txt").write_text(secret.fingerprint + "\n", encoding="utf-8")
    logger.info("CKKS keys (%s) written to %s, fingerprint %s", preset, out_dir, secret.fingerprint)
    return secret.fingerprint


SCORING_FINGERPRINT_FILE = "scoring_fingerprint.txt"


def init_scoring_keys(out_dir: Path, preset: str | None = None, overwrite: bool = False) -> str:
    """Create a federation's scoring key pair under ``out_dir``; return its fingerprint.

    Raises
    ------
    FileExistsError
        If a scoring key exists there and ``overwrite`` is False, because
        replacing it makes every stored encrypted model unreadable.
    ValueError
        If ``preset`` is not a registered scoring preset.
    """
    from crypto.ckks import scoring

    out_dir = Path(out_dir)
    secret_file = out_dir / NODE_DIR / scoring.SCORING_SECRET_CONTEXT_FILENAME
    if secret_file.exists() and not overwrite:
        raise FileExistsError(f"{secret_file} exists; pass --overwrite to replace the scoring key (old encrypted models become unreadable).")

    secret = scoring.generate_scoring_context(preset or scoring.DEFAULT_SCORING_PRESET)
    (out_dir / NODE_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / SERVER_DIR).mkdir(parents=True, exist_ok=True)
    scoring.write_scoring_secret_context(secret, out_dir / NODE_DIR)
    scoring.write_scoring_public_context(secret, out_dir / SERVER_DIR)
    (out_dir / SCORING_FINGERPRINT_FILE).write_text(secret.fingerprint + "\n", encoding="utf-8")
    logger.info("Scoring keys (%s) written to %s, fingerprint %s", secret.preset.name, out_dir, secret.fingerprint)
    return secret.fingerprint


def load_server_scoring_context(keys_dir: Path):
    """Load the public scoring context from ``keys_dir/server`` (never the node folder)."""
    from crypto.ckks import scoring

    return scoring.read_scoring_public_context(Path(keys_dir) / SERVER_DIR)


def load_server_context(keys_dir: Path) -> ckks.PublicContext:
    """Load the public context from ``keys_dir/server`` (never the node folder)."""
    return ckks.read_public_context(Path(keys_dir) / SERVER_DIR)


def init_signing_keys(
    out_dir: Path,
    num_nodes: int,
    registry_url: str | None = None,
    organisations: list[str] | None = None,
    overwrite: bool = False,
    validator: bool = False,
    add_missing: bool = False,
) -> list[NodeInfo]:
    """Create an Ed25519 key pair per node under ``out_dir/signing`` and register the public keys.

    Parameters
    ----------
    out_dir : Path
        Key folder; node ``i`` gets ``signing/node-<i>/``.
    num_nodes : int
        Number of nodes; their ids are the partition ids ``0 .. num_nodes - 1``.
    registry_url : str, optional
        SQLAlchemy URL of the node registry; default ``out_dir/registry.sqlite``.
    organisations : list of str, optional
        One label for all nodes, or one per node; default ``site-<i>``.
    overwrite : bool
        Replace existing key files and rotate the registered keys.
    validator : bool
        Also create the validator's key as node ``num_nodes``, labelled
        ``validator`` (``strategy=he_robust strategy.rule=trust``).
    add_missing : bool
        Keep the nodes' existing keys and create only the missing ones, to
        add nodes to a federation. Ignored with ``overwrite``.

    Returns
    -------
    list of NodeInfo
        The registry entries of the keys created.

    Raises
    ------
    ValueError
        If ``num_nodes`` < 1 or the number of labels is neither 1 nor ``num_nodes``.
    FileExistsError
        If a node's key exists and neither ``overwrite`` nor ``add_missing``
        is set, or if with ``add_missing`` every node already has a key.
    provenance.registry.RegistryError
        If the registry cannot be opened, or contains another key for a node
        and ``overwrite`` is False.
    """
    if num_nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {num_nodes}.")
    labels = list(organisations or [])
    if len(labels) not in (0, 1, num_nodes):
        raise ValueError(f"Got {len(labels)} --org labels for {num_nodes} nodes; give one label for all nodes or one per node.")

    out_dir = Path(out_dir)
    node_ids = range(num_nodes + 1 if validator else num_nodes)
    folders = [signing.node_key_dir(out_dir / signing.SIGNING_DIR, node_id) for node_id in node_ids]
    existing = [folder / signing.PRIVATE_KEY_FILENAME for folder in folders if (folder / signing.PRIVATE_KEY_FILENAME).exists()]
    # Checked before writing anything, so a rejected call leaves no half-made key set.
    if existing and not overwrite and not add_missing:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the nodes' signing keys.")
    if add_missing and not overwrite:
        node_ids = [node_id for node_id, folder in zip(node_ids, folders) if not (folder / signing.PRIVATE_KEY_FILENAME).exists()]
        if not node_ids:
            raise FileExistsError(f"Every node already has a signing key in {out_dir / signing.SIGNING_DIR}; pass --overwrite to replace them.")

    registry = NodeRegistry(registry_url or sqlite_url(out_dir / DEFAULT_FILENAME))
    try:
        nodes = []
        for node_id in node_ids:
            if node_id == num_nodes:
                label = VALIDATOR_ORGANISATION
            elif len(labels) == num_nodes:
                label = labels[node_id]
            elif labels:
                label = labels[0]
            else:
                label = f"site-{node_id}"
            nodes.append(_create_and_register(registry, folders[node_id], node_id, label, overwrite))
    finally:
        registry.close()
    logger.info("Signing keys for %d nodes%s written to %s", num_nodes, " and the validator" if validator else "", out_dir / signing.SIGNING_DIR)
    return nodes


def _create_and_register(registry: NodeRegistry, folder: Path, node_id: int, label: str, overwrite: bool) -> NodeInfo:
    key = signing.generate_private_key()
    signing.save_key_pair(key, folder, overwrite=overwrite)
    return registry.register(node_id, signing.public_key_hex(key), label, replace=overwrite)


def init_validator_signing_key(out_dir: Path, validator_id: int, registry_url: str | None = None) -> NodeInfo:
    """Add the he_robust trust validator's Ed25519 key pair to an existing key folder and register it.

    For a folder made without it; ``init_signing_keys(..., validator=True)``
    makes it together with the nodes' keys.

    Raises
    ------
    FileExistsError
        If node ``validator_id`` already has a key there.
    provenance.registry.RegistryError
        If the registry cannot be opened or contains another key for that node.
    """
    out_dir = Path(out_dir)
    folder = signing.node_key_dir(out_dir / signing.SIGNING_DIR, validator_id)
    if (folder / signing.PRIVATE_KEY_FILENAME).exists():
        raise FileExistsError(f"{folder / signing.PRIVATE_KEY_FILENAME} exists; the validator already has a signing key.")
    registry = NodeRegistry(registry_url or sqlite_url(out_dir / DEFAULT_FILENAME))
    try:
        node = _create_and_register(registry, folder, validator_id, VALIDATOR_ORGANISATION, overwrite=False)
    finally:
        registry.close()
    logger.info("Signing key of the validator (node %d) written to %s", validator_id, folder)
    return node

"""The state directory of a local deployment, and which party gets which key.

``provision`` creates the key material once, in ``dealer/``, exactly as
``fedseal keys init --tls --nodes N`` does on an operator's offline machine,
then copies to each party only what that party may hold::

    STATE/
      dealer/              every key (the CA key included); on a real federation this stays offline
      superlink/           tls/ (ca.crt, server.pem, server.key) and state.db (registrations, runs)
      server/keys/         server/ (CKKS public context), registry.sqlite, fingerprint.txt
      server/runs/         run outputs (summary.json, metrics.jsonl, audit.jsonl, models/)
      nodes/node-<i>/keys/ ca.crt, auth.key, auth.pub, signing.key, ckks/ (secret contexts: aggregation and scoring)
      nodes/node-<i>/state/ privacy ledger and local model cache
      nodes/node-<i>/node-config.toml
      nodes/node-<N>/      the he_robust trust validator (partition id N), with --validator: the same files
      flwr-home/           FLWR_HOME: config.toml with the connection, CLI state
      logs/                superlink.log, supernode-<i>.log, run.log

With ``validator=True`` (``strategy=he_robust strategy.rule=trust``) the
validator is one more SuperNode, ``node-<N>`` after the N sites: its own
signing key (registered with the organisation ``validator``), SuperNode
authentication key, the scoring secret and a state folder. Its node config
says ``num-partitions = N + 1``. A folder provisioned without it gets it on
the first call that requests it.

The ServerApp reads ``server/keys`` only, so it never receives the CKKS
secret context or a node's private key. Running ``provision`` again on the
same folder reuses the keys, so a restarted deployment keeps its node
registrations and its encrypted models stay readable.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from crypto import ckks
from crypto import signing as signing_keys
from deploy import pki
from provenance.registry import DEFAULT_FILENAME as REGISTRY_FILENAME
from server.keys import (
    NODE_DIR,
    SCORING_FINGERPRINT_FILE,
    SERVER_DIR,
    init_ckks_keys,
    init_scoring_keys,
    init_signing_keys,
    init_validator_signing_key,
)

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.txt"
NODE_COUNT_FILE = "nodes.txt"


@dataclass(frozen=True)
class NodeFiles:
    """The files of one site.

    Parameters
    ----------
    partition_id : int
        The site's partition id, which is also its id in the signing registry.
    root : Path
        ``STATE/nodes/node-<id>``.
    auth_key, auth_public_key : Path
        SuperNode authentication key pair (OpenSSH, P-384).
    signing_key : Path
        Ed25519 key that signs the site's updates.
    ckks_dir : Path
        Folder with the CKKS secret context.
    ca_cert : Path
        The CA certificate the SuperNode verifies the SuperLink with.
    state_dir : Path
        Privacy ledger and local model cache.
    node_config : Path
        TOML file passed as ``flower-supernode --node-config``.
    """

    partition_id: int
    root: Path
    auth_key: Path
    auth_public_key: Path
    signing_key: Path
    ckks_dir: Path
    ca_cert: Path
    state_dir: Path
    node_config: Path


@dataclass(frozen=True)
class Layout:
    """Paths of a local deployment's state directory (see the module docstring).

    Parameters
    ----------
    root : Path
        The state directory.
    num_nodes : int
        Number of sites.
    tls : bool
        Whether TLS material and authentication keys exist (False with ``--insecure``).
    validator : bool, default False
        Whether the he_robust trust validator runs as SuperNode ``num_nodes``.
    """

    root: Path
    num_nodes: int
    tls: bool
    validator: bool = False

    @property
    def dealer(self) -> Path:
        """Folder with every key, as written by ``fedseal keys init``."""
        return self.root / "dealer"

    @property
    def superlink_dir(self) -> Path:
        """The SuperLink's folder."""
        return self.root / "superlink"

    @property
    def database(self) -> Path:
        """The SuperLink's state database."""
        return self.superlink_dir / "state.db"

    @property
    def superlink_tls(self) -> Path:
        """The SuperLink's TLS folder."""
        return self.superlink_dir / pki.TLS_DIR

    @property
    def server_keys(self) -> Path:
        """The ServerApp's keys folder (``security.keys_dir`` and ``provenance.keys_dir``)."""
        return self.root / "server" / "keys"

    @property
    def runs_dir(self) -> Path:
        """Where the ServerApp writes run folders."""
        return self.root / "server" / "runs"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of every Flower process of this deployment."""
        return self.root / "flwr-home"

    @property
    def logs_dir(self) -> Path:
        """Daemon and run logs."""
        return self.root / "logs"

    @property
    def ca_cert(self) -> Path | None:
        """The CA certificate the ``flwr`` CLI trusts; None without TLS."""
        return self.superlink_tls / pki.CA_CERT if self.tls else None

    def node(self, partition_id: int) -> NodeFiles:
        """Return the files of site ``partition_id``."""
        root = self.root / "nodes" / f"node-{partition_id}"
        keys = root / "keys"
        return NodeFiles(
            partition_id=partition_id,
            root=root,
            auth_key=keys / pki.AUTH_PRIVATE_KEY,
            auth_public_key=keys / pki.AUTH_PUBLIC_KEY,
            signing_key=keys / signing_keys.PRIVATE_KEY_FILENAME,
            ckks_dir=keys / "ckks",
            ca_cert=keys / pki.CA_CERT,
            state_dir=root / "state",
            node_config=root / "node-config.toml",
        )

    def nodes(self) -> list[NodeFiles]:
        """Return every site's files, by partition id (the validator excluded)."""
        return [self.node(partition_id) for partition_id in range(self.num_nodes)]

    def validator_node(self) -> NodeFiles | None:
        """Return the validator's files (partition id ``num_nodes``), or None without a validator."""
        return self.node(self.num_nodes) if self.validator else None

    def supernodes(self) -> list[NodeFiles]:
        """Return the files of every SuperNode to start: the sites, then the validator if there is one."""
        validator = self.validator_node()
        return self.nodes() + ([validator] if validator is not None else [])

    def num_partitions(self, node: NodeFiles) -> int:
        """Return the ``num-partitions`` of ``node``'s config: N for a site, N + 1 for the validator."""
        return self.num_nodes + 1 if self.validator and node.partition_id == self.num_nodes else self.num_nodes


def check_state_dir(path: Path) -> Path:
    """Return ``path`` made absolute; reject characters that Flower's config strings cannot carry.

    Raises
    ------
    ValueError
        If the path contains whitespace or quotes.
    """
    resolved = Path(path).expanduser().resolve()
    if any(char.isspace() or char in "\"'" for char in str(resolved)):
        raise ValueError(f"--state-dir {resolved} contains whitespace or quotes, which Flower's config values cannot carry; choose another folder.")
    return resolved


def provision(
    state_dir: Path,
    num_nodes: int,
    preset: str,
    tls: bool,
    hosts: list[str] | None = None,
    data_root: Path | None = None,
    validator: bool = False,
) -> Layout:
    """Create the keys (first call) and give each party its files; return the layout.

    Parameters
    ----------
    state_dir : Path
        The deployment's state directory.
    num_nodes : int
        Number of sites (>= 1).
    preset : str
        CKKS preset of the federation's key.
    tls : bool
        Also create the CA, the SuperLink certificate and SuperNode authentication keys.
    hosts : list of str, optional
        Hosts for the SuperLink certificate (default 127.0.0.1 and localhost).
    data_root : Path, optional
        Dataset folder written into each site's node config; None leaves it to the task.
    validator : bool, default False
        Also provision the he_robust trust validator as SuperNode ``num_nodes``.

    Raises
    ------
    ValueError
        If the folder was provisioned for another number of nodes, another
        CKKS preset, or without TLS when TLS is requested.
    """
    if num_nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {num_nodes}.")
    layout = Layout(check_state_dir(state_dir), num_nodes, tls, validator)
    if (layout.dealer / FINGERPRINT_FILE).exists():
        _check_existing(layout, preset)
    else:
        _create_keys(layout, preset, hosts)
    if not (layout.dealer / SCORING_FINGERPRINT_FILE).exists():
        # The scoring key of strategy=he_robust; a folder provisioned before it existed gets one now.
        init_scoring_keys(layout.dealer)
    if validator:
        _ensure_validator_keys(layout)

    _distribute(layout)
    for node in layout.supernodes():
        write_node_config(node, layout.num_partitions(node), data_root)
    for folder in (layout.runs_dir, layout.logs_dir, layout.flwr_home):
        folder.mkdir(parents=True, exist_ok=True)
    return layout


def _create_keys(layout: Layout, preset: str, hosts: list[str] | None) -> None:
    """Write every key into the dealer folder, as ``fedseal keys init`` does."""
    dealer = layout.dealer
    init_ckks_keys(dealer, preset)
    init_signing_keys(dealer, layout.num_nodes)
    if layout.tls:
        pki.init_tls(dealer, hosts or list(pki.DEFAULT_HOSTS))
        pki.init_node_auth_keys(dealer, layout.num_nodes)
    (dealer / NODE_COUNT_FILE).write_text(f"{layout.num_nodes}\n", encoding="utf-8")
    logger.info("Keys for %d nodes created in %s", layout.num_nodes, dealer)


def _ensure_validator_keys(layout: Layout) -> None:
    """Create the validator's signing and authentication keys in the dealer folder unless they exist."""
    dealer = layout.dealer
    validator_id = layout.num_nodes
    signing_key = signing_keys.node_key_dir(dealer / signing_keys.SIGNING_DIR, validator_id) / signing_keys.PRIVATE_KEY_FILENAME
    if not signing_key.exists():
        init_validator_signing_key(dealer, validator_id)
    auth_dir = pki.node_auth_dir(dealer, validator_id)
    if layout.tls and not (auth_dir / pki.AUTH_PRIVATE_KEY).exists():
        pki.write_auth_key_pair(auth_dir)
        logger.info("SuperNode authentication key of the validator (node %d) written to %s", validator_id, auth_dir)


def _check_existing(layout: Layout, preset: str) -> None:
    """Reject reusing a state directory whose keys do not fit this deployment."""
    dealer = layout.dealer
    count_file = dealer / NODE_COUNT_FILE
    existing_nodes = int(count_file.read_text(encoding="utf-8")) if count_file.exists() else -1
    if existing_nodes != layout.num_nodes:
        raise ValueError(f"{layout.root} contains keys for {existing_nodes} nodes, not {layout.num_nodes}; pass --nodes {existing_nodes} or a new --state-dir.")

    existing_preset = ckks.read_public_context(dealer / SERVER_DIR).preset.name
    if existing_preset != preset:
        raise ValueError(f"{layout.root} contains a CKKS key for preset {existing_preset}, not {preset}; pass security={existing_preset} or a new --state-dir.")

    if layout.tls and not (dealer / pki.TLS_DIR / pki.SERVER_KEY).exists():
        raise ValueError(f"{layout.root} was provisioned with --insecure and has no TLS material; pass --insecure again or a new --state-dir.")
    logger.info("Reusing the keys in %s", dealer)


def _copy(source: Path, target: Path) -> None:
    """Copy a file or folder, keeping modes (private keys stay 0600)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)


def _distribute(layout: Layout) -> None:
    """Copy each party's files out of the dealer folder."""
    dealer = layout.dealer
    server_keys = layout.server_keys
    _copy(dealer / SERVER_DIR, server_keys / SERVER_DIR)
    _copy(dealer / FINGERPRINT_FILE, server_keys / FINGERPRINT_FILE)
    _copy(dealer / SCORING_FINGERPRINT_FILE, server_keys / SCORING_FINGERPRINT_FILE)
    # The registry holds only public keys; the server checks signatures against it.
    _copy(dealer / REGISTRY_FILENAME, server_keys / REGISTRY_FILENAME)

    if layout.tls:
        tls = dealer / pki.TLS_DIR
        for name in (pki.CA_CERT, pki.SERVER_CERT, pki.SERVER_KEY):
            _copy(tls / name, layout.superlink_tls / name)

    for node in layout.supernodes():
        signing_dir = signing_keys.node_key_dir(dealer / signing_keys.SIGNING_DIR, node.partition_id)
        _copy(signing_dir / signing_keys.PRIVATE_KEY_FILENAME, node.signing_key)
        _copy(dealer / NODE_DIR, node.ckks_dir)
        if layout.tls:
            auth_dir = pki.node_auth_dir(dealer, node.partition_id)
            _copy(auth_dir / pki.AUTH_PRIVATE_KEY, node.auth_key)
            _copy(auth_dir / pki.AUTH_PUBLIC_KEY, node.auth_public_key)
            _copy(dealer / pki.TLS_DIR / pki.CA_CERT, node.ca_cert)
        node.state_dir.mkdir(parents=True, exist_ok=True)
        node.root.chmod(0o700)


def write_node_config(node: NodeFiles, num_partitions: int, data_root: Path | None = None) -> Path:
    """Write the SuperNode's ``--node-config`` TOML file; return its path.

    The keys are the ones ``clients.app`` reads: ``partition-id``,
    ``num-partitions`` (the sites, plus one on the validator),
    ``data-root`` (omitted: the task's data root), ``signing-key``,
    ``ckks-secret-dir`` and ``state-dir``.
    """
    entries = {
        "partition-id": node.partition_id,
        "num-partitions": num_partitions,
        "signing-key": str(node.signing_key),
        "ckks-secret-dir": str(node.ckks_dir),
        "state-dir": str(node.state_dir),
    }
    if data_root is not None:
        entries["data-root"] = str(Path(data_root).resolve())
    lines = [f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}" for key, value in entries.items()]
    node.node_config.parent.mkdir(parents=True, exist_ok=True)
    node.node_config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return node.node_config

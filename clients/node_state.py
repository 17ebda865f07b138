"""A site's files that outlive one ClientApp process.

A SuperNode starts a new ClientApp process for every message (Flower 1.42),
so nothing a node must remember can live in memory. Everything comes from
paths in the node config (``flower-supernode --node-config``):

``signing-key``
    The site's Ed25519 update-signing key (read by ``clients.signing``).
``ckks-secret-dir``
    The folder with the CKKS secret context (read by ``clients.encrypted``).
``state-dir``
    The site's writable folder: the privacy ledger (``privacy.dp_sgd``) and
    the model cache below. It is created when missing.

``ModelCache`` keeps the last global model this site decrypted, keyed by the
hash of the encrypted version. So the evaluate message of a round reuses the
model that its train message decrypted, and a site keeps its latest plaintext
model across SuperNode restarts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PATH_KEYS = ("signing-key", "ckks-secret-dir")
STATE_DIR_KEY = "state-dir"
CACHE_DIR = "model-cache"
CACHE_MODEL = "global-latest.pt"
CACHE_INDEX = "global-latest.json"


def configured_path(node_config: dict[str, Any], key: str) -> Path | None:
    """Return the path that node config ``key`` names, or None when it is not set.

    Raises
    ------
    FileNotFoundError
        If the key is set to a path that does not exist.
    """
    value = node_config.get(key)
    if not value:
        return None
    path = Path(str(value))
    if not path.exists():
        raise FileNotFoundError(f"Node config {key}={path} does not exist; copy the site's files there or fix the SuperNode's --node-config.")
    return path


def check_node_files(node_config: dict[str, Any]) -> None:
    """Check that every key path in the node config exists, so a typo fails with its name.

    Raises
    ------
    FileNotFoundError
        Naming the first key whose path is missing.
    """
    for key in PATH_KEYS:
        configured_path(node_config, key)


def state_dir(node_config: dict[str, Any]) -> Path | None:
    """Return the node config's ``state-dir`` (created if missing), or None when it is not set."""
    value = node_config.get(STATE_DIR_KEY)
    if not value:
        return None
    path = Path(str(value))
    path.mkdir(parents=True, exist_ok=True)
    return path


class ModelCache:
    """The site's latest decrypted global model, on disk.

    Parameters
    ----------
    folder : Path
        ``state-dir/model-cache``; created when missing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_node(cls, node_config: dict[str, Any]) -> ModelCache | None:
        """Return the cache in the node's ``state-dir``, or None when the node has none (simulation)."""
        folder = state_dir(node_config)
        return cls(folder / CACHE_DIR) if folder is not None else None

    def get(self, version_hash: str) -> OrderedDict[str, torch.Tensor] | None:
        """Return the cached model if it is version ``version_hash``, else None."""
        index = self.folder / CACHE_INDEX
        if not index.exists():
            return None
        try:
            cached_hash = json.loads(index.read_text(encoding="utf-8"))["version_hash"]
        except (ValueError, KeyError) as error:
            logger.warning("Ignoring the unreadable model cache index %s: %s", index, error)
            return None
        if cached_hash != version_hash:
            return None
        return torch.load(self.folder / CACHE_MODEL, weights_only=True)

    def put(self, version_hash: str, state: OrderedDict[str, torch.Tensor], server_round: int) -> None:
        """Store ``state`` as version ``version_hash``, replacing the previous entry atomically.

        The model file is replaced before the index, so a reader that finds
        the new hash in the index also finds the new model.
        """
        _atomic_write(self.folder / CACHE_MODEL, lambda handle: torch.save(state, handle))
        index = json.dumps({"version_hash": version_hash, "round": server_round}).encode("utf-8")
        _atomic_write(self.folder / CACHE_INDEX, lambda handle: handle.write(index))


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(handle)`` into a temporary file in the same folder, then rename it over ``path``."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

"""The node side of ``he_robust``: decrypt the scoring drift, encrypt the update for scoring, train the reference.

Protocol, per round (the server side is ``strategies.he_robust``):

1. The server sends the encrypted drift ``global - initial`` under the
   scoring key (``crypto.ckks.scoring.aggregate``; none in round 1). The
   node rebuilds the public initial model from the task's seed, decrypts the
   drift and adds it.
2. A training node trains and replies with ``encrypt_for_scoring(u)`` for
   its update ``u = trained - global``, unweighted: the server scores that
   ciphertext and multiplies it by its weight itself. An update whose L2
   norm exceeds ``strategy.norm_bound`` is rejected with an error, never
   clipped, so the node's operator sees it.
3. The validator (partition id ``nodes``, trust rule only) holds the root
   rows that no training node has. It trains the global model on them as
   ``strategies.root_reference`` does in the plaintext trust strategy and
   replies with the encrypted reference and its norm.

Every train and evaluate message updates the round this node has seen
(``clients.committee.record_seen_round``), to which its committee budget is bound.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients import node_state
from clients.committee import record_seen_round, scoring_node_config
from clients.encrypted import SECRET_DIR_ENV, flatten, unflatten
from crypto.ckks.errors import PreflightError
from crypto.ckks.scoring import (
    ScoringSecretContext,
    encrypt_for_scoring,
    read_scoring_secret_context,
)
from crypto.ckks.scoring.aggregate import EncryptedDrift, decrypt_drift
from crypto.ckks.scoring.context import check_scoring_bound

logger = logging.getLogger(__name__)

# Keys shared with strategies.he_robust.
SCHEME_KEY = "he-scheme"
SCHEME_SCORING = "scoring"
ROLE_KEY = "he-role"
ROLE_VALIDATOR = "validator"
NODE_EXAMPLES_KEY = "he-node-examples"
REFERENCE_NORM_KEY = "reference-norm"
VALIDATOR_METRIC = "validator"
# ||r|| travels inside the signed payload as one little-endian float64 after the ciphertext.
_NORM_FORMAT = struct.Struct("<d")


def reference_batch(data: bytes, norm: float) -> list[bytes]:
    """Return the validator's upload: the encrypted reference, then ``||r||`` as 8 bytes.

    Both parts are in the batch that the payload hash, and so the
    validator's signature, covers.
    """
    return [data, _NORM_FORMAT.pack(float(norm))]


def parse_reference_batch(batch: list[bytes]) -> tuple[bytes, float]:
    """Return (encrypted reference, ``||r||``) from a validator upload.

    Raises
    ------
    ValueError
        If the batch is not two byte strings, the second of 8 bytes, or the norm is not finite and positive.
    """
    if not isinstance(batch, list) or len(batch) != 2 or not all(isinstance(part, bytes) for part in batch):
        raise ValueError("a reference upload must be [encrypted reference, 8-byte norm]")
    if len(batch[1]) != _NORM_FORMAT.size:
        raise ValueError(f"the reference norm part has {len(batch[1])} bytes, not {_NORM_FORMAT.size}")
    (norm,) = _NORM_FORMAT.unpack(batch[1])
    if not math.isfinite(norm) or norm <= 0.0:
        raise ValueError(f"the reference norm {norm!r} is not a finite positive number")
    return batch[0], norm


class ScoringBoundError(ValueError):
    """A node's update has an L2 norm above ``strategy.norm_bound``."""


def is_scoring(config: Any) -> bool:
    """Return whether a message's config selects the scoring scheme of ``he_robust``."""
    return config.get(SCHEME_KEY) == SCHEME_SCORING


def has_validator(encryption: dict[str, Any] | None) -> bool:
    """Return whether the task runs a validator node (``he_robust`` with the trust rule)."""
    return bool(encryption and encryption.get("scheme") == SCHEME_SCORING and encryption.get("validator"))


def is_validator(encryption: dict[str, Any] | None, partition_id: int, num_nodes: int) -> bool:
    """Return whether partition `partition_id` is the validator: the partition id after the training nodes."""
    return has_validator(encryption) and partition_id == num_nodes


@functools.lru_cache(maxsize=2)
def _read_secret(directory: str) -> ScoringSecretContext:
    return read_scoring_secret_context(directory)


def load_scoring_secret(encryption: dict[str, Any], node_config: dict[str, Any]) -> ScoringSecretContext:
    """Load (once per process) the scoring secret and check it against the federation's fingerprint.

    The folder is the node config's ``ckks-secret-dir``, else ``$FEDSEAL_CKKS_SECRET_DIR``,
    else the folder the task names (simulation).

    Raises
    ------
    FileNotFoundError
        If no folder is set.
    ValueError
        If the key is not the federation's.
    """
    import os

    directory = node_config.get("ckks-secret-dir") or os.environ.get(SECRET_DIR_ENV) or encryption.get("secret_dir")
    if not directory:
        raise FileNotFoundError(
            "No scoring secret context for this node: set the node config 'ckks-secret-dir' or "
            f"${SECRET_DIR_ENV} to the node/ folder written by `fedseal keys init --scoring`."
        )
    secret = _read_secret(str(directory))
    if secret.fingerprint != encryption["fingerprint"]:
        raise ValueError(
            f"This node's scoring key (fingerprint {secret.fingerprint[:16]}...) is not the federation's "
            f"({str(encryption['fingerprint'])[:16]}...); install the scoring secret made with the server's public context."
        )
    return secret


def note_round(encryption: dict[str, Any], node_config: dict[str, Any], run_id: int, server_round: int) -> None:
    """Record `server_round` as seen, so this node's committee budget follows the run's rounds."""
    folder = node_state.state_dir(scoring_node_config(node_config, encryption))
    if folder is None:
        logger.warning("he_robust: node has no state-dir, so its committee budget cannot be bound to round %d", server_round)
        return
    record_seen_round(Path(folder), run_id, server_round)


def global_state(
    secret: ScoringSecretContext,
    initial: OrderedDict[str, torch.Tensor],
    drift_batch: list[bytes] | None,
) -> OrderedDict[str, torch.Tensor]:
    """Return the global model: `initial` plus the decrypted scoring drift (none in round 1).

    Raises
    ------
    ValueError
        If the batch is not one serialized drift.
    crypto.ckks.errors.CkksError
        If the drift is malformed, under another key, or beyond the preset's limit.
    """
    if not drift_batch:
        return initial
    if len(drift_batch) != 1:
        raise ValueError(f"An encrypted scoring drift is one serialized blob, got {len(drift_batch)} parts.")
    base = flatten(initial)
    drift = EncryptedDrift.from_bytes(secret, bytes(drift_batch[0]), base.size)
    return unflatten(base + decrypt_drift(secret, drift), initial)


def encrypt_update(
    secret: ScoringSecretContext,
    trained: OrderedDict[str, torch.Tensor],
    start: OrderedDict[str, torch.Tensor],
    norm_bound: float,
) -> bytes:
    """Encrypt the unweighted update ``trained - start`` for scoring.

    Raises
    ------
    ScoringBoundError
        If the update's L2 norm exceeds `norm_bound`; nothing is clipped.
    """
    update = flatten(trained) - flatten(start)
    return encrypt_vector(secret, update, norm_bound)


def largest_norm_bound(preset: Any) -> float:
    """Return the largest ``strategy.norm_bound`` that ``preset`` accepts."""
    # Any accepted bound returns the preset's limit; 1.0 is within every scoring preset's.
    return check_scoring_bound(preset, 1.0)


def encrypt_vector(secret: ScoringSecretContext, vector: np.ndarray, norm_bound: float) -> bytes:
    """Encrypt a flat vector for scoring, rejecting it when its norm exceeds `norm_bound`."""
    norm = float(np.linalg.norm(vector))
    if norm > norm_bound:
        # Clipping here would change what the node trained without telling anyone, so the node refuses.
        raise ScoringBoundError(
            f"Update has L2 norm {norm:.6g}, above strategy.norm_bound={norm_bound:g}; this node does not clip. "
            f"Raise strategy.norm_bound (at most {largest_norm_bound(secret.preset):g} for "
            f"{secret.preset.name}) or lower train.lr."
        )
    try:
        return encrypt_for_scoring(secret, vector, norm_bound=norm_bound)
    except PreflightError as error:
        raise ScoringBoundError(str(error)) from error


def train_reference(spec: Any, state: OrderedDict[str, torch.Tensor], server_round: int, node_examples: list[float]) -> np.ndarray:
    """Train the validator's reference update from `state` on the root rows, as the plaintext trust rule does.

    Same root rows (the partition's holdout), same seed and the same epochs
    rule (``strategy.reference_epochs``, or matching the nodes' example-weighted
    mean optimizer steps), so plaintext and encrypted trust runs are comparable.
    """
    from strategies.root_reference import RootReference

    global_arrays = {key: tensor.detach().cpu().numpy() for key, tensor in state.items()}
    reference = RootReference.from_spec(spec, spec.encryption.get("reference_epochs"))
    return reference(server_round, global_arrays, list(node_examples))

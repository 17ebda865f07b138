"""The node side of CKKS aggregation: decrypt the global model, encrypt the update.

Protocol, per round (the server side is ``strategies.he_fedavg``):

1. The server sends the encrypted *drift* of the global model, ``global -
   initial``, as one ciphertext batch (absent in round 1). The initial model
   is public: every node rebuilds it from the task's seed and checks its hash
   against the one the server sends.
2. The node decrypts the drift, adds it to the initial model, trains, and
   encrypts ``w_i * (trained - global)`` with ``w_i = n_i / D``, where ``D``
   is the total example count of the round's sampled nodes (sent by the
   server). The server adds the uploads to the drift, so the new global
   model is FedAvg's weighted mean when every sampled node is accepted.
3. Updates are packed across layers into one flat vector in ``state_dict``
   order; every tensor must be floating point.

A node refuses to encrypt an update with a coordinate above the configured
``update_bound``, and refuses to train when the global drift plus one more
round of such updates could exceed the preset's headroom, because the
server's sum would then wrap around silently.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crypto import ckks
from crypto.ckks.params import SAFETY_MARGIN, wider_presets

logger = logging.getLogger(__name__)

# Environment variable naming the folder with a node's secret context; a
# node config key ``ckks-secret-dir`` takes precedence.
SECRET_DIR_ENV = "FEDSEAL_CKKS_SECRET_DIR"


@dataclass(frozen=True)
class EncryptionSpec:
    """The CKKS part of a task: which key, which bound.

    Parameters
    ----------
    preset : str
        Preset name (``compact`` or ``tenseal_default``).
    fingerprint : str
        SHA-256 of the public context the server holds; nodes check their key against it.
    secret_dir : str or None
        Folder with the nodes' secret context (simulation); a node's own setting wins.
    update_bound : float
        Largest absolute coordinate a node's update may have.
    """

    preset: str
    fingerprint: str
    secret_dir: str | None
    update_bound: float


class UpdateBoundError(ValueError):
    """A node's update has a coordinate above ``update_bound``."""


def state_hash(state: OrderedDict[str, torch.Tensor]) -> str:
    """Return the SHA-256 over names, shapes, dtypes and bytes of a state dict, in order."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def flatten(state: OrderedDict[str, torch.Tensor]) -> np.ndarray:
    """Concatenate all tensors of ``state`` into one float64 vector.

    Raises
    ------
    TypeError
        If a tensor is not floating point: integer buffers (BatchNorm counters)
        cannot be averaged and must stay out of encrypted models.
    """
    parts = []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise TypeError(f"Encrypted aggregation needs floating-point tensors only; '{name}' is {tensor.dtype}.")
        parts.append(tensor.detach().cpu().reshape(-1).to(torch.float64).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, template: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Split ``vector`` back into tensors shaped and typed like ``template``."""
    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for name, tensor in template.items():
        size = tensor.numel()
        values = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + size]))
        result[name] = values.reshape(tensor.shape).to(tensor.dtype)
        offset += size
    if offset != vector.size:
        raise ValueError(f"Vector has {vector.size} values but the model has {offset} parameters.")
    return result


def secret_dir_for(spec: EncryptionSpec, node_config_dir: str | None) -> Path:
    """Return the secret-context folder: node config, then $FEDSEAL_CKKS_SECRET_DIR, then the task's.

    Raises
    ------
    FileNotFoundError
        If none is set.
    """
    chosen = node_config_dir or os.environ.get(SECRET_DIR_ENV) or spec.secret_dir
    if not chosen:
        raise FileNotFoundError(
            "No CKKS secret context for this node: set the node config 'ckks-secret-dir' or "
            f"${SECRET_DIR_ENV} to the folder written by `fedseal keys init`."
        )
    return Path(chosen)


@functools.lru_cache(maxsize=4)
def _load_secret(directory: str) -> ckks.SecretContext:
    return ckks.read_secret_context(directory)


def load_secret(spec: EncryptionSpec, node_config_dir: str | None = None) -> ckks.SecretContext:
    """Load (once per process) the node's secret context and check it matches the server's key.

    Raises
    ------
    ValueError
        If the fingerprint differs from the one the server announced.
    """
    secret = _load_secret(str(secret_dir_for(spec, node_config_dir)))
    if secret.fingerprint != spec.fingerprint:
        raise ValueError(
            f"This node's CKKS key (fingerprint {secret.fingerprint[:16]}...) is not the federation's "
            f"({spec.fingerprint[:16]}...); install the secret context made with the server's public context."
        )
    return secret


def drift_limit(preset: ckks.Preset) -> float:
    """Return the largest drift coordinate the preset can hold with the preflight's safety margin."""
    return preset.headroom() / (SAFETY_MARGIN * preset.packing_factor)


def global_state(
    secret: ckks.SecretContext,
    initial: OrderedDict[str, torch.Tensor],
    drift_batch: list[bytes] | None,
    update_bound: float | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """Return the global model: ``initial`` plus the decrypted drift (none in round 1).

    With ``update_bound``, also check that this round's sum cannot wrap: the
    drift so far plus one more round of updates (at most ``update_bound`` per
    coordinate, weights summing to 1) must stay within ``drift_limit``.

    Raises
    ------
    UpdateBoundError
        If the next encrypted sum could overflow the preset's modulus.
    """
    if not drift_batch:
        return initial
    base = flatten(initial)
    drift = ckks.decrypt_sum(secret, drift_batch, base.size)

    if update_bound is not None:
        largest = float(np.max(np.abs(drift))) if drift.size else 0.0
        limit = drift_limit(secret.preset)
        if largest + update_bound > limit:
            raise UpdateBoundError(
                f"The global model has drifted {largest:.4g} from the initial model; with "
                f"security.update_bound={update_bound} the next sum could exceed the {secret.preset.name} "
                f"preset's limit of {limit:.4g} and wrap around. Use a preset with more headroom "
                f"({_wider_presets(secret.preset)}) or lower the bound."
            )
    return unflatten(base + drift, initial)


def _wider_presets(preset: ckks.Preset) -> str:
    """Name the presets whose headroom exceeds ``preset``'s, as Hydra overrides."""
    wider = sorted(other.name for other in wider_presets(preset))
    return ", ".join(f"security={name}" for name in wider) or "none is registered"


def encrypt_delta(
    secret: ckks.SecretContext,
    trained: OrderedDict[str, torch.Tensor],
    start: OrderedDict[str, torch.Tensor],
    weight: float,
    update_bound: float,
) -> list[bytes]:
    """Encrypt ``weight * (trained - start)`` as one upload batch.

    Raises
    ------
    UpdateBoundError
        If a coordinate of ``trained - start`` exceeds ``update_bound``.
    """
    delta = flatten(trained) - flatten(start)
    largest = float(np.max(np.abs(delta))) if delta.size else 0.0
    if not np.isfinite(largest) or largest > update_bound:
        raise UpdateBoundError(
            f"Update coordinate {largest:.4g} exceeds security.update_bound={update_bound}; "
            "raise the bound (the preflight then checks the preset's headroom) or lower train.lr."
        )
    return ckks.encrypt_update(secret, delta, weight)

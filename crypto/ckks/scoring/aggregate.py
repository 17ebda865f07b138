"""Weighted sums of scoring ciphertexts, the encrypted global drift, and its decryption on a node.

``he_robust`` aggregates the same ciphertexts it scored, so what is scored
is what is summed. For weights c_i it computes ``sum_i c_i * Enc(u_i)``: each
chunk is multiplied by the plaintext constant c_i, the products are added at
scale 2^40 * q1 and rescaled once, which drops the 40-bit prime q1. The
constant is encoded at scale q1 (not 2^40), so the rescaled sum has scale
exactly 2^40 on the last level, and every round's sum can be added to the
drift of earlier rounds. The last level has one 60-bit prime, so a drift
coordinate must stay below about 2^19 (``drift_limit``).

Serialized drift (little-endian)::

    magic "FSSCORAG" | version u16 | fingerprint (32 bytes) | vector length u64
    | chunk count u32 | chunk count x (chunk length u32, CRC-32 u32) | chunks

The CRCs catch accidents in storage and transit. Authenticity comes from the
audit log's hashes and the nodes' update signatures.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenseal import sealapi

from crypto.ckks.context import SealBytesIO
from crypto.ckks.errors import (
    ChunkCountError,
    FingerprintMismatchError,
    MalformedBatchError,
    PreflightError,
    SecretKeyRequiredError,
    VectorLengthError,
)
from crypto.ckks.params import SAFETY_MARGIN
from crypto.ckks.scoring.context import ScoringPublicContext, ScoringSecretContext
from crypto.ckks.scoring.statistics import ScoringUpdate

__all__ = [
    "EncryptedDrift",
    "decrypt_drift",
    "drift_limit",
    "is_encrypted_drift",
    "weighted_sum",
]

logger = logging.getLogger(__name__)

_MAGIC = b"FSSCORAG"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sH32sQI")
_CHUNK = struct.Struct("<II")


def is_encrypted_drift(data: bytes) -> bool:
    """Return whether ``data`` starts with the magic of a serialized drift (format check only, not validity)."""
    return isinstance(data, bytes | bytearray) and bytes(data[: len(_MAGIC)]) == _MAGIC


def drift_limit(context: ScoringPublicContext | ScoringSecretContext) -> float:
    """Return the largest drift coordinate that fits the last level with the preflight's safety margin."""
    public = context.public if isinstance(context, ScoringSecretContext) else context
    last = public.seal_context.last_context_data().parms().coeff_modulus()
    modulus = math.prod(prime.value() for prime in last)
    return modulus / (2.0 * public.preset.scale * SAFETY_MARGIN)


@dataclass
class EncryptedDrift:
    """The encrypted global drift ``global - initial``, one ciphertext per N/2 values, on the last level.

    Attributes
    ----------
    fingerprint : str
        Fingerprint of the scoring context.
    length : int
        Number of model parameters.
    chunks : list of sealapi.Ciphertext
        Size-2 ciphertexts at scale 2^40 on the last level.
    """

    fingerprint: str
    length: int
    chunks: list[Any]

    def serialize(self) -> bytes:
        """Return the header, the chunk table with CRCs, and the SEAL bytes of every chunk."""
        with SealBytesIO() as scratch:
            parts = [scratch.save(chunk) for chunk in self.chunks]
        header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, bytes.fromhex(self.fingerprint), self.length, len(parts))
        table = b"".join(_CHUNK.pack(len(part), zlib.crc32(part)) for part in parts)
        return header + table + b"".join(parts)

    @classmethod
    def from_bytes(cls, context: ScoringPublicContext | ScoringSecretContext, data: bytes, expected_length: int) -> EncryptedDrift:
        """Load a serialized drift and check its key, length, CRCs, level and scale.

        Parameters
        ----------
        context : ScoringPublicContext or ScoringSecretContext
            The scoring context the drift must be under.
        data : bytes
            Output of `serialize`.
        expected_length : int
            Number of model parameters.

        Raises
        ------
        MalformedBatchError, FingerprintMismatchError, VectorLengthError, ChunkCountError
            If the bytes are corrupted, under another key, or of the wrong size.
        """
        public = context.public if isinstance(context, ScoringSecretContext) else context
        fingerprint, length, table, offset = _parse(data)
        if fingerprint != public.fingerprint:
            raise FingerprintMismatchError(
                f"Encrypted drift is under scoring context {fingerprint[:16]}, not {public.fingerprint[:16]}; "
                "it belongs to another federation's key."
            )
        if length != expected_length:
            raise VectorLengthError(f"Encrypted drift has {length} values, expected {expected_length}.")
        expected_chunks = math.ceil(length / public.preset.slot_count)
        if len(table) != expected_chunks:
            raise ChunkCountError(f"Encrypted drift has {len(table)} chunks, expected {expected_chunks}.")

        chunks = []
        with SealBytesIO() as scratch:
            for index, (size, crc) in enumerate(table):
                part = bytes(data[offset : offset + size])
                offset += size
                if zlib.crc32(part) != crc:
                    raise MalformedBatchError(f"Encrypted drift chunk {index} fails its CRC-32 check; the data is corrupted.")
                chunks.append(_load_last_level(public, scratch, index, part))
        return cls(fingerprint=public.fingerprint, length=length, chunks=chunks)


def drift_fingerprint(data: bytes) -> str:
    """Return the fingerprint of the scoring context that a serialized drift is under.

    Raises
    ------
    MalformedBatchError
        If ``data`` is not a serialized encrypted drift.
    """
    return _parse(data)[0]


def _parse(data: bytes) -> tuple[str, int, list[tuple[int, int]], int]:
    """Return (fingerprint, length, [(chunk length, CRC)], offset of the first chunk)."""
    if not isinstance(data, bytes | bytearray) or len(data) < _HEADER.size:
        raise MalformedBatchError("Encrypted drift is not bytes or is shorter than its header.")
    magic, version, fingerprint, length, count = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _FORMAT_VERSION:
        raise MalformedBatchError(f"Not an encrypted drift of version {_FORMAT_VERSION}: magic {magic!r}, version {version}.")

    offset = _HEADER.size + count * _CHUNK.size
    if len(data) < offset:
        raise MalformedBatchError(f"Encrypted drift declares {count} chunks but its chunk table is truncated.")
    table = [_CHUNK.unpack_from(data, _HEADER.size + i * _CHUNK.size) for i in range(count)]
    declared = offset + sum(size for size, _ in table)
    if len(data) != declared:
        raise MalformedBatchError(f"Encrypted drift has {len(data)} bytes, but its header declares {declared}.")
    return fingerprint.hex(), length, table, offset


def _load_last_level(public: ScoringPublicContext, scratch: SealBytesIO, index: int, part: bytes) -> Any:
    ciphertext = sealapi.Ciphertext()
    try:
        scratch.load(ciphertext, part, public.seal_context)
    except (RuntimeError, ValueError) as error:
        raise MalformedBatchError(f"Encrypted drift chunk {index} is not a valid SEAL ciphertext: {error}.") from error
    if ciphertext.parms_id() != public.seal_context.last_parms_id() or ciphertext.size() != 2 or ciphertext.scale != public.preset.scale:
        raise MalformedBatchError(
            f"Encrypted drift chunk {index} has size {ciphertext.size()} and scale {ciphertext.scale:.6g}; "
            f"expected size 2 at scale 2^{public.preset.scale_bits} on the last level."
        )
    return ciphertext


def weighted_sum(
    context: ScoringPublicContext,
    updates: Sequence[ScoringUpdate],
    weights: Sequence[float],
    drift: EncryptedDrift | None = None,
) -> EncryptedDrift:
    """Return ``drift + sum_i weights[i] * u_i`` as a new encrypted drift.

    Parameters
    ----------
    context : ScoringPublicContext
        The server's public scoring context; it cannot decrypt.
    updates : sequence of ScoringUpdate
        Fresh encrypted updates of equal length.
    weights : sequence of float
        One finite weight per update. Zero weights are skipped, because SEAL
        refuses a product that is exactly zero.
    drift : EncryptedDrift, optional
        The global drift so far; None in the first round.

    Raises
    ------
    ValueError
        If the counts differ, a weight is not finite, or every weight is zero.
    VectorLengthError, FingerprintMismatchError
        If an update or the drift has another length or key.
    """
    if len(updates) != len(weights):
        raise ValueError(f"weighted_sum got {len(updates)} updates and {len(weights)} weights; pass one weight per update.")
    if not all(math.isfinite(weight) for weight in weights):
        raise ValueError(f"weighted_sum got non-finite weights {list(weights)}.")
    terms = [(update, float(weight)) for update, weight in zip(updates, weights) if weight != 0.0]
    if not terms:
        raise ValueError("weighted_sum got only zero weights, so there is nothing to add.")
    length = terms[0][0].length
    for update, _ in terms:
        if update.fingerprint != context.fingerprint:
            raise FingerprintMismatchError(f"Scoring update is under context {update.fingerprint[:16]}, not {context.fingerprint[:16]}.")
        if update.length != length:
            raise VectorLengthError(f"Cannot add scoring updates of {length} and {update.length} values.")
    if drift is not None and (drift.length != length or drift.fingerprint != context.fingerprint):
        raise VectorLengthError(f"The drift has {drift.length} values under {drift.fingerprint[:16]}; the updates have {length} under {context.fingerprint[:16]}.")

    evaluator = context.evaluator
    encoder = sealapi.CKKSEncoder(context.seal_context)
    # Encoding at the prime that the rescale divides by leaves the sum at exactly 2^40.
    rescale_prime = float(context.seal_context.first_context_data().parms().coeff_modulus()[-1].value())
    constants = []
    for _, weight in terms:
        plaintext = sealapi.Plaintext()
        encoder.encode(weight, rescale_prime, plaintext)
        constants.append(plaintext)

    chunks = []
    for index in range(len(terms[0][0].chunks)):
        total = None
        for (update, _), constant in zip(terms, constants):
            product = sealapi.Ciphertext()
            evaluator.multiply_plain(update.chunks[index], constant, product)
            if total is None:
                total = product
            else:
                evaluator.add_inplace(total, product)
        evaluator.rescale_to_next_inplace(total)
        if drift is not None:
            evaluator.add_inplace(total, drift.chunks[index])
        chunks.append(total)
    return EncryptedDrift(fingerprint=context.fingerprint, length=length, chunks=chunks)


def decrypt_drift(context: ScoringSecretContext, drift: EncryptedDrift) -> np.ndarray:
    """Decrypt the global drift on a key holder and return it as a float64 vector.

    Raises
    ------
    SecretKeyRequiredError
        If `context` is not a secret scoring context.
    PreflightError
        If a coordinate exceeds `drift_limit`, the point beyond which the
        next round's sum could wrap around the last level's modulus.
    """
    if not isinstance(context, ScoringSecretContext):
        raise SecretKeyRequiredError(f"Decrypting the drift needs the secret scoring context, got {type(context).__name__}.")
    if drift.fingerprint != context.fingerprint:
        raise FingerprintMismatchError(f"Drift is under scoring context {drift.fingerprint[:16]}, not {context.fingerprint[:16]}.")

    plaintext = sealapi.Plaintext()
    parts = []
    for chunk in drift.chunks:
        context.decryptor.decrypt(chunk, plaintext)
        parts.append(np.asarray(context.encoder.decode_double(plaintext), dtype=np.float64))
    values = np.concatenate(parts)[: drift.length]

    largest = float(np.max(np.abs(values))) if values.size else 0.0
    limit = drift_limit(context)
    if not largest <= limit:
        raise PreflightError(
            f"The decrypted global drift has a coordinate of {largest:.4g}, above the scoring preset's "
            f"limit of {limit:.4g}; the sum may have wrapped. Lower train.lr or strategy.norm_bound."
        )
    return values

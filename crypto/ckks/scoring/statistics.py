"""Encrypted updates for scoring and the statistics the server computes on them.

A node encrypts its update under the scoring key (`encrypt_for_scoring`).
The server, which holds only the public scoring context, computes one
scalar ciphertext per statistic:

- squared norm ``||u||^2``,
- squared distance ``||u - v||^2``,
- inner product ``<u, r>`` with a reference direction ``r``.

Each statistic multiplies chunk by chunk and accumulates the degree-2
products, relinearizes once, runs one rotate-and-sum (log2(N/2) rotations)
and rescales once at the end. Rotating before the rescale keeps the key
switching noise at scale 2^80, where it is negligible. Measured on 10,000
values of magnitude 0.01: an absolute error of about 1e-9, against 2e-6 when
every product is rescaled first (TenSEAL's ``ckks_vector`` default). After
the rotate-and-sum every slot contains the statistic, so slot 0 is the value.

Serialized update (little-endian)::

    magic "FSSCORUP" | version u16 | fingerprint (32 bytes) | vector length u64
    | chunk count u32 | chunk count x chunk length u32 | chunks (seeded SEAL ciphertexts)
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
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
    VectorLengthError,
)
from crypto.ckks.scoring.context import ScoringPublicContext, ScoringSecretContext
from crypto.ckks.scoring.scalars import ScalarCiphertext

__all__ = [
    "DISTANCE",
    "INNER",
    "NORM",
    "STATISTICS",
    "ScoringUpdate",
    "chunk_products",
    "encrypt_for_scoring",
    "inner_product",
    "load_chunks",
    "relinearized_sum",
    "rotate_and_sum",
    "split_update",
    "squared_distance",
    "squared_norm",
]

logger = logging.getLogger(__name__)

NORM = "norm"
DISTANCE = "distance"
INNER = "inner"
STATISTICS = (NORM, DISTANCE, INNER)

_MAGIC = b"FSSCORUP"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sH32sQI")
_LENGTH = struct.Struct("<I")


def encrypt_for_scoring(
    context: ScoringSecretContext,
    update: Sequence[float] | np.ndarray,
    *,
    norm_bound: float | None = None,
) -> bytes:
    """Encrypt a flat update under the scoring key, one seeded ciphertext per N/2 values.

    Parameters
    ----------
    context : ScoringSecretContext
        The node's secret scoring context.
    update : sequence of float or numpy.ndarray
        The flat model update, finite values.
    norm_bound : float, optional
        If given, raise unless ``||update||_2 <= norm_bound``. Pass the bound
        that `check_scoring_bound` accepted, so no statistic can wrap.

    Returns
    -------
    bytes
        The serialized encrypted update, for `ScoringUpdate.from_bytes`.

    Raises
    ------
    ValueError
        If the update is empty or not finite.
    PreflightError
        If its norm exceeds `norm_bound`.
    """
    values = np.asarray(update, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(
            f"Scoring update must be a non-empty finite vector, got {values.size} values."
        )
    norm = float(np.linalg.norm(values))
    if norm_bound is not None and norm > norm_bound:
        raise PreflightError(
            f"Update has L2 norm {norm:.6g}, above the scoring norm bound {norm_bound:.6g}; "
            "clip it to the bound before encrypting."
        )

    preset = context.preset
    rows = np.zeros((math.ceil(values.size / preset.slot_count), preset.slot_count))
    rows.reshape(-1)[: values.size] = values
    plaintext = sealapi.Plaintext()
    chunks = []
    with SealBytesIO() as scratch:
        for row in rows:
            context.encoder.encode(row.tolist(), preset.scale, plaintext)
            chunks.append(scratch.save(context.encryptor.encrypt_symmetric(plaintext)))

    header = _HEADER.pack(
        _MAGIC,
        _FORMAT_VERSION,
        bytes.fromhex(context.fingerprint),
        values.size,
        len(chunks),
    )
    lengths = b"".join(_LENGTH.pack(len(chunk)) for chunk in chunks)
    return header + lengths + b"".join(chunks)


@dataclass
class ScoringUpdate:
    """One node's update under the scoring key, loaded as SEAL ciphertexts.

    Attributes
    ----------
    fingerprint : str
        Fingerprint of the scoring context it was encrypted under.
    length : int
        Number of values of the plaintext update.
    chunks : list
        SEAL ciphertexts, N/2 values each, zero-padded at the end.
    """

    fingerprint: str
    length: int
    chunks: list[Any]

    @classmethod
    def from_bytes(
        cls, context: ScoringPublicContext, data: bytes, expected_length: int
    ) -> ScoringUpdate:
        """Load an encrypted update and check it against the context and the model size.

        Parameters
        ----------
        context : ScoringPublicContext
            The scoring context the update must be encrypted under.
        data : bytes
            Output of `encrypt_for_scoring`.
        expected_length : int
            Number of model parameters.

        Raises
        ------
        MalformedBatchError, FingerprintMismatchError, VectorLengthError, ChunkCountError
            If the bytes are corrupted, under another key, or of the wrong size.
        """
        chunk_bytes = split_update(context, data, expected_length)

        # TODO: the server cannot check the norm bound of an encrypted update, so a node
        # whose ||u||^2 exceeds the headroom can make its statistics wrap to a chosen
        # small value; a range check on the encrypted update is still to build.
        chunks = load_chunks(context, chunk_bytes)
        return cls(
            fingerprint=context.fingerprint, length=expected_length, chunks=chunks
        )


def split_update(
    context: ScoringPublicContext, data: bytes, expected_length: int
) -> list[bytes]:
    """Check an encrypted update's header against the context and return its chunks' bytes.

    Parameters
    ----------
    context : ScoringPublicContext
        The scoring context the update must be encrypted under.
    data : bytes
        Output of `encrypt_for_scoring`.
    expected_length : int
        Number of model parameters.

    Raises
    ------
    MalformedBatchError, FingerprintMismatchError, VectorLengthError, ChunkCountError
        If the bytes are corrupted, under another key, or of the wrong size.
    """
    fingerprint, length, lengths, offset = _parse_header(data)
    if fingerprint != context.fingerprint:
        raise FingerprintMismatchError(
            f"Scoring update was encrypted under context {fingerprint[:16]}, but the server "
            f"scores under {context.fingerprint[:16]}; the node must use the current scoring key."
        )
    if length != expected_length:
        raise VectorLengthError(
            f"Scoring update has {length} values, expected {expected_length}."
        )
    expected_chunks = math.ceil(length / context.preset.slot_count)
    if len(lengths) != expected_chunks:
        raise ChunkCountError(
            f"Scoring update has {len(lengths)} chunks, expected {expected_chunks}."
        )

    chunks = []
    for size in lengths:
        chunks.append(bytes(data[offset : offset + size]))
        offset += size
    return chunks


def load_chunks(
    context: ScoringPublicContext, chunk_bytes: Sequence[bytes], first_index: int = 0
) -> list[Any]:
    """Load chunk bytes as SEAL ciphertexts, checking that each one is fresh.

    Parameters
    ----------
    context : ScoringPublicContext
        The scoring context.
    chunk_bytes : sequence of bytes
        Chunks from `split_update`.
    first_index : int, default 0
        Index of the first chunk in the update, for error messages.

    Raises
    ------
    MalformedBatchError
        If a chunk does not load or is not a fresh ciphertext of the preset.
    """
    with SealBytesIO() as scratch:
        return [
            _load_fresh(context, scratch, first_index + i, chunk)
            for i, chunk in enumerate(chunk_bytes)
        ]


def _parse_header(data: bytes) -> tuple[str, int, list[int], int]:
    """Return (fingerprint, length, chunk lengths, offset of the first chunk)."""
    if not isinstance(data, bytes | bytearray) or len(data) < _HEADER.size:
        raise MalformedBatchError(
            "Scoring update is not bytes or is shorter than its header."
        )
    magic, version, fingerprint, length, count = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _FORMAT_VERSION:
        raise MalformedBatchError(
            f"Not a scoring update of version {_FORMAT_VERSION}: magic {magic!r}, version {version}."
        )

    offset = _HEADER.size + count * _LENGTH.size
    if len(data) < offset:
        raise MalformedBatchError(
            f"Scoring update declares {count} chunks but its length table is truncated."
        )
    lengths = [
        _LENGTH.unpack_from(data, _HEADER.size + i * _LENGTH.size)[0]
        for i in range(count)
    ]
    if len(data) != offset + sum(lengths):
        raise MalformedBatchError(
            f"Scoring update has {len(data)} bytes, but its header declares {offset + sum(lengths)}."
        )
    return fingerprint.hex(), length, lengths, offset


def _load_fresh(
    context: ScoringPublicContext, scratch: SealBytesIO, index: int, chunk: bytes
) -> Any:
    """Load one chunk and check that it is a fresh ciphertext of this preset."""
    ciphertext = sealapi.Ciphertext()
    try:
        scratch.load(ciphertext, chunk, context.seal_context)
    except (RuntimeError, ValueError) as error:
        raise MalformedBatchError(
            f"Scoring chunk {index} is not a valid SEAL ciphertext: {error}."
        ) from error

    first = context.seal_context.first_parms_id()
    if (
        ciphertext.parms_id() != first
        or ciphertext.size() != 2
        or ciphertext.scale != context.preset.scale
    ):
        raise MalformedBatchError(
            f"Scoring chunk {index} is not fresh: size {ciphertext.size()}, scale {ciphertext.scale:.6g}; "
            f"expected size 2 at scale 2^{context.preset.scale_bits} on the first level."
        )
    return ciphertext


def squared_norm(
    context: ScoringPublicContext, update: ScoringUpdate
) -> ScalarCiphertext:
    """Compute Enc(||u||^2) in every slot.

    Parameters
    ----------
    context : ScoringPublicContext
        Public scoring context with relinearization and Galois keys.
    update : ScoringUpdate
        The encrypted update u.
    """
    _check_same_key(context, update)
    products = chunk_products(context, NORM, update.chunks, update.chunks)
    return rotate_and_sum(context, _require(relinearized_sum(context, products)))


def squared_distance(
    context: ScoringPublicContext, first: ScoringUpdate, second: ScoringUpdate
) -> ScalarCiphertext:
    """Compute Enc(||u - v||^2) in every slot.

    Parameters
    ----------
    context : ScoringPublicContext
        Public scoring context with relinearization and Galois keys.
    first, second : ScoringUpdate
        The encrypted updates u and v, of equal length.

    Raises
    ------
    ValueError
        If every chunk of u equals the one of v (a duplicate upload).
    """
    _check_pair(context, first, second)
    products = chunk_products(context, DISTANCE, first.chunks, second.chunks)
    return rotate_and_sum(context, _require(relinearized_sum(context, products)))


def inner_product(
    context: ScoringPublicContext, update: ScoringUpdate, reference: ScoringUpdate
) -> ScalarCiphertext:
    """Compute Enc(<u, r>) in every slot.

    Parameters
    ----------
    context : ScoringPublicContext
        Public scoring context with relinearization and Galois keys.
    update : ScoringUpdate
        The encrypted update u.
    reference : ScoringUpdate
        The encrypted reference direction r, a fresh ciphertext of equal length.
        A previous aggregate computed under this preset has no level left for
        a multiplication, so the reference must be freshly encrypted by a key
        holder (the validator node).
    """
    _check_pair(context, update, reference)
    products = chunk_products(context, INNER, update.chunks, reference.chunks)
    return rotate_and_sum(context, _require(relinearized_sum(context, products)))


def chunk_products(
    context: ScoringPublicContext,
    kind: str,
    first: Sequence[Any],
    second: Sequence[Any],
) -> Iterator[Any]:
    """Yield the degree-2 product of each chunk pair for one statistic.

    Parameters
    ----------
    context : ScoringPublicContext
        Public scoring context.
    kind : str
        ``"norm"`` (squares of `first`), ``"distance"`` (squares of the
        differences) or ``"inner"`` (products).
    first, second : sequence of sealapi.Ciphertext
        Fresh chunks of equal count; `second` is ignored for ``"norm"``.
    """
    if kind not in STATISTICS:
        raise ValueError(f"Unknown statistic {kind!r}; expected one of {STATISTICS}.")
    evaluator = context.evaluator

    for left, right in zip(first, second, strict=True):
        product = sealapi.Ciphertext()
        if kind == NORM:
            evaluator.square(left, product)
        elif kind == INNER:
            evaluator.multiply(left, right, product)
        else:
            try:
                evaluator.sub(left, right, product)
            except RuntimeError as error:
                # SEAL raises when a result is transparent: equal chunks differ by
                # exactly zero, so they add nothing to the distance.
                if "transparent" not in str(error):
                    raise
                continue
            evaluator.square_inplace(product)
        yield product


def relinearized_sum(
    context: ScoringPublicContext, products: Iterable[Any]
) -> Any | None:
    """Add degree-2 products and relinearize the sum once; None when there are none."""
    evaluator = context.evaluator
    iterator = iter(products)
    total = next(iterator, None)
    if total is None:
        return None

    for product in iterator:
        evaluator.add_inplace(total, product)
    evaluator.relinearize_inplace(total, context.relin_keys)
    return total


def rotate_and_sum(context: ScoringPublicContext, total: Any) -> ScalarCiphertext:
    """Sum all slots of a relinearized ciphertext into every slot, then rescale once.

    Rotating before the rescale keeps the key switching noise at scale 2^80.
    """
    evaluator = context.evaluator
    rotated = sealapi.Ciphertext()
    for step in context.preset.rotation_steps:
        evaluator.rotate_vector(total, step, context.galois_keys, rotated)
        evaluator.add_inplace(total, rotated)

    # The rescale drops the 40-bit prime, which halves the scalar's size.
    evaluator.rescale_to_next_inplace(total)
    return ScalarCiphertext(fingerprint=context.fingerprint, ciphertext=total)


def _require(total: Any | None) -> Any:
    """Return a relinearized sum, or raise when no chunk contributed (identical updates)."""
    if total is None:
        raise ValueError(
            "The two scoring updates are identical ciphertexts, so their distance is exactly 0, "
            "which SEAL cannot encrypt without a key; reject the duplicate upload before scoring."
        )
    return total


def _check_same_key(context: ScoringPublicContext, update: ScoringUpdate) -> None:
    if update.fingerprint != context.fingerprint:
        raise FingerprintMismatchError(
            f"Scoring update is under context {update.fingerprint[:16]}, not {context.fingerprint[:16]}."
        )


def _check_pair(
    context: ScoringPublicContext, first: ScoringUpdate, second: ScoringUpdate
) -> None:
    _check_same_key(context, first)
    _check_same_key(context, second)
    if first.length != second.length:
        raise VectorLengthError(
            f"Cannot combine scoring updates of {first.length} and {second.length} values."
        )

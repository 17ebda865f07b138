"""Encrypt weighted updates, validate and sum them on the server, decrypt the sum.

Encoding contract
-----------------
A node passes its flattened update ``u_i`` (float32 or float64) and a weight
``w_i`` to `encrypt_update`, which encrypts ``w_i * u_i``. The server only adds
ciphertexts. `decrypt_sum` returns ``sum_i w_i * u_i`` as float64 of the
original length. Call `crypto.ckks.params.preflight` once with the node count,
norm bound and weights: CKKS sums that outgrow the modulus wrap silently.

Batch format
------------
A batch is ``list[bytes]``, so it fits a Flower ConfigRecord value. Element 0
is a header, and element ``k + 1`` is chunk ``k``, one ciphertext of
``preset.values_per_chunk`` values (the last chunk is zero-padded)::

    header: magic "FSCKKSBT" | version u16 | preset wire id u16 | kind u8
            | update count u32 | context fingerprint (32 bytes, SHA-256)
            | vector length u64 | chunk count u32 | CRC-32 of the fields before, u32
    chunk:  chunk index u32 | CRC-32 of the payload u32 | payload

Integers are little-endian. Kind 1 is one node's upload, kind 2 a sum of
``update count`` uploads. The payload is a SEAL ciphertext (``compact``,
seeded in uploads and full in sums) or a serialized ``ts.CKKSVector``
(``tenseal_default``). The CRCs catch truncated and corrupted bytes, not
tampering, and the fingerprint catches batches made under another key by
mistake. A node with the secret key can still forge a batch that passes every
check, so authenticate the sender elsewhere.

Validation and summation
------------------------
`validate_batch` checks one batch completely, loading every ciphertext, and
returns an `EncryptedUpdate`. `sum_updates` adds validated updates, so that
path loads each ciphertext twice. `aggregate_batches` validates and sums in
one pass, rejects each bad batch with its `CkksError` and sums the others, so
the server should prefer it.

Parallelism
-----------
TenSEAL 0.3.18's bindings keep the Python GIL during SEAL calls, so threads do
not help. A `CkksWorkerPool` spreads chunk ranges over worker processes, and
data travels through RAM-backed files rather than pipes. On a two-core machine
with one other busy process, two workers cut the wall time of encryption and
summation to about 60 % of one process, for about 10 % more CPU time in all
(measured at 1M parameters). They gain nothing when other jobs keep both cores
busy. Every function takes ``pool=None`` for in-process work.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from crypto.ckks.context import PublicContext, SealBytesIO, SecretContext, scratch_directory
from crypto.ckks.errors import (
    ChunkCountError,
    CkksError,
    FingerprintMismatchError,
    MalformedBatchError,
    ParameterMismatchError,
    PreflightError,
    SecretKeyRequiredError,
    VectorLengthError,
)
from crypto.ckks.params import BACKEND_SEALAPI, SAFETY_MARGIN, Preset, preset_by_wire_id

__all__ = [
    "KIND_AGGREGATE",
    "KIND_UPLOAD",
    "AggregationResult",
    "BatchHeader",
    "CkksWorkerPool",
    "EncryptedUpdate",
    "aggregate_batches",
    "chunk_count",
    "decrypt_sum",
    "encrypt_update",
    "read_header",
    "sum_updates",
    "validate_batch",
]

logger = logging.getLogger(__name__)

KIND_UPLOAD = 1
KIND_AGGREGATE = 2

_BATCH_MAGIC = b"FSCKKSBT"
_BATCH_VERSION = 1
_HEADER_FIELDS = struct.Struct("<8sHHBI32sQI")
_HEADER_CRC = struct.Struct("<I")
_HEADER_SIZE = _HEADER_FIELDS.size + _HEADER_CRC.size
_CHUNK_FRAME = struct.Struct("<II")

# Upper bounds on the work in one worker task. Tasks are written to files
# only when a worker is about to need them, so these also bound the memory
# that large models and many batches take in transit.
_MAX_TASK_BYTES = 64 * 2**20
_MAX_TASK_CHUNKS = 64


@dataclass(frozen=True)
class BatchHeader:
    """Decoded batch header.

    Attributes
    ----------
    preset : Preset
        Preset the chunks were encrypted with.
    kind : int
        `KIND_UPLOAD` or `KIND_AGGREGATE`.
    update_count : int
        Number of uploads summed into the batch, as reported by its sender.
    fingerprint : str
        SHA-256 hex digest of the public context the batch was made under.
    vector_length : int
        Number of real values encrypted.
    chunk_count : int
        Number of ciphertext chunks after the header.
    """

    preset: Preset
    kind: int
    update_count: int
    fingerprint: str
    vector_length: int
    chunk_count: int

    def pack(self) -> bytes:
        """Serialize the header, CRC included."""
        fields = _HEADER_FIELDS.pack(
            _BATCH_MAGIC,
            _BATCH_VERSION,
            self.preset.wire_id,
            self.kind,
            self.update_count,
            bytes.fromhex(self.fingerprint),
            self.vector_length,
            self.chunk_count,
        )
        return fields + _HEADER_CRC.pack(zlib.crc32(fields))


@dataclass(frozen=True)
class EncryptedUpdate:
    """A batch that passed `validate_batch`, ready for `sum_updates`.

    Attributes
    ----------
    context : PublicContext
        Context the batch was validated against.
    header : BatchHeader
        Its decoded header.
    chunks : tuple of bytes
        Its framed chunks, as received.
    """

    context: PublicContext
    header: BatchHeader
    chunks: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of `aggregate_batches`.

    Attributes
    ----------
    batch : list of bytes or None
        The encrypted sum of the accepted batches; None if none was accepted.
    accepted : tuple of int
        Positions of the summed batches in the input.
    rejected : dict of int to CkksError
        Position and error of each rejected batch.
    """

    batch: list[bytes] | None
    accepted: tuple[int, ...]
    rejected: dict[int, CkksError]


def chunk_count(preset: Preset, vector_length: int) -> int:
    """Return the number of ciphertexts that carry a vector of this length."""
    return math.ceil(vector_length / preset.values_per_chunk)


# --- Encryption ---------------------------------------------------------------


def encrypt_update(
    context: SecretContext,
    update: np.ndarray,
    weight: float = 1.0,
    *,
    norm_bound: float | None = None,
    pool: CkksWorkerPool | None = None,
) -> list[bytes]:
    """Encrypt ``weight * update`` as an upload batch.

    Parameters
    ----------
    context : SecretContext
        The node's secret context (uploads are symmetric encryptions).
    update : numpy.ndarray
        Flattened 1-D float32 or float64 update of length >= 1, finite.
    weight : float, default 1.0
        Aggregation weight w_i >= 0 of this node, multiplied in before encryption.
    norm_bound : float, optional
        If given, the L2 norm of `update` must not exceed it; pass the bound
        used in `preflight`.
    pool : CkksWorkerPool, optional
        Worker processes built from the same secret context.

    Returns
    -------
    list of bytes
        The batch: header, then one framed ciphertext per chunk.

    Raises
    ------
    SecretKeyRequiredError
        If `context` is a `PublicContext`.
    PreflightError
        If the weighted update alone is too large for the preset's headroom.
    ValueError
        If the update or weight is invalid, or the update exceeds `norm_bound`.
    """
    # TODO: 1M values take about 0.18 s per node on 2 shared cores, so ten
    # encryptions keep a 10-node round near 2.5 s; profile serialization and framing.
    context = _require_secret(context, "encrypt_update")
    values = _weighted_values(context.preset, update, weight, norm_bound)
    rows = _pad_to_chunks(context.preset, values)

    if pool is None:
        chunks = _encrypt_rows(context, 0, rows)
    else:
        _check_pool(pool, context, needs_secret=True)
        chunks = pool.encrypt_rows(rows)

    header = BatchHeader(
        preset=context.preset,
        kind=KIND_UPLOAD,
        update_count=1,
        fingerprint=context.fingerprint,
        vector_length=values.size,
        chunk_count=len(chunks),
    )
    batch = [header.pack(), *chunks]
    logger.debug(
        "encrypt_update: %d values in %d chunks, %d bytes",
        values.size,
        len(chunks),
        sum(len(part) for part in batch),
    )
    return batch


def _weighted_values(
    preset: Preset, update: np.ndarray, weight: float, norm_bound: float | None
) -> np.ndarray:
    """Check an update and its weight and return ``weight * update`` as float64."""
    values = np.asarray(update)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"update must be a non-empty 1-D array, got shape {values.shape}; flatten the "
            "parameters first, e.g. np.concatenate([p.ravel() for p in arrays])."
        )

    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"update must be float32 or float64, got dtype {values.dtype}.")

    if not np.all(np.isfinite(values)):
        raise ValueError("update contains NaN or infinite values; fix the training step.")

    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}.")

    values = values.astype(np.float64)
    if norm_bound is not None:
        norm = float(np.linalg.norm(values))
        # The relative slack absorbs float32 rounding in the caller's clipping.
        if norm > norm_bound * (1 + 1e-5):
            raise ValueError(
                f"update has L2 norm {norm:.6g}, above norm_bound {norm_bound:.6g}; clip "
                "the update to the norm bound before encrypting."
            )

    scaled = weight * values
    limit = preset.headroom() / (preset.packing_factor * SAFETY_MARGIN)
    largest = float(np.max(np.abs(scaled)))
    if largest > limit:
        raise PreflightError(
            f"Weighted update has a coordinate of magnitude {largest:.6g}, above the "
            f"{limit:.6g} that preset {preset.name!r} can sum without wrapping; lower the "
            "weight or clip the update, and run preflight with the same bounds."
        )
    return scaled


def _pad_to_chunks(preset: Preset, values: np.ndarray) -> np.ndarray:
    """Zero-pad values to whole chunks; return shape (chunks, values_per_chunk)."""
    width = preset.values_per_chunk
    rows = np.zeros((chunk_count(preset, values.size), width), dtype=np.float64)
    rows.reshape(-1)[: values.size] = values
    return rows


def _encrypt_rows(context: SecretContext, first_index: int, rows: np.ndarray) -> list[bytes]:
    """Encrypt each row as one framed chunk, numbering chunks from `first_index`."""
    preset = context.preset
    chunks = []

    if preset.backend == BACKEND_SEALAPI:
        # Complex packing: values 2k and 2k+1 of a row become the real and
        # imaginary parts of slot k, which a complex128 view gives without a copy.
        slots = np.ascontiguousarray(rows).view(np.complex128)
        plaintext = sealapi.Plaintext()
        with SealBytesIO() as scratch:
            for offset, row in enumerate(slots):
                context.encoder.encode(row.tolist(), preset.scale, plaintext)
                ciphertext = context.encryptor.encrypt_symmetric(plaintext)
                chunks.append(_frame(first_index + offset, scratch.save(ciphertext)))
    else:
        for offset, row in enumerate(rows):
            vector = ts.ckks_vector(context.tenseal_context, row.tolist())
            chunks.append(_frame(first_index + offset, vector.serialize()))

    return chunks


# --- Batch header and chunk frames ----------------------------------------------


def read_header(batch: Sequence[bytes]) -> BatchHeader:
    """Decode and check the header of a batch, without comparing it to a context.

    Raises
    ------
    MalformedBatchError
        If the batch is not a list of bytes or its header is truncated, corrupted
        or of another format version.
    ParameterMismatchError
        If the header names a preset that is not registered.
    """
    if not isinstance(batch, list | tuple):
        raise MalformedBatchError(
            f"A batch must be a list of bytes (header first), got {type(batch).__name__}."
        )

    if not batch:
        raise MalformedBatchError("Batch is empty; it needs at least the header.")

    for index, element in enumerate(batch):
        if not isinstance(element, bytes | bytearray):
            raise MalformedBatchError(
                f"Batch element {index} is {type(element).__name__}, expected bytes."
            )

    raw = bytes(batch[0])
    if len(raw) != _HEADER_SIZE:
        raise MalformedBatchError(
            f"Batch header has {len(raw)} bytes, expected {_HEADER_SIZE}; it is truncated "
            "or not a CKKS batch."
        )

    fields = raw[: _HEADER_FIELDS.size]
    (crc,) = _HEADER_CRC.unpack(raw[_HEADER_FIELDS.size :])
    magic, version, wire_id, kind, update_count, fingerprint, length, chunks = (
        _HEADER_FIELDS.unpack(fields)
    )
    if magic != _BATCH_MAGIC:
        raise MalformedBatchError(
            f"Batch header magic is {magic!r}, expected {_BATCH_MAGIC!r}; not a CKKS batch."
        )

    if version != _BATCH_VERSION:
        raise MalformedBatchError(
            f"Unsupported batch format version {version}; this code reads version "
            f"{_BATCH_VERSION}."
        )

    if zlib.crc32(fields) != crc:
        raise MalformedBatchError("Batch header CRC does not match; the header is corrupted.")

    preset = preset_by_wire_id(wire_id)
    if preset is None:
        raise ParameterMismatchError(
            f"Batch names preset wire id {wire_id}, which no registered preset has."
        )

    if kind not in (KIND_UPLOAD, KIND_AGGREGATE) or update_count < 1:
        raise MalformedBatchError(
            f"Batch header has kind {kind} and update count {update_count}; expected kind "
            f"{KIND_UPLOAD} or {KIND_AGGREGATE} and a count >= 1."
        )

    return BatchHeader(preset, kind, update_count, fingerprint.hex(), length, chunks)


def _check_header(
    batch: Sequence[bytes], context: PublicContext, expected_length: int
) -> BatchHeader:
    """Decode a batch header and check it against the context and expected length."""
    header = read_header(batch)
    preset = context.preset

    if header.preset != preset:
        raise ParameterMismatchError(
            f"Batch was encrypted with preset {header.preset.name!r}, but the context uses "
            f"{preset.name!r}; every node must use the server's preset."
        )

    if header.fingerprint != context.fingerprint:
        raise FingerprintMismatchError(
            f"Batch was encrypted under context {header.fingerprint[:16]}..., but the "
            f"server's context is {context.fingerprint[:16]}...; the node must use the "
            "secret context that matches the server's public context."
        )

    if header.vector_length != expected_length:
        raise VectorLengthError(
            f"Batch encrypts {header.vector_length} values, expected {expected_length}; the "
            "node's model does not match the server's."
        )

    expected_chunks = chunk_count(preset, expected_length)
    if header.chunk_count != expected_chunks:
        raise ChunkCountError(
            f"Batch header declares {header.chunk_count} chunks, but {expected_length} values "
            f"need {expected_chunks} with preset {preset.name!r}."
        )

    if len(batch) - 1 != expected_chunks:
        raise ChunkCountError(
            f"Batch has {len(batch) - 1} chunks after the header, expected "
            f"{expected_chunks}; chunks were dropped or added in transit."
        )

    return header


def _frame(index: int, payload: bytes) -> bytes:
    """Prefix a ciphertext payload with its chunk index and CRC-32."""
    return _CHUNK_FRAME.pack(index, zlib.crc32(payload)) + payload


def _unframe(index: int, chunk: bytes) -> bytes:
    """Check a framed chunk's index and CRC-32 and return its payload."""
    if len(chunk) <= _CHUNK_FRAME.size:
        raise MalformedBatchError(f"Chunk {index} has only {len(chunk)} bytes; it is truncated.")

    found_index, crc = _CHUNK_FRAME.unpack_from(chunk)
    payload = chunk[_CHUNK_FRAME.size :]
    if found_index != index:
        raise MalformedBatchError(
            f"Chunk at position {index} carries index {found_index}; chunks were reordered."
        )

    if zlib.crc32(payload) != crc:
        raise MalformedBatchError(
            f"Chunk {index} CRC does not match; its bytes are truncated or corrupted."
        )
    return payload


# --- Loading, adding and saving ciphertexts ---------------------------------------


def _load_chunk(context: PublicContext, scratch: SealBytesIO, index: int, chunk: bytes) -> Any:
    """Unframe and load one chunk, checking it fits the context; return the ciphertext."""
    payload = _unframe(index, chunk)
    preset = context.preset

    if preset.backend == BACKEND_SEALAPI:
        ciphertext = sealapi.Ciphertext()
        try:
            scratch.load(ciphertext, payload, context.seal_context)
        except (RuntimeError, ValueError) as error:
            raise MalformedBatchError(
                f"Chunk {index} is not a valid ciphertext for this context: SEAL reported "
                f"{error}."
            ) from error
        seal_ciphertext = ciphertext
    else:
        try:
            ciphertext = ts.ckks_vector_from(context.tenseal_context, payload)
        except (RuntimeError, ValueError) as error:
            raise MalformedBatchError(
                f"Chunk {index} is not a valid CKKS vector for this context: TenSEAL reported "
                f"{error}."
            ) from error

        if ciphertext.size() != preset.values_per_chunk or len(ciphertext.ciphertext()) != 1:
            raise MalformedBatchError(
                f"Chunk {index} contains {ciphertext.size()} values, expected "
                f"{preset.values_per_chunk} in one ciphertext."
            )
        seal_ciphertext = ciphertext.ciphertext()[0]

    _check_ciphertext(context, index, seal_ciphertext)
    return ciphertext


def _check_ciphertext(context: PublicContext, index: int, ciphertext: Any) -> None:
    """Raise unless a loaded SEAL ciphertext has the context's level, scale and size."""
    if tuple(ciphertext.parms_id()) != context.parms_id:
        raise ParameterMismatchError(
            f"Chunk {index} was encrypted at another modulus level or with other "
            "parameters (parms_id differs from the context's)."
        )

    if ciphertext.scale != context.preset.scale:
        raise ParameterMismatchError(
            f"Chunk {index} has scale {ciphertext.scale:.6g}, expected "
            f"2^{context.preset.scale_bits}."
        )

    if ciphertext.size() != 2 or not ciphertext.is_ntt_form():
        raise MalformedBatchError(
            f"Chunk {index} has {ciphertext.size()} polynomials, expected 2 in NTT form."
        )


def _add_into(context: PublicContext, accumulator: Any, ciphertext: Any) -> None:
    """Add a loaded ciphertext into an accumulator of the same backend."""
    if context.preset.backend == BACKEND_SEALAPI:
        context.evaluator.add_inplace(accumulator, ciphertext)
    else:
        accumulator.add_(ciphertext)


def _save_chunk(context: PublicContext, scratch: SealBytesIO, index: int, ciphertext: Any) -> bytes:
    """Serialize and frame a loaded or summed ciphertext."""
    if context.preset.backend == BACKEND_SEALAPI:
        return _frame(index, scratch.save(ciphertext))
    return _frame(index, ciphertext.serialize())


# --- Validation and summation -----------------------------------------------------


def validate_batch(
    batch: Sequence[bytes],
    context: PublicContext | SecretContext,
    expected_length: int,
) -> EncryptedUpdate:
    """Check a received batch completely and return it as an `EncryptedUpdate`.

    The checks run in this order: the container and header (format, version,
    CRC), the preset, the context fingerprint, the vector length and the chunk
    count. Then, for every chunk: its index, its CRC, a SEAL or TenSEAL load,
    the parms_id, the scale and the ciphertext size.

    Parameters
    ----------
    batch : list of bytes
        Batch as produced by `encrypt_update` or `sum_updates`.
    context : PublicContext or SecretContext
        Context the batch must have been made under.
    expected_length : int
        Number of values the batch must encrypt, >= 1.

    Raises
    ------
    CkksError
        A subclass naming the failed check; see `crypto.ckks.errors`.
    """
    public = _public_of(context)
    _check_expected_length(expected_length)
    header = _check_header(batch, public, expected_length)

    with SealBytesIO() as scratch:
        for index, chunk in enumerate(batch[1:]):
            _load_chunk(public, scratch, index, bytes(chunk))

    return EncryptedUpdate(context=public, header=header, chunks=tuple(batch[1:]))


def sum_updates(
    updates: Sequence[EncryptedUpdate], *, pool: CkksWorkerPool | None = None
) -> list[bytes]:
    """Add validated updates and return their encrypted sum as a batch.

    Every ciphertext is loaded again here; `aggregate_batches` avoids that.

    Raises
    ------
    ValueError
        If `updates` is empty or mixes contexts or vector lengths.
    """
    if not updates:
        raise ValueError("sum_updates needs at least one EncryptedUpdate.")

    first = updates[0]
    for position, update in enumerate(updates):
        if (
            update.context.fingerprint != first.context.fingerprint
            or update.header.vector_length != first.header.vector_length
        ):
            raise ValueError(
                f"Update {position} was validated against another context or vector length "
                "than update 0; sum updates of one round and one context only."
            )

    chunks, failures = _sum_chunks(first.context, [list(u.chunks) for u in updates], pool)
    if failures:
        position, error = next(iter(failures.items()))
        raise ValueError(
            f"Update {position} no longer loads ({error.reason}); it changed after validation."
        )

    update_count = sum(update.header.update_count for update in updates)
    return _aggregate_batch(first.context, first.header.vector_length, update_count, chunks)


def aggregate_batches(
    batches: Sequence[Sequence[bytes]],
    context: PublicContext | SecretContext,
    expected_length: int,
    *,
    pool: CkksWorkerPool | None = None,
) -> AggregationResult:
    """Validate received batches and sum the valid ones in one pass.

    A batch that fails any check of `validate_batch` is left out and reported
    in ``rejected``; it never stops the others from being summed. Each
    rejection is logged at WARNING with the batch position and the reason.

    Parameters
    ----------
    batches : sequence of list of bytes
        One batch per node, as received.
    context : PublicContext or SecretContext
        Context every batch must have been made under.
    expected_length : int
        Number of values every batch must encrypt, >= 1.
    pool : CkksWorkerPool, optional
        Worker processes built from the same context.

    Returns
    -------
    AggregationResult
        The encrypted sum, with the accepted and rejected positions.
    """
    public = _public_of(context)
    _check_expected_length(expected_length)
    rejected: dict[int, CkksError] = {}
    candidates: dict[int, BatchHeader] = {}

    for position, batch in enumerate(batches):
        try:
            candidates[position] = _check_header(batch, public, expected_length)
        except CkksError as error:
            rejected[position] = error

    # A batch that fails in one chunk range may already be summed in another,
    # so sum again without it until every range accepts the same batches.
    chunks: list[bytes] = []
    while candidates:
        positions = list(candidates)
        chunk_lists = [list(batches[position][1:]) for position in positions]
        chunks, failures = _sum_chunks(public, chunk_lists, pool)
        for local_position, error in failures.items():
            position = positions[local_position]
            rejected[position] = error
            del candidates[position]
        # Without a pool there is one range, so the sum already leaves them out.
        if not failures or pool is None:
            break

    rejected = dict(sorted(rejected.items()))
    for position, error in rejected.items():
        logger.warning(
            "aggregate_batches: rejected batch %d: %s: %s",
            position,
            type(error).__name__,
            error.reason,
        )

    accepted = tuple(sorted(candidates))
    batch = None
    if accepted:
        update_count = sum(candidates[position].update_count for position in accepted)
        batch = _aggregate_batch(public, expected_length, update_count, chunks)

    logger.info(
        "aggregate_batches: summed %d of %d batches, %d rejected",
        len(accepted),
        len(batches),
        len(rejected),
    )
    return AggregationResult(batch=batch, accepted=accepted, rejected=rejected)


def _aggregate_batch(
    context: PublicContext, vector_length: int, update_count: int, chunks: list[bytes]
) -> list[bytes]:
    """Put a header of kind aggregate in front of summed chunks."""
    header = BatchHeader(
        preset=context.preset,
        kind=KIND_AGGREGATE,
        update_count=update_count,
        fingerprint=context.fingerprint,
        vector_length=vector_length,
        chunk_count=len(chunks),
    )
    return [header.pack(), *chunks]


def _sum_chunks(
    context: PublicContext,
    chunk_lists: list[list[bytes]],
    pool: CkksWorkerPool | None,
) -> tuple[list[bytes], dict[int, CkksError]]:
    """Sum the chunks of several batches; return (summed chunks, failures by batch)."""
    if pool is None:
        return _sum_range(context, 0, chunk_lists)

    _check_pool(pool, context, needs_secret=False)
    return pool.sum_chunks(chunk_lists)


def _sum_range(
    context: PublicContext, first_index: int, chunk_lists: list[list[bytes]]
) -> tuple[list[bytes], dict[int, CkksError]]:
    """Sum one chunk range of several batches.

    Each batch's chunks in the range are all loaded before any is added, so a
    batch that fails is left out of this range entirely.
    """
    accumulators: list[Any] | None = None
    failures: dict[int, CkksError] = {}

    with SealBytesIO() as scratch:
        for position, chunks in enumerate(chunk_lists):
            try:
                loaded = [
                    _load_chunk(context, scratch, first_index + offset, bytes(chunk))
                    for offset, chunk in enumerate(chunks)
                ]
            except CkksError as error:
                failures[position] = error
                continue

            if accumulators is None:
                accumulators = loaded
            else:
                for accumulator, ciphertext in zip(accumulators, loaded, strict=True):
                    _add_into(context, accumulator, ciphertext)

        if accumulators is None:
            return [], failures

        summed = [
            _save_chunk(context, scratch, first_index + offset, accumulator)
            for offset, accumulator in enumerate(accumulators)
        ]
    return summed, failures


# --- Decryption -------------------------------------------------------------------


def decrypt_sum(
    context: SecretContext | PublicContext,
    batch: Sequence[bytes],
    expected_length: int,
    *,
    pool: CkksWorkerPool | None = None,
) -> np.ndarray:
    """Decrypt a batch (normally the aggregate) into a float64 vector.

    The batch is validated like `validate_batch` first, since it comes back
    from the server.

    Returns
    -------
    numpy.ndarray
        float64 array of `expected_length` values, ``sum_i w_i * u_i``.

    Raises
    ------
    SecretKeyRequiredError
        If `context` is a `PublicContext`, which cannot decrypt.
    CkksError
        A subclass naming the failed check, as in `validate_batch`.
    """
    context = _require_secret(context, "decrypt_sum")
    _check_expected_length(expected_length)
    _check_header(batch, context.public, expected_length)
    chunks = [bytes(chunk) for chunk in batch[1:]]

    if pool is None:
        rows = _decrypt_range(context, 0, chunks)
    else:
        _check_pool(pool, context, needs_secret=True)
        rows = pool.decrypt_chunks(chunks)

    return rows.reshape(-1)[:expected_length].copy()


def _decrypt_range(context: SecretContext, first_index: int, chunks: list[bytes]) -> np.ndarray:
    """Decrypt framed chunks; return an array of shape (chunks, values_per_chunk)."""
    preset = context.preset
    rows = np.empty((len(chunks), preset.values_per_chunk), dtype=np.float64)
    plaintext = sealapi.Plaintext()

    with SealBytesIO() as scratch:
        for offset, chunk in enumerate(chunks):
            ciphertext = _load_chunk(context.public, scratch, first_index + offset, chunk)
            if preset.backend == BACKEND_SEALAPI:
                context.decryptor.decrypt(ciphertext, plaintext)
                slots = np.asarray(context.encoder.decode_complex(plaintext), dtype=np.complex128)
                rows[offset] = slots.view(np.float64)
            else:
                ciphertext.link_context(context.tenseal_context)
                rows[offset] = ciphertext.decrypt()

    return rows


# --- Contexts and worker processes -------------------------------------------------


def _public_of(context: PublicContext | SecretContext) -> PublicContext:
    """Return the public part of a context."""
    if isinstance(context, SecretContext):
        return context.public
    if isinstance(context, PublicContext):
        return context
    raise TypeError(f"Expected a PublicContext or SecretContext, got {type(context).__name__}.")


def _require_secret(context: SecretContext | PublicContext, operation: str) -> SecretContext:
    """Return the context if it has the secret key, else raise SecretKeyRequiredError."""
    if isinstance(context, SecretContext):
        return context

    if isinstance(context, PublicContext):
        raise SecretKeyRequiredError(
            f"{operation} needs the secret key, but got a PublicContext (fingerprint "
            f"{context.fingerprint[:16]}...), which has none. Run it on a node with the "
            "context from read_secret_context."
        )
    raise TypeError(f"Expected a SecretContext, got {type(context).__name__}.")


def _check_expected_length(expected_length: int) -> None:
    """Raise ValueError unless the expected vector length is a positive integer."""
    valid = isinstance(expected_length, int) and not isinstance(expected_length, bool)
    if not valid or expected_length < 1:
        raise ValueError(f"expected_length must be an integer >= 1, got {expected_length!r}.")


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """Split range(total) into at most `parts` contiguous, non-empty (start, stop) pairs."""
    parts = max(1, min(parts, total))
    bounds = [round(part * total / parts) for part in range(parts + 1)]
    return [(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


class CkksWorkerPool:
    """Worker processes that encrypt, sum or decrypt chunk ranges in parallel.

    Each worker rebuilds the context once from its serialized bytes, which
    travel through the process pipe. A pool built from a `SecretContext`
    therefore hands the secret key to its workers. Start the pool once and
    reuse it across rounds, because the constructor waits until every worker
    has started, which takes about a second.

    Parameters
    ----------
    context : PublicContext or SecretContext
        Context the workers use. Encryption and decryption need a `SecretContext`.
    workers : int, default 2
        Number of worker processes, >= 1.
    """

    def __init__(self, context: PublicContext | SecretContext, workers: int = 2) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")

        if isinstance(context, SecretContext):
            initargs: tuple[bool, bytes] = (True, context.serialize_secret())
        else:
            initargs = (False, _public_of(context).serialize())

        self.workers = workers
        self.fingerprint = context.fingerprint
        self.has_secret = initargs[0]
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=initargs,
        )
        self._start_workers()

    def _start_workers(self) -> None:
        """Wait until every worker has loaded the context.

        The executor starts workers on demand, so without this the first
        calls would pay for process start-up.
        """
        started: set[int] = set()
        while len(started) < self.workers:
            started.update(self._map(_worker_process_id, range(self.workers)))
        self.worker_pids: tuple[int, ...] = tuple(sorted(started))

    def encrypt_rows(self, rows: np.ndarray) -> list[bytes]:
        """Encrypt rows of shape (chunks, values_per_chunk) as framed chunks, in order."""
        parts = max(self.workers, math.ceil(len(rows) / _MAX_TASK_CHUNKS))

        def tasks() -> Iterator[tuple[Any, str]]:
            for start, stop in _split(len(rows), parts):
                path, _ = _spill([rows[start:stop]])
                yield (path, start, rows.shape[1]), path

        results = self._run(_worker_encrypt, tasks(), _take_output)
        return [chunk for chunks in results for chunk in chunks]

    def sum_chunks(
        self, chunk_lists: list[list[bytes]]
    ) -> tuple[list[bytes], dict[int, CkksError]]:
        """Sum the chunks of several batches; return (summed chunks, failures by batch).

        Each task covers one chunk range of every batch, at most
        `_MAX_TASK_BYTES` in all, so a batch that fails in one range may
        already be summed in another. The caller must then sum again without it.
        """
        total_chunks = len(chunk_lists[0])
        total_bytes = sum(len(chunk) for chunks in chunk_lists for chunk in chunks)
        parts = max(self.workers, math.ceil(total_bytes / _MAX_TASK_BYTES))

        def tasks() -> Iterator[tuple[Any, str]]:
            for start, stop in _split(total_chunks, parts):
                path, spans = _spill(chunk for chunks in chunk_lists for chunk in chunks[start:stop])
                width = stop - start
                spans_by_batch = [spans[b * width : (b + 1) * width] for b in range(len(chunk_lists))]
                yield (path, start, spans_by_batch), path

        summed: list[bytes] = []
        failures: dict[int, CkksError] = {}
        for part_chunks, part_failures in self._run(_worker_sum, tasks(), _take_sum_output):
            summed.extend(part_chunks)
            for position, error in part_failures.items():
                failures.setdefault(position, error)
        return summed, failures

    def decrypt_chunks(self, chunks: list[bytes]) -> np.ndarray:
        """Decrypt framed chunks; return an array of shape (chunks, values_per_chunk)."""
        parts = max(self.workers, math.ceil(len(chunks) / _MAX_TASK_CHUNKS))

        def tasks() -> Iterator[tuple[Any, str]]:
            for start, stop in _split(len(chunks), parts):
                path, spans = _spill(chunks[start:stop])
                yield (path, start, spans), path

        return np.concatenate(self._run(_worker_decrypt, tasks(), _take_rows))

    def _run(
        self,
        function: Callable[[Any], Any],
        tasks: Iterator[tuple[Any, str]],
        finish: Callable[[Any], Any],
    ) -> list[Any]:
        """Run ``finish(function(task))`` for each task; return the results in task order.

        `tasks` yields (task, input file) pairs and is consumed lazily: at most
        two tasks per worker are pending, so at most that many input files
        exist at once. Each input file is removed when its task ends.
        """
        results: dict[int, Any] = {}
        pending: dict[Future[Any], tuple[int, str]] = {}
        try:
            for index, (task, path) in enumerate(tasks):
                while len(pending) >= 2 * self.workers:
                    self._collect(pending, results, finish, FIRST_COMPLETED)
                pending[self._executor.submit(function, task)] = (index, path)

            while pending:
                self._collect(pending, results, finish, FIRST_COMPLETED)
        finally:
            for future, (_, path) in pending.items():
                future.cancel()
                _remove(path)

        return [results[index] for index in range(len(results))]

    @staticmethod
    def _collect(
        pending: dict[Future[Any], tuple[int, str]],
        results: dict[int, Any],
        finish: Callable[[Any], Any],
        return_when: str,
    ) -> None:
        """Wait for pending tasks, then store the finished results by task index."""
        done, _ = wait(pending, return_when=return_when)
        for future in done:
            index, path = pending.pop(future)
            _remove(path)
            results[index] = finish(future.result())

    def _map(self, function: Callable[[Any], Any], tasks: Iterable[Any]) -> list[Any]:
        """Run ``function(task)`` for each small task in the workers; return results in order."""
        return list(self._executor.map(function, tasks))

    def close(self) -> None:
        """Stop the worker processes."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CkksWorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_pool(
    pool: CkksWorkerPool, context: PublicContext | SecretContext, *, needs_secret: bool
) -> None:
    """Raise unless the pool was built from this context, with its secret key if needed."""
    if pool.fingerprint != context.fingerprint:
        raise ValueError(
            f"The worker pool was built for context {pool.fingerprint[:16]}..., not "
            f"{context.fingerprint[:16]}...; build a CkksWorkerPool from this context."
        )

    if needs_secret and not pool.has_secret:
        raise SecretKeyRequiredError(
            "This worker pool was built from a PublicContext and cannot encrypt or decrypt; "
            "build it from the SecretContext."
        )


_worker_context: PublicContext | SecretContext | None = None


def _init_worker(is_secret: bool, serialized: bytes) -> None:
    """Load the pool's context once in a worker process."""
    global _worker_context
    if is_secret:
        _worker_context = SecretContext.from_bytes(serialized)
    else:
        _worker_context = PublicContext.from_bytes(serialized)


def _worker_process_id(_: int) -> int:
    # The pause lets a worker that is still starting take one of the calls.
    time.sleep(0.01)
    return os.getpid()


def _worker_encrypt(task: tuple[str, int, int]) -> tuple[str, list[tuple[int, int]]]:
    path, first_index, width = task
    rows = np.fromfile(path, dtype=np.float64).reshape(-1, width)
    context = _require_secret(_worker_context, "encrypt_update")
    return _spill(_encrypt_rows(context, first_index, rows))


def _worker_sum(
    task: tuple[str, int, list[list[tuple[int, int]]]],
) -> tuple[tuple[str, list[tuple[int, int]]], dict[int, CkksError]]:
    path, first_index, spans_by_batch = task
    chunk_lists = [_read(path, spans) for spans in spans_by_batch]
    summed, failures = _sum_range(_public_of(_worker_context), first_index, chunk_lists)
    return _spill(summed), failures


def _worker_decrypt(task: tuple[str, int, list[tuple[int, int]]]) -> tuple[str, tuple[int, int]]:
    path, first_index, spans = task
    context = _require_secret(_worker_context, "decrypt_sum")
    rows = _decrypt_range(context, first_index, _read(path, spans))
    result_path, _ = _spill([rows])
    return result_path, rows.shape


# --- Files that carry data between processes ----------------------------------------
# A 64 MB list of bytes takes about 0.2 s through a process pipe on two cores,
# as long as the summation it feeds. Writing it to a RAM-backed file and
# reading it back costs a few milliseconds.


def _spill(parts: Iterable[Any]) -> tuple[str, list[tuple[int, int]]]:
    """Write buffers to one new temporary file; return its path and (offset, size) spans."""
    descriptor, path = tempfile.mkstemp(prefix="fedseal-ckks-", dir=scratch_directory())
    spans = []
    offset = 0
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for part in parts:
                size = handle.write(part)
                spans.append((offset, size))
                offset += size
    except BaseException:
        _remove(path)
        raise
    return path, spans


def _read(path: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """Read the given (offset, size) spans of a file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(descriptor, size, offset) for offset, size in spans]
    finally:
        os.close(descriptor)


def _take_output(output: tuple[str, Sequence[tuple[int, int]]]) -> list[bytes]:
    """Read the (path, spans) output of a worker, then delete its file."""
    path, spans = output
    try:
        return _read(path, spans)
    finally:
        _remove(path)


def _take_sum_output(
    output: tuple[tuple[str, Sequence[tuple[int, int]]], dict[int, CkksError]],
) -> tuple[list[bytes], dict[int, CkksError]]:
    """Read the summed chunks a worker wrote, keeping its failures."""
    spilled, failures = output
    return _take_output(spilled), failures


def _take_rows(output: tuple[str, tuple[int, int]]) -> np.ndarray:
    """Read the decrypted rows a worker wrote, then delete its file."""
    path, shape = output
    try:
        return np.fromfile(path, dtype=np.float64).reshape(shape)
    finally:
        _remove(path)


def _remove(path: str) -> None:
    """Delete a temporary file if it still exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

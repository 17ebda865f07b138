"""CKKS encryption core: the server sums model updates it cannot read.

Typical use::

    from crypto import ckks

    secret = ckks.generate_context("compact")               # once, on a node
    ckks.write_secret_context(secret, key_dir)               # shared by the nodes
    ckks.write_public_context(secret, server_dir)            # for the server
    ckks.preflight("compact", num_nodes=10, norm_bound=1.0)  # before round 1

    batch = ckks.encrypt_update(secret, update, weight)      # node
    result = ckks.aggregate_batches(batches, public, len(update))  # server
    total = ckks.decrypt_sum(secret, result.batch, len(update))    # node
"""

from crypto.ckks.codec import (
    KIND_AGGREGATE,
    KIND_UPLOAD,
    AggregationResult,
    BatchHeader,
    CkksWorkerPool,
    EncryptedUpdate,
    aggregate_batches,
    chunk_count,
    decrypt_sum,
    encrypt_update,
    read_header,
    sum_updates,
    validate_batch,
)
from crypto.ckks.context import (
    PUBLIC_CONTEXT_FILENAME,
    SECRET_CONTEXT_FILENAME,
    PublicContext,
    SealBytesIO,
    SecretContext,
    generate_context,
    read_public_context,
    read_secret_context,
    write_public_context,
    write_secret_context,
)
from crypto.ckks.errors import (
    ChunkCountError,
    CkksError,
    ContextFileError,
    FingerprintMismatchError,
    MalformedBatchError,
    ParameterMismatchError,
    PreflightError,
    SecretKeyRequiredError,
    VectorLengthError,
)
from crypto.ckks.params import (
    DEFAULT_PRESET,
    PRESETS,
    PreflightReport,
    Preset,
    get_preset,
    preflight,
)

__all__ = [
    "DEFAULT_PRESET",
    "KIND_AGGREGATE",
    "KIND_UPLOAD",
    "PRESETS",
    "PUBLIC_CONTEXT_FILENAME",
    "SECRET_CONTEXT_FILENAME",
    "AggregationResult",
    "BatchHeader",
    "ChunkCountError",
    "CkksError",
    "CkksWorkerPool",
    "ContextFileError",
    "EncryptedUpdate",
    "FingerprintMismatchError",
    "MalformedBatchError",
    "ParameterMismatchError",
    "PreflightError",
    "PreflightReport",
    "Preset",
    "PublicContext",
    "SealBytesIO",
    "SecretContext",
    "SecretKeyRequiredError",
    "VectorLengthError",
    "aggregate_batches",
    "chunk_count",
    "decrypt_sum",
    "encrypt_update",
    "generate_context",
    "get_preset",
    "preflight",
    "read_header",
    "read_public_context",
    "read_secret_context",
    "sum_updates",
    "validate_batch",
    "write_public_context",
    "write_secret_context",
]

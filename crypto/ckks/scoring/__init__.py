"""Encrypted robust scoring: statistics of CKKS-encrypted updates, decrypted as scalars.

Typical use::

    from crypto.ckks import scoring

    secret = scoring.generate_scoring_context()                   # once, on a key holder
    scoring.check_scoring_bound(secret.preset, norm_bound=10.0)  # before round 1
    data = scoring.encrypt_for_scoring(secret, update, norm_bound=10.0)  # node

    public = secret.public                                         # server
    update = scoring.ScoringUpdate.from_bytes(public, data, len(update))
    scalar = scoring.squared_norm(public, update)                  # server
    value = scoring.decrypt_scalar(secret, scalar)                 # committee node
"""

from crypto.ckks.scoring.context import (
    DEFAULT_SCORING_PRESET,
    SCORING_PRESETS,
    SCORING_PUBLIC_CONTEXT_FILENAME,
    SCORING_SECRET_CONTEXT_FILENAME,
    ScoringPreset,
    ScoringPublicContext,
    ScoringSecretContext,
    check_scoring_bound,
    generate_scoring_context,
    get_scoring_preset,
    read_scoring_public_context,
    read_scoring_secret_context,
    write_scoring_public_context,
    write_scoring_secret_context,
)
from crypto.ckks.scoring.scalars import (
    NotAScalarError,
    ScalarCiphertext,
    decrypt_scalar,
)
from crypto.ckks.scoring.statistics import (
    ScoringUpdate,
    encrypt_for_scoring,
    inner_product,
    squared_distance,
    squared_norm,
)

__all__ = [
    "DEFAULT_SCORING_PRESET",
    "SCORING_PRESETS",
    "SCORING_PUBLIC_CONTEXT_FILENAME",
    "SCORING_SECRET_CONTEXT_FILENAME",
    "NotAScalarError",
    "ScalarCiphertext",
    "ScoringPreset",
    "ScoringPublicContext",
    "ScoringSecretContext",
    "ScoringUpdate",
    "check_scoring_bound",
    "decrypt_scalar",
    "encrypt_for_scoring",
    "generate_scoring_context",
    "get_scoring_preset",
    "inner_product",
    "read_scoring_public_context",
    "read_scoring_secret_context",
    "squared_distance",
    "squared_norm",
    "write_scoring_public_context",
    "write_scoring_secret_context",
]

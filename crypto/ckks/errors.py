"""Exceptions raised by the CKKS encryption core.

Every failure that a caller may want to handle derives from `CkksError`, whose
`reason` states what was wrong and how to fix it. The subclass names the kind
of failure, so a server can reject one update and keep aggregating the others.
"""

from __future__ import annotations

__all__ = [
    "ChunkCountError",
    "CkksError",
    "ContextFileError",
    "FingerprintMismatchError",
    "MalformedBatchError",
    "ParameterMismatchError",
    "PreflightError",
    "SecretKeyRequiredError",
    "VectorLengthError",
]


class CkksError(Exception):
    """Base class of the errors `crypto.ckks` raises for bad batches, contexts or bounds.

    Invalid arguments raise ``ValueError`` or ``TypeError`` instead.

    Parameters
    ----------
    reason : str
        What failed, on which value, and what to do next.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PreflightError(CkksError):
    """Parameters that could wrap around or lose precision in the encrypted sum."""


class FingerprintMismatchError(CkksError):
    """A batch encrypted under a context other than the one expected."""


class ParameterMismatchError(CkksError):
    """A batch or context made with another preset or other CKKS parameters."""


class MalformedBatchError(CkksError):
    """A batch whose bytes are truncated, corrupted or not a batch at all."""


class ChunkCountError(CkksError):
    """A batch with a number of ciphertext chunks that does not fit its length."""


class VectorLengthError(CkksError):
    """A batch that encrypts a vector of a length other than the one expected."""


class SecretKeyRequiredError(CkksError):
    """An operation that needs the secret key, called with public material only."""


class ContextFileError(CkksError):
    """A context file that is missing, unreadable or of the wrong kind."""

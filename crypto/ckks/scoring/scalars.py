"""Scalar ciphertexts: one statistic per ciphertext, and its decryption on a key holder.

A scalar ciphertext is the output of a rotate-and-sum, so every slot
contains the same value up to CKKS noise. `decrypt_scalar` returns slot 0
and rejects a ciphertext whose slots disagree: a server that sends a raw
update (or any ciphertext that is not a rotate-and-sum) for decryption gets
an error instead of the update's values.

Serialized format (little-endian)::

    magic "FSSCORSS" | version u16 | fingerprint (32 bytes) | SEAL ciphertext
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenseal import sealapi

from crypto.ckks.context import SealBytesIO
from crypto.ckks.errors import (
    CkksError,
    FingerprintMismatchError,
    MalformedBatchError,
    SecretKeyRequiredError,
)
from crypto.ckks.scoring.context import ScoringPublicContext, ScoringSecretContext

__all__ = ["NotAScalarError", "ScalarCiphertext", "decrypt_scalar"]

logger = logging.getLogger(__name__)

_MAGIC = b"FSSCORSS"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sH32s")

# Slots of a genuine rotate-and-sum differ by CKKS noise only: about 1e-8 for
# statistics of magnitude 1 (measured spread 1.3e-8 on 10,000 values).
DEFAULT_SLOT_ATOL = 1e-5
DEFAULT_SLOT_RTOL = 1e-6


class NotAScalarError(CkksError):
    """A ciphertext whose slots differ, so it is not the output of a rotate-and-sum."""


@dataclass
class ScalarCiphertext:
    """One encrypted statistic, with the fingerprint of its scoring context.

    Attributes
    ----------
    fingerprint : str
        Fingerprint of the scoring context.
    ciphertext : sealapi.Ciphertext
        SEAL ciphertext with the statistic in every slot, one level below fresh.
    """

    fingerprint: str
    ciphertext: Any

    def serialize(self) -> bytes:
        """Return the header and SEAL bytes of this scalar."""
        header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, bytes.fromhex(self.fingerprint))
        with SealBytesIO() as scratch:
            return header + scratch.save(self.ciphertext)

    @classmethod
    def from_bytes(
        cls, context: ScoringPublicContext | ScoringSecretContext, data: bytes
    ) -> ScalarCiphertext:
        """Load a scalar and check that it belongs to `context` and is one level below fresh.

        Parameters
        ----------
        context : ScoringPublicContext or ScoringSecretContext
            The context the scalar must have been computed under.
        data : bytes
            Output of `serialize`.

        Raises
        ------
        FingerprintMismatchError
            If the scalar names another scoring context.
        MalformedBatchError
            If the bytes are corrupted or the ciphertext has the wrong level or size.
        """
        public = (
            context.public if isinstance(context, ScoringSecretContext) else context
        )
        if not isinstance(data, bytes | bytearray) or len(data) < _HEADER.size:
            raise MalformedBatchError(
                "Scalar ciphertext is not bytes or is shorter than its header."
            )
        magic, version, fingerprint = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _FORMAT_VERSION:
            raise MalformedBatchError(
                f"Not a scalar ciphertext of version {_FORMAT_VERSION}: magic {magic!r}."
            )
        if fingerprint.hex() != public.fingerprint:
            raise FingerprintMismatchError(
                f"Scalar ciphertext is under scoring context {fingerprint.hex()[:16]}, but this node "
                f"holds {public.fingerprint[:16]}; the server and the node use different scoring keys."
            )

        ciphertext = sealapi.Ciphertext()
        with SealBytesIO() as scratch:
            try:
                scratch.load(
                    ciphertext, bytes(data[_HEADER.size :]), public.seal_context
                )
            except (RuntimeError, ValueError) as error:
                raise MalformedBatchError(
                    f"Scalar ciphertext failed to load: SEAL reported {error}."
                ) from error

        expected_level = public.seal_context.last_parms_id()
        if ciphertext.parms_id() != expected_level or ciphertext.size() != 2:
            raise MalformedBatchError(
                f"Scalar ciphertext has size {ciphertext.size()} on another level; a statistic is "
                "a size-2 ciphertext rescaled once."
            )
        return cls(fingerprint=public.fingerprint, ciphertext=ciphertext)


def decrypt_scalar(
    context: ScoringSecretContext,
    scalar: ScalarCiphertext,
    *,
    atol: float = DEFAULT_SLOT_ATOL,
    rtol: float = DEFAULT_SLOT_RTOL,
) -> float:
    """Decrypt a scalar and return slot 0, after checking that all slots agree.

    Parameters
    ----------
    context : ScoringSecretContext
        Secret scoring context of a key holder.
    scalar : ScalarCiphertext
        The statistic to decrypt.
    atol, rtol : float
        Largest accepted spread of the slots: ``atol + rtol * |slot 0|``.

    Raises
    ------
    SecretKeyRequiredError
        If `context` is not a secret scoring context.
    FingerprintMismatchError
        If the scalar is under another scoring context.
    NotAScalarError
        If the slots spread by more than the tolerance.
    """
    if not isinstance(context, ScoringSecretContext):
        raise SecretKeyRequiredError(
            f"Decrypting a scalar needs the secret scoring context, got {type(context).__name__}; "
            "only committee nodes decrypt."
        )
    if scalar.fingerprint != context.fingerprint:
        raise FingerprintMismatchError(
            f"Scalar is under scoring context {scalar.fingerprint[:16]}, not {context.fingerprint[:16]}."
        )

    plaintext = sealapi.Plaintext()
    context.decryptor.decrypt(scalar.ciphertext, plaintext)
    slots = np.asarray(context.encoder.decode_double(plaintext))
    value = float(slots[0])
    spread = float(np.max(slots) - np.min(slots))
    if not spread <= atol + rtol * abs(value):
        raise NotAScalarError(
            f"Ciphertext slots spread by {spread:.3g}, above the {atol + rtol * abs(value):.3g} "
            "allowed for one statistic; only rotate-and-sum outputs are decrypted."
        )
    return value

"""Scoring preset and the CKKS key pair that encrypted robust scoring uses.

The aggregation presets (``crypto.ckks.params``) have no special prime, so
the server can only add. Scoring needs one multiplication and rotations, so
it has its own preset, key pair and files:

``scoring_8192``
    SEAL CKKS, N=8192, coefficient moduli [60, 40, 60] bits (the last is the
    special prime for key switching), scale 2^40, one real per slot (4096
    values per ciphertext). It uses 160 of the 218 bits that 128-bit security
    allows at N=8192. The server multiplies two fresh ciphertexts without
    rescaling, so the product has scale 2^80 under the 100-bit data modulus:
    every statistic must stay below ``headroom()`` (about 2^19) in magnitude.

The public context carries the encryption parameters, a relinearization key
and Galois keys for the rotations by 1, 2, 4, ..., 2048 slots that one
rotate-and-sum needs (8.8 MB). It carries no secret key and no public key,
since nodes encrypt with the secret key (seeded symmetric ciphertexts).

Serialized formats (little-endian)::

    public: magic "FSSCORPC" | version u16 | preset wire id u16 | key id (32 bytes)
            | parameters length u32 | relin length u32 | galois length u32
            | parameters | relinearization keys | Galois keys
    secret: magic "FSSCORSC" | version u16 | public length u32 | secret length u32
            | public context bytes | secret key

The fingerprint is the SHA-256 hex digest of the public bytes, so it names
one key pair, and every scoring ciphertext carries it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenseal import sealapi

from crypto.ckks.context import SealBytesIO, _read_file, _write_file
from crypto.ckks.errors import ContextFileError, ParameterMismatchError, PreflightError
from crypto.ckks.params import HE_STANDARD_MAX_MODULUS_BITS_128, SAFETY_MARGIN

__all__ = [
    "DEFAULT_SCORING_PRESET",
    "SCORING_PRESETS",
    "SCORING_PUBLIC_CONTEXT_FILENAME",
    "SCORING_SECRET_CONTEXT_FILENAME",
    "ScoringPreset",
    "ScoringPublicContext",
    "ScoringSecretContext",
    "check_scoring_bound",
    "generate_scoring_context",
    "get_scoring_preset",
    "read_scoring_public_context",
    "read_scoring_secret_context",
    "write_scoring_public_context",
    "write_scoring_secret_context",
]

logger = logging.getLogger(__name__)

SCORING_PUBLIC_CONTEXT_FILENAME = "ckks_scoring_public_context.bin"
SCORING_SECRET_CONTEXT_FILENAME = "ckks_scoring_secret_context.bin"

_PUBLIC_MAGIC = b"FSSCORPC"
_SECRET_MAGIC = b"FSSCORSC"
_FORMAT_VERSION = 1
_PUBLIC_HEADER = struct.Struct("<8sHH32sIII")
_SECRET_HEADER = struct.Struct("<8sHII")
_KEY_ID_BYTES = 32


@dataclass(frozen=True)
class ScoringPreset:
    """CKKS parameters for scoring: one multiplication, then rotations.

    Parameters
    ----------
    name : str
        Registry name, such as ``"scoring_8192"``.
    wire_id : int
        Number that identifies the preset inside serialized contexts.
    poly_modulus_degree : int
        Polynomial degree N; a ciphertext has N/2 real slots.
    coeff_mod_bit_sizes : tuple of int
        Bit sizes of the primes, special prime last.
    scale_bits : int
        log2 of the scale of fresh ciphertexts.
    """

    name: str
    wire_id: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        max_bits = HE_STANDARD_MAX_MODULUS_BITS_128.get(self.poly_modulus_degree)
        if max_bits is None or sum(self.coeff_mod_bit_sizes) > max_bits:
            raise ValueError(
                f"Scoring preset {self.name!r}: moduli {list(self.coeff_mod_bit_sizes)} at "
                f"N={self.poly_modulus_degree} exceed the 128-bit security bound {max_bits}."
            )

        # The product of two fresh ciphertexts has scale 2^(2*scale_bits) and
        # must fit under the data primes with room for the values.
        if 2 * self.scale_bits >= sum(self.coeff_mod_bit_sizes[:-1]):
            raise ValueError(
                f"Scoring preset {self.name!r}: a product at scale 2^{2 * self.scale_bits} "
                f"leaves no headroom under data moduli {list(self.coeff_mod_bit_sizes[:-1])}."
            )

    @property
    def scale(self) -> float:
        """Scale of fresh ciphertexts, 2**scale_bits."""
        return 2.0**self.scale_bits

    @property
    def slot_count(self) -> int:
        """Number of reals one ciphertext carries (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        """Rotation steps of one rotate-and-sum: 1, 2, 4, ..., slot_count / 2."""
        return tuple(2**power for power in range(int(math.log2(self.slot_count))))

    def seal_parameters(self) -> sealapi.EncryptionParameters:
        """Build the SEAL encryption parameters of this preset."""
        parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parameters.set_poly_modulus_degree(self.poly_modulus_degree)
        parameters.set_coeff_modulus(
            sealapi.CoeffModulus.Create(
                self.poly_modulus_degree, list(self.coeff_mod_bit_sizes)
            )
        )
        return parameters

    def headroom(self) -> float:
        """Return the magnitude at which a statistic wraps: q_data / (2 * scale^2)."""
        moduli = self.seal_parameters().coeff_modulus()
        data_modulus = math.prod(modulus.value() for modulus in moduli[:-1])
        return data_modulus / (2.0 * self.scale**2)


SCORING_PRESETS: dict[str, ScoringPreset] = {
    "scoring_8192": ScoringPreset(
        name="scoring_8192",
        wire_id=101,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 60),
        scale_bits=40,
    ),
}

DEFAULT_SCORING_PRESET = "scoring_8192"


def get_scoring_preset(preset: str | ScoringPreset) -> ScoringPreset:
    """Look up a scoring preset by name, or return an instance unchanged.

    Raises
    ------
    ValueError
        If the name is not registered; the message lists the registered names.
    """
    if isinstance(preset, ScoringPreset):
        return preset
    if preset not in SCORING_PRESETS:
        raise ValueError(
            f"Unknown scoring preset {preset!r}; choose one of {sorted(SCORING_PRESETS)}."
        )
    return SCORING_PRESETS[preset]


def check_scoring_bound(preset: str | ScoringPreset, norm_bound: float) -> float:
    """Check that every statistic of updates with L2 norm at most `norm_bound` fits.

    The largest statistic is a squared distance, at most ``(2 * norm_bound)^2``.
    Every partial sum inside the multiply-accumulate and the rotate-and-sum
    is bounded by it too, so it must stay below the headroom divided by
    ``SAFETY_MARGIN``.

    Parameters
    ----------
    preset : str or ScoringPreset
        Scoring preset name or instance.
    norm_bound : float
        L2 norm bound of each update, greater than 0.

    Returns
    -------
    float
        The largest norm bound the preset accepts.

    Raises
    ------
    PreflightError
        If a statistic could wrap around.
    ValueError
        If `norm_bound` is not finite and positive.
    """
    preset = get_scoring_preset(preset)
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound must be finite and > 0, got {norm_bound!r}.")

    max_norm_bound = math.sqrt(preset.headroom() / SAFETY_MARGIN) / 2.0
    if norm_bound > max_norm_bound:
        raise PreflightError(
            f"Scoring preset {preset.name!r} wraps squared distances above "
            f"{preset.headroom() / SAFETY_MARGIN:.6g}, so norm_bound must be at most "
            f"{max_norm_bound:.6g}, got {norm_bound:.6g}; clip or scale the updates down "
            "before encrypting them for scoring."
        )
    return max_norm_bound


def _seal_context(preset: ScoringPreset) -> sealapi.SEALContext:
    """Build a SEAL context that enforces 128-bit security."""
    seal_context = sealapi.SEALContext(
        preset.seal_parameters(), True, sealapi.SEC_LEVEL_TYPE.TC128
    )
    if not seal_context.parameters_set():
        raise ParameterMismatchError(
            f"SEAL rejected scoring preset {preset.name!r}: {seal_context.parameters_error_message()}."
        )
    return seal_context


class ScoringPublicContext:
    """Parameters, relinearization key and Galois keys; no secret key.

    This is all the server holds. It evaluates statistics but cannot decrypt.
    Build one with `ScoringPublicContext.from_bytes`,
    `read_scoring_public_context` or `ScoringSecretContext.public`.
    """

    def __init__(self, serialized: bytes) -> None:
        preset, key_id, parameters, relin, galois = _parse_public(serialized)
        self.preset: ScoringPreset = preset
        self.key_id: bytes = key_id
        self.serialized: bytes = bytes(serialized)
        self.fingerprint: str = hashlib.sha256(self.serialized).hexdigest()
        self.seal_context: Any = _load_parameters(preset, parameters)
        self.evaluator: Any = sealapi.Evaluator(self.seal_context)
        self.relin_keys: Any = sealapi.RelinKeys()
        self.galois_keys: Any = sealapi.GaloisKeys()
        with SealBytesIO() as scratch:
            _load_or_raise(
                scratch,
                self.relin_keys,
                relin,
                self.seal_context,
                "relinearization keys",
            )
            _load_or_raise(
                scratch, self.galois_keys, galois, self.seal_context, "Galois keys"
            )

    @classmethod
    def from_bytes(cls, serialized: bytes) -> ScoringPublicContext:
        """Load a public scoring context from the bytes of `serialize`."""
        return cls(serialized)

    def serialize(self) -> bytes:
        """Return the serialized public context (what the fingerprint hashes)."""
        return self.serialized

    def __repr__(self) -> str:
        return f"ScoringPublicContext(preset={self.preset.name!r}, fingerprint={self.fingerprint[:16]!r})"


class ScoringSecretContext:
    """The scoring secret key: nodes encrypt with it and the committee decrypts.

    ``public`` is the matching `ScoringPublicContext`, the part that goes to
    the server.
    """

    def __init__(self, serialized: bytes) -> None:
        public_bytes, secret_payload = _parse_secret(serialized)
        self.public: ScoringPublicContext = ScoringPublicContext(public_bytes)
        self.preset: ScoringPreset = self.public.preset
        self.fingerprint: str = self.public.fingerprint
        self._serialized = bytes(serialized)
        secret_key = sealapi.SecretKey()
        with SealBytesIO() as scratch:
            _load_or_raise(
                scratch,
                secret_key,
                secret_payload,
                self.public.seal_context,
                "secret key",
            )
        self.encoder: Any = sealapi.CKKSEncoder(self.public.seal_context)
        self.encryptor: Any = sealapi.Encryptor(self.public.seal_context, secret_key)
        self.decryptor: Any = sealapi.Decryptor(self.public.seal_context, secret_key)

    @classmethod
    def from_bytes(cls, serialized: bytes) -> ScoringSecretContext:
        """Load a secret scoring context from the bytes of `serialize_secret`."""
        return cls(serialized)

    def serialize_secret(self) -> bytes:
        """Return the serialized secret context. It contains the secret key."""
        return self._serialized

    def __repr__(self) -> str:
        return f"ScoringSecretContext(preset={self.preset.name!r}, fingerprint={self.fingerprint[:16]!r})"


def generate_scoring_context(
    preset: str | ScoringPreset = DEFAULT_SCORING_PRESET,
) -> ScoringSecretContext:
    """Generate a new scoring key pair with its relinearization and Galois keys.

    Parameters
    ----------
    preset : str or ScoringPreset, default "scoring_8192"
        Name or instance of a registered scoring preset.

    Returns
    -------
    ScoringSecretContext
        The new secret context; its ``public`` attribute goes to the server.
    """
    preset = get_scoring_preset(preset)
    if SCORING_PRESETS.get(preset.name) != preset:
        raise ValueError(
            f"Scoring preset {preset.name!r} is not registered in SCORING_PRESETS."
        )

    seal_context = _seal_context(preset)
    generator = sealapi.KeyGenerator(seal_context)
    relin_keys = sealapi.RelinKeys()
    generator.create_relin_keys(relin_keys)
    galois_keys = sealapi.GaloisKeys()
    # This binding's list overload takes Galois elements, not steps: a left
    # rotation by k slots is the element 3^k mod 2N (SEAL's GaloisTool).
    modulus = 2 * preset.poly_modulus_degree
    generator.create_galois_keys(
        [pow(3, step, modulus) for step in preset.rotation_steps], galois_keys
    )

    with SealBytesIO() as scratch:
        parameters = scratch.save(preset.seal_parameters())
        relin = scratch.save(relin_keys)
        galois = scratch.save(galois_keys)
        secret_key = scratch.save(generator.secret_key())

    header = _PUBLIC_HEADER.pack(
        _PUBLIC_MAGIC,
        _FORMAT_VERSION,
        preset.wire_id,
        secrets.token_bytes(_KEY_ID_BYTES),
        len(parameters),
        len(relin),
        len(galois),
    )
    public_bytes = header + parameters + relin + galois
    secret_header = _SECRET_HEADER.pack(
        _SECRET_MAGIC, _FORMAT_VERSION, len(public_bytes), len(secret_key)
    )
    context = ScoringSecretContext(secret_header + public_bytes + secret_key)
    logger.info(
        "generate_scoring_context: new %s key, fingerprint %s",
        preset.name,
        context.fingerprint,
    )
    return context


def _parse_public(
    serialized: bytes,
) -> tuple[ScoringPreset, bytes, bytes, bytes, bytes]:
    """Split public scoring context bytes into (preset, key id, parameters, relin, galois)."""
    if (
        not isinstance(serialized, bytes | bytearray)
        or len(serialized) < _PUBLIC_HEADER.size
    ):
        raise ContextFileError(
            "Public scoring context is not bytes or is shorter than its header."
        )

    magic, version, wire_id, key_id, *lengths = _PUBLIC_HEADER.unpack_from(serialized)
    if magic == _SECRET_MAGIC:
        raise ContextFileError(
            "Got a secret scoring context where the public one was expected; hand the server "
            "ScoringSecretContext.public instead."
        )
    _check_magic_and_version(magic, version, _PUBLIC_MAGIC, "public")

    preset = next((p for p in SCORING_PRESETS.values() if p.wire_id == wire_id), None)
    if preset is None:
        raise ParameterMismatchError(
            f"Public scoring context names preset wire id {wire_id}, which is not registered."
        )

    body = bytes(serialized[_PUBLIC_HEADER.size :])
    if len(body) != sum(lengths):
        raise ContextFileError(
            f"Public scoring context body has {len(body)} bytes, but its header declares "
            f"{sum(lengths)}; the data is truncated or corrupted."
        )
    parameters_end = lengths[0]
    relin_end = parameters_end + lengths[1]
    return (
        preset,
        key_id,
        body[:parameters_end],
        body[parameters_end:relin_end],
        body[relin_end:],
    )


def _parse_secret(serialized: bytes) -> tuple[bytes, bytes]:
    """Split secret scoring context bytes into (public bytes, secret key)."""
    if (
        not isinstance(serialized, bytes | bytearray)
        or len(serialized) < _SECRET_HEADER.size
    ):
        raise ContextFileError(
            "Secret scoring context is not bytes or is shorter than its header."
        )

    magic, version, public_length, secret_length = _SECRET_HEADER.unpack_from(
        serialized
    )
    if magic == _PUBLIC_MAGIC:
        raise ContextFileError(
            "Got a public scoring context where the secret one is needed; read the secret "
            "scoring context file on a key-holding node instead."
        )
    _check_magic_and_version(magic, version, _SECRET_MAGIC, "secret")

    body = bytes(serialized[_SECRET_HEADER.size :])
    if len(body) != public_length + secret_length:
        raise ContextFileError(
            f"Secret scoring context body has {len(body)} bytes, but its header declares "
            f"{public_length + secret_length}; the data is truncated or corrupted."
        )
    return body[:public_length], body[public_length:]


def _check_magic_and_version(
    magic: bytes, version: int, expected: bytes, kind: str
) -> None:
    """Raise ContextFileError unless the header names the expected kind and version."""
    if magic != expected:
        raise ContextFileError(
            f"Not a {kind} scoring context: magic {magic!r}, expected {expected!r}."
        )
    if version != _FORMAT_VERSION:
        raise ContextFileError(
            f"Unsupported {kind} scoring context version {version}; this code reads version {_FORMAT_VERSION}."
        )


def _load_or_raise(
    scratch: SealBytesIO, seal_object: Any, data: bytes, seal_context: Any, what: str
) -> None:
    """Load SEAL bytes into an object, turning SEAL's exceptions into ContextFileError."""
    try:
        scratch.load(seal_object, data, seal_context)
    except (RuntimeError, ValueError) as error:
        raise ContextFileError(
            f"Could not load the scoring {what}: SEAL reported {error}."
        ) from error


def _load_parameters(preset: ScoringPreset, payload: bytes) -> sealapi.SEALContext:
    """Rebuild the SEAL context from serialized parameters, checking them against the preset."""
    parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    with SealBytesIO() as scratch:
        _load_or_raise(scratch, parameters, payload, None, "encryption parameters")
    if parameters != preset.seal_parameters():
        raise ParameterMismatchError(
            f"Scoring context parameters do not match preset {preset.name!r} "
            f"(N={preset.poly_modulus_degree}, moduli {list(preset.coeff_mod_bit_sizes)} bits)."
        )
    return _seal_context(preset)


def write_scoring_secret_context(
    context: ScoringSecretContext, directory: str | os.PathLike[str]
) -> Path:
    """Write ``directory/ckks_scoring_secret_context.bin`` with mode 0600, atomically."""
    path = Path(directory) / SCORING_SECRET_CONTEXT_FILENAME
    _write_file(path, context.serialize_secret(), mode=0o600)
    logger.info(
        "write_scoring_secret_context: wrote %s, fingerprint %s",
        path,
        context.fingerprint,
    )
    return path


def write_scoring_public_context(
    context: ScoringPublicContext | ScoringSecretContext,
    directory: str | os.PathLike[str],
) -> Path:
    """Write the public part of a scoring context to ``directory/ckks_scoring_public_context.bin``."""
    public = context.public if isinstance(context, ScoringSecretContext) else context
    path = Path(directory) / SCORING_PUBLIC_CONTEXT_FILENAME
    _write_file(path, public.serialize(), mode=0o644)
    logger.info(
        "write_scoring_public_context: wrote %s, fingerprint %s",
        path,
        public.fingerprint,
    )
    return path


def read_scoring_secret_context(
    directory: str | os.PathLike[str],
) -> ScoringSecretContext:
    """Read ``directory/ckks_scoring_secret_context.bin``.

    Raises
    ------
    ContextFileError
        If the file is missing, unreadable, or not a secret scoring context.
    """
    path = Path(directory) / SCORING_SECRET_CONTEXT_FILENAME
    context = ScoringSecretContext.from_bytes(_read_file(path))
    logger.info(
        "read_scoring_secret_context: read %s, fingerprint %s",
        path,
        context.fingerprint,
    )
    return context


def read_scoring_public_context(
    directory: str | os.PathLike[str],
) -> ScoringPublicContext:
    """Read ``directory/ckks_scoring_public_context.bin``.

    Raises
    ------
    ContextFileError
        If the file is missing, unreadable, or not a public scoring context.
    """
    path = Path(directory) / SCORING_PUBLIC_CONTEXT_FILENAME
    context = ScoringPublicContext.from_bytes(_read_file(path))
    logger.info(
        "read_scoring_public_context: read %s, fingerprint %s",
        path,
        context.fingerprint,
    )
    return context

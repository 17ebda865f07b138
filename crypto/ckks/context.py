"""Public and secret CKKS contexts, their fingerprint, and their key files.

A `SecretContext` contains the secret key and lives on the nodes, which
encrypt their updates and decrypt the aggregate. A `PublicContext` contains
the parameters and, for the ``tenseal_default`` preset, the public key. It has
no secret, relinearization or Galois keys. The server gets only the public
context, so nothing on the server can decrypt.

Serialized formats (little-endian)::

    public context: magic "FSCKKSPC" | version u16 | preset wire id u16
                    | key id (32 random bytes) | payload length u32 | payload
    secret context: magic "FSCKKSSC" | version u16 | public length u32
                    | secret length u32 | public context bytes | secret payload

The public payload is SEAL's serialized ``EncryptionParameters`` (``compact``)
or a TenSEAL context without its secret key (``tenseal_default``). The secret
payload is SEAL's serialized ``SecretKey`` or the full TenSEAL context. The
key id makes two contexts with equal parameters differ, so the fingerprint,
the SHA-256 hex digest of the public context bytes, identifies one key.

TenSEAL 0.3.18's ``sealapi`` binding saves and loads SEAL objects through file
paths only, so `SealBytesIO` passes bytes through a temporary file in
``/dev/shm`` (RAM-backed) when that exists.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import secrets
import stat
import struct
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import tenseal as ts
import tenseal.sealapi as sealapi

from crypto.ckks.errors import ContextFileError, ParameterMismatchError
from crypto.ckks.params import (
    BACKEND_SEALAPI,
    DEFAULT_PRESET,
    PRESETS,
    Preset,
    get_preset,
    preset_by_wire_id,
)

__all__ = [
    "PUBLIC_CONTEXT_FILENAME",
    "SECRET_CONTEXT_FILENAME",
    "PublicContext",
    "SealBytesIO",
    "SecretContext",
    "generate_context",
    "read_public_context",
    "read_secret_context",
    "scratch_directory",
    "write_public_context",
    "write_secret_context",
]

logger = logging.getLogger(__name__)

PUBLIC_CONTEXT_FILENAME = "ckks_public_context.bin"
SECRET_CONTEXT_FILENAME = "ckks_secret_context.bin"

_PUBLIC_MAGIC = b"FSCKKSPC"
_SECRET_MAGIC = b"FSCKKSSC"
_FORMAT_VERSION = 1
_PUBLIC_HEADER = struct.Struct("<8sHH32sI")
_SECRET_HEADER = struct.Struct("<8sHII")
_KEY_ID_BYTES = 32
_RAM_DIRECTORY = "/dev/shm"


def scratch_directory() -> str | None:
    """Return ``/dev/shm`` if it is writable, else None (the default temporary directory)."""
    return _RAM_DIRECTORY if os.access(_RAM_DIRECTORY, os.W_OK) else None


class SealBytesIO:
    """Temporary file that converts SEAL objects to and from bytes.

    The file is created with mode 0600 in ``/dev/shm`` when that directory is
    writable, else in the default temporary directory, and removed by
    `close`. It stays open, so each conversion costs two system calls instead
    of an open and a close. One instance must not be shared between threads.
    """

    def __init__(self) -> None:
        self._descriptor, self.path = tempfile.mkstemp(
            prefix="fedseal-ckks-", dir=scratch_directory()
        )

    def save(self, seal_object: Any) -> bytes:
        """Serialize a SEAL object (anything with ``save(path)``) to bytes."""
        seal_object.save(self.path)
        size = os.fstat(self._descriptor).st_size
        return os.pread(self._descriptor, size, 0)

    def load(self, seal_object: Any, data: bytes, seal_context: Any = None) -> None:
        """Load bytes into a SEAL object, in place.

        Objects whose ``load`` takes a SEAL context (ciphertexts, keys) need
        `seal_context`; ``EncryptionParameters`` does not.
        """
        # Truncate after writing: SEAL must never read the tail of older data.
        os.pwrite(self._descriptor, data, 0)
        os.ftruncate(self._descriptor, len(data))

        if seal_context is None:
            seal_object.load(self.path)
        else:
            seal_object.load(seal_context, self.path)

    def close(self) -> None:
        """Close and delete the temporary file."""
        if self._descriptor < 0:
            return

        os.close(self._descriptor)
        self._descriptor = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SealBytesIO:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _seal_parameters(preset: Preset) -> sealapi.EncryptionParameters:
    """Build SEAL encryption parameters for a preset."""
    parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parameters.set_poly_modulus_degree(preset.poly_modulus_degree)
    parameters.set_coeff_modulus(
        sealapi.CoeffModulus.Create(preset.poly_modulus_degree, list(preset.coeff_mod_bit_sizes))
    )
    return parameters


def _seal_context(parameters: sealapi.EncryptionParameters) -> sealapi.SEALContext:
    """Build a SEAL context that enforces 128-bit security, or raise."""
    seal_context = sealapi.SEALContext(parameters, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not seal_context.parameters_set():
        raise ParameterMismatchError(
            f"SEAL rejected the CKKS parameters: {seal_context.parameters_error_message()}."
        )
    return seal_context


@functools.lru_cache(maxsize=8)
def _expected_parms_id(preset: Preset) -> tuple[int, ...]:
    """Return the SEAL parms_id of fresh ciphertexts under a preset.

    SEAL derives the parms_id by hashing the parameters, so it is the same
    for every context of the preset, whichever binding built it.
    """
    return tuple(_seal_context(_seal_parameters(preset)).first_parms_id())


class PublicContext:
    """Parameters, and the public key where the preset needs one; no secret key.

    Build one with `PublicContext.from_bytes`, `read_public_context`, or
    `SecretContext.public`. The native objects are ``seal_context`` and
    ``evaluator`` (``compact``) or ``tenseal_context`` (``tenseal_default``).
    """

    def __init__(self, serialized: bytes) -> None:
        preset, key_id, payload = _parse_public(serialized)
        self.preset: Preset = preset
        self.key_id: bytes = key_id
        self.serialized: bytes = bytes(serialized)
        self.fingerprint: str = hashlib.sha256(serialized).hexdigest()
        self.parms_id: tuple[int, ...] = _expected_parms_id(preset)
        self.seal_context: Any = None
        self.evaluator: Any = None
        self.tenseal_context: Any = None

        if preset.backend == BACKEND_SEALAPI:
            self.seal_context = _load_seal_context(preset, payload)
            self.evaluator = sealapi.Evaluator(self.seal_context)
        else:
            self.tenseal_context = _load_tenseal_context(preset, payload, secret=False)

    @classmethod
    def from_bytes(cls, serialized: bytes) -> PublicContext:
        """Load a public context from the bytes of `serialize`."""
        return cls(serialized)

    def serialize(self) -> bytes:
        """Return the serialized public context (what the fingerprint hashes)."""
        return self.serialized

    def __repr__(self) -> str:
        return f"PublicContext(preset={self.preset.name!r}, fingerprint={self.fingerprint[:16]!r})"


class SecretContext:
    """Parameters and the secret key: the material that can decrypt.

    Build one with `generate_context`, `SecretContext.from_bytes` or
    `read_secret_context`. The native objects are ``seal_context``,
    ``encoder``, ``encryptor`` (symmetric) and ``decryptor`` (``compact``) or
    ``tenseal_context`` (``tenseal_default``). ``public`` is the matching
    `PublicContext`, which is what leaves the node.
    """

    def __init__(self, serialized: bytes) -> None:
        public_bytes, secret_payload = _parse_secret(serialized)
        self.public: PublicContext = PublicContext(public_bytes)
        self.preset: Preset = self.public.preset
        self.fingerprint: str = self.public.fingerprint
        self._serialized = serialized
        self.seal_context: Any = None
        self.encoder: Any = None
        self.encryptor: Any = None
        self.decryptor: Any = None
        self.tenseal_context: Any = None

        if self.preset.backend == BACKEND_SEALAPI:
            self.seal_context = self.public.seal_context
            secret_key = sealapi.SecretKey()
            with SealBytesIO() as scratch:
                _load_or_raise(scratch, secret_key, secret_payload, self.seal_context, "secret key")
            self.encoder = sealapi.CKKSEncoder(self.seal_context)
            self.encryptor = sealapi.Encryptor(self.seal_context, secret_key)
            self.decryptor = sealapi.Decryptor(self.seal_context, secret_key)
        else:
            self.tenseal_context = _load_tenseal_context(self.preset, secret_payload, secret=True)

    @classmethod
    def from_bytes(cls, serialized: bytes) -> SecretContext:
        """Load a secret context from the bytes of `serialize_secret`."""
        return cls(serialized)

    def serialize_secret(self) -> bytes:
        """Return the serialized secret context. It contains the secret key."""
        return self._serialized

    def __repr__(self) -> str:
        return f"SecretContext(preset={self.preset.name!r}, fingerprint={self.fingerprint[:16]!r})"


def generate_context(preset: str | Preset = DEFAULT_PRESET) -> SecretContext:
    """Generate a new secret key and return its secret context.

    Parameters
    ----------
    preset : str or Preset, default "compact_wide"
        Name or instance of a registered preset, see `crypto.ckks.params`.

    Returns
    -------
    SecretContext
        The new context. Its ``public`` attribute is the part to hand to the server.
    """
    preset = get_preset(preset)
    if PRESETS.get(preset.name) != preset:
        raise ValueError(
            f"Preset {preset.name!r} is not registered in crypto.ckks.params.PRESETS; batches "
            "identify their preset by its wire id, so only registered presets can make contexts."
        )
    key_id = secrets.token_bytes(_KEY_ID_BYTES)

    if preset.backend == BACKEND_SEALAPI:
        public_payload, secret_payload = _generate_seal_payloads(preset)
    else:
        public_payload, secret_payload = _generate_tenseal_payloads(preset)

    public_bytes = _PUBLIC_HEADER.pack(
        _PUBLIC_MAGIC, _FORMAT_VERSION, preset.wire_id, key_id, len(public_payload)
    ) + public_payload
    secret_bytes = _SECRET_HEADER.pack(
        _SECRET_MAGIC, _FORMAT_VERSION, len(public_bytes), len(secret_payload)
    ) + public_bytes + secret_payload

    context = SecretContext(secret_bytes)
    logger.info(
        "generate_context: new %s key, fingerprint %s", preset.name, context.fingerprint
    )
    return context


def _generate_seal_payloads(preset: Preset) -> tuple[bytes, bytes]:
    """Return (serialized parameters, serialized secret key) for a new SEAL key."""
    parameters = _seal_parameters(preset)
    seal_context = _seal_context(parameters)
    secret_key = sealapi.KeyGenerator(seal_context).secret_key()

    with SealBytesIO() as scratch:
        return scratch.save(parameters), scratch.save(secret_key)


def _generate_tenseal_payloads(preset: Preset) -> tuple[bytes, bytes]:
    """Return (public TenSEAL context, full TenSEAL context) for a new key."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        preset.poly_modulus_degree,
        coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
    )
    context.global_scale = preset.scale

    # Additions need no relinearization or Galois keys, so neither file has them.
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    secret = context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return public, secret


def _parse_public(serialized: bytes) -> tuple[Preset, bytes, bytes]:
    """Split public context bytes into (preset, key id, payload), checking the header."""
    if not isinstance(serialized, bytes | bytearray):
        raise ContextFileError(
            f"Public context must be bytes, got {type(serialized).__name__}."
        )

    if len(serialized) < _PUBLIC_HEADER.size:
        raise ContextFileError(
            f"Public context is truncated: {len(serialized)} bytes, the header alone "
            f"needs {_PUBLIC_HEADER.size}."
        )

    magic, version, wire_id, key_id, payload_length = _PUBLIC_HEADER.unpack_from(serialized)
    if magic == _SECRET_MAGIC:
        raise ContextFileError(
            "Got a secret context where a public context was expected; hand out "
            "SecretContext.public (or the public context file) instead."
        )
    _check_magic_and_version(magic, version, _PUBLIC_MAGIC, "public")

    preset = preset_by_wire_id(wire_id)
    if preset is None:
        raise ParameterMismatchError(
            f"Public context names preset wire id {wire_id}, which no registered preset has."
        )

    payload = bytes(serialized[_PUBLIC_HEADER.size :])
    if len(payload) != payload_length:
        raise ContextFileError(
            f"Public context payload has {len(payload)} bytes, but its header declares "
            f"{payload_length}; the data is truncated or corrupted."
        )
    return preset, key_id, payload


def _parse_secret(serialized: bytes) -> tuple[bytes, bytes]:
    """Split secret context bytes into (public context bytes, secret payload)."""
    if not isinstance(serialized, bytes | bytearray) or len(serialized) < _SECRET_HEADER.size:
        raise ContextFileError("Secret context is not bytes or is shorter than its header.")

    magic, version, public_length, secret_length = _SECRET_HEADER.unpack_from(serialized)
    if magic == _PUBLIC_MAGIC:
        raise ContextFileError(
            "Got a public context where the secret context is needed; read the "
            "secret context file on a node instead."
        )
    _check_magic_and_version(magic, version, _SECRET_MAGIC, "secret")

    body = bytes(serialized[_SECRET_HEADER.size :])
    if len(body) != public_length + secret_length:
        raise ContextFileError(
            f"Secret context body has {len(body)} bytes, but its header declares "
            f"{public_length + secret_length}; the data is truncated or corrupted."
        )
    return body[:public_length], body[public_length:]


def _check_magic_and_version(magic: bytes, version: int, expected: bytes, kind: str) -> None:
    """Raise ContextFileError unless the header names the expected kind and version."""
    if magic != expected:
        raise ContextFileError(
            f"Not a {kind} CKKS context: magic {magic!r}, expected {expected!r}."
        )

    if version != _FORMAT_VERSION:
        raise ContextFileError(
            f"Unsupported {kind} context format version {version}; this code reads "
            f"version {_FORMAT_VERSION}."
        )


def _load_or_raise(
    scratch: SealBytesIO, seal_object: Any, data: bytes, seal_context: Any, what: str
) -> None:
    """Load SEAL bytes into an object, turning SEAL's exceptions into ContextFileError."""
    try:
        scratch.load(seal_object, data, seal_context)
    except (RuntimeError, ValueError) as error:
        raise ContextFileError(f"Could not load the {what}: SEAL reported {error}.") from error


def _load_seal_context(preset: Preset, payload: bytes) -> sealapi.SEALContext:
    """Rebuild the SEAL context from serialized parameters and check them."""
    parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    with SealBytesIO() as scratch:
        _load_or_raise(scratch, parameters, payload, None, "encryption parameters")

    if parameters != _seal_parameters(preset):
        raise ParameterMismatchError(
            f"Context parameters do not match preset {preset.name!r} "
            f"(N={preset.poly_modulus_degree}, moduli {list(preset.coeff_mod_bit_sizes)} bits)."
        )
    return _seal_context(parameters)


def _load_tenseal_context(preset: Preset, payload: bytes, *, secret: bool) -> Any:
    """Rebuild a TenSEAL context and check its parameters, keys and scale."""
    try:
        context = ts.context_from(payload)
    except (RuntimeError, ValueError) as error:
        raise ContextFileError(f"Could not load the TenSEAL context: {error}.") from error

    parms_id = tuple(context.seal_context().data.first_parms_id())
    if parms_id != _expected_parms_id(preset) or context.global_scale != preset.scale:
        raise ParameterMismatchError(
            f"TenSEAL context parameters do not match preset {preset.name!r} "
            f"(N={preset.poly_modulus_degree}, moduli {list(preset.coeff_mod_bit_sizes)} bits, "
            f"scale 2^{preset.scale_bits})."
        )

    if context.has_secret_key() != secret:
        kind = "secret" if secret else "public"
        raise ContextFileError(
            f"TenSEAL payload of a {kind} context "
            f"{'lacks' if secret else 'contains'} the secret key."
        )
    return context


def write_secret_context(context: SecretContext, directory: str | os.PathLike[str]) -> Path:
    """Write the secret context to ``directory/ckks_secret_context.bin`` with mode 0600.

    The directory is created with mode 0700 if missing. The file is written
    to a temporary name and renamed, so readers never see a partial key.
    """
    path = Path(directory) / SECRET_CONTEXT_FILENAME
    _write_file(path, context.serialize_secret(), mode=0o600)
    logger.info("write_secret_context: wrote %s, fingerprint %s", path, context.fingerprint)
    return path


def write_public_context(
    context: PublicContext | SecretContext, directory: str | os.PathLike[str]
) -> Path:
    """Write the public part of a context to ``directory/ckks_public_context.bin``."""
    public = context.public if isinstance(context, SecretContext) else context
    path = Path(directory) / PUBLIC_CONTEXT_FILENAME
    _write_file(path, public.serialize(), mode=0o644)
    logger.info("write_public_context: wrote %s, fingerprint %s", path, public.fingerprint)
    return path


def read_secret_context(directory: str | os.PathLike[str]) -> SecretContext:
    """Read ``directory/ckks_secret_context.bin``.

    Logs a WARNING if group or others can read the file.

    Raises
    ------
    ContextFileError
        If the file is missing, unreadable, or not a secret context.
    """
    path = Path(directory) / SECRET_CONTEXT_FILENAME
    data = _read_file(path)

    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "read_secret_context: %s has mode %o, so other users may read the secret key; "
            "run chmod 600 on it",
            path,
            mode,
        )

    context = SecretContext.from_bytes(data)
    logger.info("read_secret_context: read %s, fingerprint %s", path, context.fingerprint)
    return context


def read_public_context(directory: str | os.PathLike[str]) -> PublicContext:
    """Read ``directory/ckks_public_context.bin``.

    Raises
    ------
    ContextFileError
        If the file is missing, unreadable, or not a public context.
    """
    path = Path(directory) / PUBLIC_CONTEXT_FILENAME
    context = PublicContext.from_bytes(_read_file(path))
    logger.info("read_public_context: read %s, fingerprint %s", path, context.fingerprint)
    return context


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write bytes atomically to a file created with the given mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            # os.open applies the umask and keeps the mode of an existing file.
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def _read_file(path: Path) -> bytes:
    """Read a context file, raising ContextFileError when that fails."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ContextFileError(
            f"Context file {path} not found; write it with write_public_context or "
            "write_secret_context first."
        ) from None
    except OSError as error:
        raise ContextFileError(f"Could not read context file {path}: {error}.") from error

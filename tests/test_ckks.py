"""Tests for the CKKS encryption core (crypto.ckks)."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import struct
import zlib

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from crypto import ckks
from crypto.ckks import codec
from crypto.ckks.context import SealBytesIO

VECTOR_LENGTH = 10_000
CHUNK_FRAME = struct.Struct("<II")


@pytest.fixture(scope="module")
def compact() -> ckks.SecretContext:
    return ckks.generate_context("compact")


@pytest.fixture(scope="module")
def compact_wide() -> ckks.SecretContext:
    return ckks.generate_context("compact_wide")


@pytest.fixture(scope="module")
def tenseal_default() -> ckks.SecretContext:
    return ckks.generate_context("tenseal_default")


def make_updates(count: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """Float32 updates near one shared vector whose entries have magnitude 1e-2 to 1."""
    rng = np.random.default_rng(seed)
    base = rng.choice([-1.0, 1.0], length) * 10 ** rng.uniform(-2, 0, length)
    return [
        (base * (1 + 0.1 * rng.standard_normal(length))).astype(np.float32) for _ in range(count)
    ]


def weighted_sum(updates: list[np.ndarray], weights: list[float]) -> np.ndarray:
    return sum(weight * update.astype(np.float64) for update, weight in zip(updates, weights))


def reframe(index: int, payload: bytes) -> bytes:
    """Frame a payload as the batch format documents: index, CRC-32, payload."""
    return CHUNK_FRAME.pack(index, zlib.crc32(payload)) + payload


def payload_of(chunk: bytes) -> bytes:
    return chunk[CHUNK_FRAME.size :]


# --- Round trip ------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["compact", "compact_wide", "tenseal_default"])
def test_round_trip_weighted_sum(preset: str, request: pytest.FixtureRequest) -> None:
    # Prepare: 10,000 values span several ciphertexts of either preset.
    secret = request.getfixturevalue(preset)
    public = ckks.PublicContext.from_bytes(secret.public.serialize())
    updates = make_updates(3, VECTOR_LENGTH)
    weights = [0.2, 0.3, 0.5]

    # Execute
    batches = [ckks.encrypt_update(secret, u, w) for u, w in zip(updates, weights)]
    result = ckks.aggregate_batches(batches, public, VECTOR_LENGTH)
    total = ckks.decrypt_sum(secret, result.batch, VECTOR_LENGTH)

    # Assert
    exact = weighted_sum(updates, weights)
    assert len(batches[0]) - 1 == ckks.chunk_count(secret.preset, VECTOR_LENGTH)
    assert ckks.chunk_count(secret.preset, VECTOR_LENGTH) >= 3
    assert result.accepted == (0, 1, 2)
    assert result.rejected == {}
    assert total.dtype == np.float64
    assert total.shape == (VECTOR_LENGTH,)
    assert np.max(np.abs(total - exact) / np.abs(exact)) <= 1e-5
    bound = ckks.preflight(preset, num_nodes=3, norm_bound=1.0, weights=weights)
    assert np.max(np.abs(total - exact)) <= bound.predicted_max_error


def test_round_trip_float64_zero_weight(compact: ckks.SecretContext) -> None:
    update = np.linspace(-1.0, 1.0, 5000)

    counted = ckks.encrypt_update(compact, update, 0.5)
    ignored = ckks.encrypt_update(compact, update, 0.0)
    result = ckks.aggregate_batches([counted, ignored], compact.public, 5000)
    total = ckks.decrypt_sum(compact, result.batch, 5000)

    assert np.max(np.abs(total - 0.5 * update)) < 1e-7


def test_sum_updates_matches_aggregate_batches(compact: ckks.SecretContext) -> None:
    updates = make_updates(2, VECTOR_LENGTH, seed=1)
    batches = [ckks.encrypt_update(compact, u, 0.5) for u in updates]

    validated = [ckks.validate_batch(b, compact.public, VECTOR_LENGTH) for b in batches]
    summed = ckks.sum_updates(validated)
    header = ckks.read_header(summed)
    total = ckks.decrypt_sum(compact, summed, VECTOR_LENGTH)

    assert header.kind == ckks.KIND_AGGREGATE
    assert header.update_count == 2
    assert np.max(np.abs(total - weighted_sum(updates, [0.5, 0.5]))) < 1e-7


def test_header_describes_upload(compact: ckks.SecretContext) -> None:
    batch = ckks.encrypt_update(compact, np.ones(4097, dtype=np.float32))

    header = ckks.read_header(batch)

    assert header.preset.name == "compact"
    assert header.kind == ckks.KIND_UPLOAD
    assert header.update_count == 1
    assert header.fingerprint == compact.fingerprint
    assert header.vector_length == 4097
    assert header.chunk_count == 2
    assert len(batch) == 3


def test_seeded_upload_is_half_of_aggregate(compact: ckks.SecretContext) -> None:
    length = 8 * 4096
    upload = ckks.encrypt_update(compact, np.full(length, 0.1))
    aggregate = ckks.aggregate_batches([upload], compact.public, length).batch

    upload_bytes = sum(len(part) for part in upload)
    aggregate_bytes = sum(len(part) for part in aggregate)

    # A 42-bit coefficient in a 64-bit word compresses to about 6.4 bytes.
    assert upload_bytes / length < 6.6
    assert 0.45 < upload_bytes / aggregate_bytes < 0.55


# --- Public material cannot decrypt -------------------------------------------------


@pytest.mark.parametrize("preset", ["compact", "compact_wide", "tenseal_default"])
def test_public_context_cannot_decrypt(preset: str, request: pytest.FixtureRequest) -> None:
    secret = request.getfixturevalue(preset)
    public = ckks.PublicContext.from_bytes(secret.public.serialize())
    batch = ckks.encrypt_update(secret, np.ones(100))

    with pytest.raises(ckks.SecretKeyRequiredError, match="needs the secret key"):
        ckks.decrypt_sum(public, batch, 100)
    with pytest.raises(ckks.SecretKeyRequiredError, match="needs the secret key"):
        ckks.encrypt_update(public, np.ones(100))
    assert not hasattr(public, "decryptor")
    if public.tenseal_context is not None:
        assert not public.tenseal_context.has_secret_key()


def test_public_bytes_cannot_load_as_secret(compact: ckks.SecretContext) -> None:
    with pytest.raises(ckks.ContextFileError, match="public context where the secret"):
        ckks.SecretContext.from_bytes(compact.public.serialize())
    with pytest.raises(ckks.ContextFileError, match="secret context where a public"):
        ckks.PublicContext.from_bytes(compact.serialize_secret())


def test_fingerprint_is_public_sha256(compact: ckks.SecretContext) -> None:
    import hashlib

    expected = hashlib.sha256(compact.public.serialize()).hexdigest()

    assert compact.fingerprint == expected
    assert compact.public.fingerprint == expected
    assert ckks.generate_context("compact").fingerprint != expected


# --- Context files -----------------------------------------------------------------


def test_context_files_modes_round_trip(compact: ckks.SecretContext, tmp_path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    # An existing, readable file must not keep its mode.
    stale = directory / ckks.SECRET_CONTEXT_FILENAME
    stale.write_bytes(b"old")
    stale.chmod(0o644)

    secret_path = ckks.write_secret_context(compact, directory)
    public_path = ckks.write_public_context(compact, directory)
    secret = ckks.read_secret_context(directory)
    public = ckks.read_public_context(directory)

    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public_path).st_mode) == 0o644
    assert secret.fingerprint == compact.fingerprint
    assert public.fingerprint == compact.fingerprint
    assert isinstance(public, ckks.PublicContext)
    batch = ckks.encrypt_update(secret, np.full(10, 0.25))
    assert np.allclose(ckks.decrypt_sum(compact, batch, 10), 0.25, atol=1e-8)


def test_missing_context_file_names_path(tmp_path) -> None:
    with pytest.raises(ckks.ContextFileError, match="not found"):
        ckks.read_public_context(tmp_path)


def test_open_secret_file_logs_warning(compact, tmp_path, caplog) -> None:
    path = ckks.write_secret_context(compact, tmp_path)
    path.chmod(0o644)

    ckks.read_secret_context(tmp_path)

    assert "chmod 600" in caplog.text


# --- Validation on arrival ------------------------------------------------------------


@pytest.fixture(scope="module")
def good_batch(compact: ckks.SecretContext) -> list[bytes]:
    return ckks.encrypt_update(compact, make_updates(1, VECTOR_LENGTH)[0], 1.0)


def test_validate_accepts_good_batch(compact, good_batch) -> None:
    update = ckks.validate_batch(good_batch, compact.public, VECTOR_LENGTH)

    assert update.header.chunk_count == 3
    assert len(update.chunks) == 3


def test_fingerprint_mismatch_rejected(good_batch) -> None:
    other = ckks.generate_context("compact")

    with pytest.raises(ckks.FingerprintMismatchError) as caught:
        ckks.validate_batch(good_batch, other.public, VECTOR_LENGTH)

    assert "secret context that matches" in caught.value.reason


def test_wrong_preset_rejected(compact, tenseal_default) -> None:
    batch = ckks.encrypt_update(tenseal_default, np.ones(100))

    with pytest.raises(ckks.ParameterMismatchError, match="'tenseal_default'.*'compact'"):
        ckks.validate_batch(batch, compact.public, 100)


def test_truncated_chunk_rejected(compact, good_batch) -> None:
    batch = list(good_batch)
    batch[2] = batch[2][: len(batch[2]) // 2]

    with pytest.raises(ckks.MalformedBatchError, match="Chunk 1 CRC"):
        ckks.validate_batch(batch, compact.public, VECTOR_LENGTH)


def test_truncated_header_rejected(compact, good_batch) -> None:
    batch = [good_batch[0][:-1], *good_batch[1:]]

    with pytest.raises(ckks.MalformedBatchError, match="header has 64 bytes"):
        ckks.validate_batch(batch, compact.public, VECTOR_LENGTH)


def test_garbled_chunk_rejected(compact, good_batch) -> None:
    batch = list(good_batch)
    garbled = bytearray(batch[1])
    garbled[100] ^= 0xFF
    batch[1] = bytes(garbled)

    with pytest.raises(ckks.MalformedBatchError, match="Chunk 0 CRC"):
        ckks.validate_batch(batch, compact.public, VECTOR_LENGTH)


def test_garbled_payload_rejected_by_seal(compact, good_batch) -> None:
    # Fixing the CRC leaves SEAL's own checks as the last line of defence.
    batch = list(good_batch)
    garbled = bytearray(payload_of(batch[1]))
    garbled[20] ^= 0xFF
    batch[1] = reframe(0, bytes(garbled))

    with pytest.raises(ckks.MalformedBatchError, match="SEAL reported"):
        ckks.validate_batch(batch, compact.public, VECTOR_LENGTH)


def test_garbled_header_rejected(compact, good_batch) -> None:
    header = bytearray(good_batch[0])
    header[50] ^= 0x01

    with pytest.raises(ckks.MalformedBatchError, match="header CRC"):
        ckks.validate_batch([bytes(header), *good_batch[1:]], compact.public, VECTOR_LENGTH)


def test_reordered_chunks_rejected(compact, good_batch) -> None:
    batch = [good_batch[0], good_batch[2], good_batch[1], good_batch[3]]

    with pytest.raises(ckks.MalformedBatchError, match="reordered"):
        ckks.validate_batch(batch, compact.public, VECTOR_LENGTH)


def test_missing_chunk_rejected(compact, good_batch) -> None:
    with pytest.raises(ckks.ChunkCountError, match="2 chunks after the header, expected 3"):
        ckks.validate_batch(good_batch[:-1], compact.public, VECTOR_LENGTH)


def test_header_chunk_count_rejected(compact, good_batch) -> None:
    header = ckks.read_header(good_batch)
    forged = dataclasses.replace(header, chunk_count=4).pack()

    with pytest.raises(ckks.ChunkCountError, match="declares 4 chunks"):
        ckks.validate_batch([forged, *good_batch[1:]], compact.public, VECTOR_LENGTH)


def test_wrong_vector_length_rejected(compact, good_batch) -> None:
    with pytest.raises(ckks.VectorLengthError, match="encrypts 10000 values, expected 9999"):
        ckks.validate_batch(good_batch, compact.public, 9999)


def test_not_a_list_rejected(compact, good_batch) -> None:
    with pytest.raises(ckks.MalformedBatchError, match="list of bytes"):
        ckks.validate_batch(b"".join(good_batch), compact.public, VECTOR_LENGTH)


def test_wrong_scale_rejected(compact, good_batch) -> None:
    # Encrypt chunk 0 with scale 2^38 under the right key.
    plaintext = sealapi.Plaintext()
    compact.encoder.encode([0.5 + 0j] * 2048, 2.0**38, plaintext)
    with SealBytesIO() as scratch:
        payload = scratch.save(compact.encryptor.encrypt_symmetric(plaintext))
    batch = [good_batch[0], reframe(0, payload), *good_batch[2:]]

    with pytest.raises(ckks.ParameterMismatchError, match="scale"):
        ckks.validate_batch(batch, compact.public, VECTOR_LENGTH)


def test_other_modulus_level_rejected(tenseal_default) -> None:
    # A rescaled vector loads under the context but sits one level lower.
    batch = ckks.encrypt_update(tenseal_default, np.ones(100))
    lower = ts.ckks_vector(tenseal_default.tenseal_context, [1.0] * 4096) * 1.0
    batch[1] = reframe(0, lower.serialize())

    with pytest.raises(ckks.ParameterMismatchError, match="parms_id"):
        ckks.validate_batch(batch, tenseal_default.public, 100)


# --- Aggregation with bad batches -------------------------------------------------------


def test_aggregate_skips_bad_batches(compact, caplog) -> None:
    updates = make_updates(3, VECTOR_LENGTH, seed=2)
    batches = [ckks.encrypt_update(compact, u, 1 / 3) for u in updates]
    other = ckks.encrypt_update(ckks.generate_context("compact"), updates[0], 1 / 3)
    truncated = list(batches[2])
    truncated[3] = truncated[3][:-7]

    result = ckks.aggregate_batches(
        [batches[0], other, batches[1], truncated, ["not bytes"]], compact.public, VECTOR_LENGTH
    )
    total = ckks.decrypt_sum(compact, result.batch, VECTOR_LENGTH)

    assert result.accepted == (0, 2)
    assert sorted(result.rejected) == [1, 3, 4]
    assert isinstance(result.rejected[1], ckks.FingerprintMismatchError)
    assert isinstance(result.rejected[3], ckks.MalformedBatchError)
    assert isinstance(result.rejected[4], ckks.MalformedBatchError)
    assert ckks.read_header(result.batch).update_count == 2
    assert np.max(np.abs(total - weighted_sum(updates[:2], [1 / 3, 1 / 3]))) < 1e-7
    assert "rejected batch 3: MalformedBatchError" in caplog.text


def test_aggregate_without_valid_batch(compact, good_batch) -> None:
    result = ckks.aggregate_batches([good_batch[:-1]], compact.public, VECTOR_LENGTH)

    assert result.batch is None
    assert result.accepted == ()
    assert isinstance(result.rejected[0], ckks.ChunkCountError)


def test_worker_pool_matches_in_process(compact, good_batch) -> None:
    updates = make_updates(2, VECTOR_LENGTH, seed=3)
    garbled = list(good_batch)
    garbled[3] = reframe(2, payload_of(garbled[3])[:-50])

    with ckks.CkksWorkerPool(compact, workers=2) as pool:
        batches = [ckks.encrypt_update(compact, u, 0.5, pool=pool) for u in updates]
        # The bad chunk is the last one, so only the second task reads it.
        result = ckks.aggregate_batches([batches[0], garbled, batches[1]], compact.public,
                                        VECTOR_LENGTH, pool=pool)
        total = ckks.decrypt_sum(compact, result.batch, VECTOR_LENGTH, pool=pool)

    assert result.accepted == (0, 2)
    assert isinstance(result.rejected[1], ckks.MalformedBatchError)
    assert np.max(np.abs(total - weighted_sum(updates, [0.5, 0.5]))) < 1e-7


def test_worker_pool_streams_many_tasks(compact, monkeypatch, tmp_path) -> None:
    # One chunk or one kilobyte per task gives more tasks than the window of
    # two pending tasks per worker.
    monkeypatch.setattr(codec, "_MAX_TASK_CHUNKS", 1)
    monkeypatch.setattr(codec, "_MAX_TASK_BYTES", 1024)
    monkeypatch.setattr(codec, "scratch_directory", lambda: str(tmp_path))
    updates = make_updates(3, VECTOR_LENGTH, seed=4)

    with ckks.CkksWorkerPool(compact, workers=1) as pool:
        batches = [ckks.encrypt_update(compact, u, 0.25, pool=pool) for u in updates]
        result = ckks.aggregate_batches(batches, compact.public, VECTOR_LENGTH, pool=pool)
        total = ckks.decrypt_sum(compact, result.batch, VECTOR_LENGTH, pool=pool)

    assert [ckks.read_header(b).chunk_count for b in batches] == [3, 3, 3]
    assert result.accepted == (0, 1, 2)
    assert np.max(np.abs(total - weighted_sum(updates, [0.25] * 3))) < 1e-7
    assert os.listdir(tmp_path) == []


def test_worker_pool_rejects_other_context(compact) -> None:
    other = ckks.generate_context("compact")

    with ckks.CkksWorkerPool(other.public, workers=1) as pool:
        with pytest.raises(ValueError, match="worker pool was built for context"):
            ckks.encrypt_update(compact, np.ones(10), pool=pool)
        with pytest.raises(ckks.SecretKeyRequiredError, match="built from a PublicContext"):
            ckks.encrypt_update(other, np.ones(10), pool=pool)


# --- Encryption input checks -----------------------------------------------------------


def test_encrypt_rejects_update_above_norm_bound(compact) -> None:
    with pytest.raises(ValueError, match="L2 norm 2, above norm_bound 1; clip"):
        ckks.encrypt_update(compact, np.full(4, 1.0), norm_bound=1.0)


def test_encrypt_rejects_bad_inputs(compact) -> None:
    with pytest.raises(ValueError, match="1-D array"):
        ckks.encrypt_update(compact, np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ckks.encrypt_update(compact, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="float32 or float64, got dtype int64"):
        ckks.encrypt_update(compact, np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="weight must be finite and >= 0, got -1"):
        ckks.encrypt_update(compact, np.ones(3), -1.0)


def test_encrypt_rejects_coordinate_above_headroom(compact) -> None:
    # Headroom 4 over packing factor sqrt(2) and margin 2 leaves about 1.414.
    with pytest.raises(ckks.PreflightError, match="magnitude 1.5"):
        ckks.encrypt_update(compact, np.full(8, 1.5))


# --- Preflight -------------------------------------------------------------------------


def test_preflight_accepts_defaults() -> None:
    report = ckks.preflight("compact", num_nodes=10, norm_bound=1.0, weights=[0.1] * 10)

    assert report.aggregate_bound == pytest.approx(1.0)
    assert report.headroom == pytest.approx(4.0, rel=1e-6)
    assert report.required_headroom == pytest.approx(2 * math.sqrt(2))
    assert report.predicted_relative_error < 1e-6


def test_preflight_accepts_1000_nodes() -> None:
    report = ckks.preflight("compact", num_nodes=1000, norm_bound=1.0)

    assert report.predicted_relative_error < 1e-5


def test_preflight_rejects_wrap_and_names_bound() -> None:
    with pytest.raises(ckks.PreflightError) as caught:
        ckks.preflight("compact", num_nodes=10, norm_bound=3.0, weights=[0.1] * 10)

    reason = caught.value.reason
    assert "could wrap around" in reason
    assert "sum(weights) * norm_bound = 1 * 3 = 3" in reason
    assert "headroom q/(2*scale) = 4" in reason
    assert "lower norm_bound to <= 1.41421" in reason
    assert "'compact_wide' (headroom 512), 'tenseal_default' (headroom 6.338e+29)" in reason


def test_compact_wide_holds_large_updates() -> None:
    # Fraud's default SGD step moves some weights by more than 3 in one round.
    report = ckks.preflight("compact_wide", num_nodes=10, norm_bound=8.0, weights=[0.1] * 10)

    assert report.headroom == pytest.approx(512.0, rel=1e-6)
    assert report.predicted_relative_error < 1e-6
    with pytest.raises(ckks.PreflightError, match="could wrap around"):
        ckks.preflight("compact", num_nodes=10, norm_bound=8.0, weights=[0.1] * 10)
    assert ckks.preflight("compact_wide", num_nodes=1000, norm_bound=8.0).predicted_relative_error < 1e-5


def test_compact_wide_sums_beyond_compact_headroom(compact_wide) -> None:
    # Six nodes with weight 1 and coordinates 1.0 sum to 6: compact wraps, compact_wide does not.
    update = np.full(4096, 1.0)

    batches = [ckks.encrypt_update(compact_wide, update, 1.0) for _ in range(6)]
    result = ckks.aggregate_batches(batches, compact_wide.public, 4096)
    total = ckks.decrypt_sum(compact_wide, result.batch, 4096)

    assert np.max(np.abs(total - 6.0)) < 1e-6


def test_preflight_rejects_unnormalised_weights() -> None:
    sample_counts = [1000.0] * 10

    with pytest.raises(ckks.PreflightError, match="renormalise the weights"):
        ckks.preflight("compact", num_nodes=10, norm_bound=1.0, weights=sample_counts)

    ckks.preflight("tenseal_default", num_nodes=10, norm_bound=1.0, weights=sample_counts)


def test_preflight_rejects_low_precision() -> None:
    with pytest.raises(ckks.PreflightError, match="precision is too low"):
        ckks.preflight("compact", num_nodes=10, norm_bound=1e-4)


def test_preflight_rejects_40_bit_prime() -> None:
    narrow = dataclasses.replace(
        ckks.get_preset("compact"), name="narrow", coeff_mod_bit_sizes=(40,), scale_bits=37
    )

    ckks.preflight(narrow, num_nodes=10, norm_bound=1.0)
    with pytest.raises(ckks.PreflightError, match="Sum at most \\d+ nodes"):
        ckks.preflight(narrow, num_nodes=1000, norm_bound=1.0)


def test_preflight_limits_tenseal_default_nodes() -> None:
    # Public-key noise has heavier (Laplace) tails than compact's Gaussian noise.
    ckks.preflight("tenseal_default", num_nodes=30, norm_bound=1.0)

    with pytest.raises(ckks.PreflightError, match="Sum at most 32 nodes"):
        ckks.preflight("tenseal_default", num_nodes=1000, norm_bound=1.0)


def test_preflight_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="weights has 2 entries but num_nodes is 3"):
        ckks.preflight("compact", num_nodes=3, norm_bound=1.0, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="norm_bound must be finite and > 0, got 0"):
        ckks.preflight("compact", num_nodes=3, norm_bound=0.0)
    with pytest.raises(ValueError, match="Unknown CKKS preset 'big'.*'compact'"):
        ckks.preflight("big", num_nodes=3, norm_bound=1.0)


def test_rejected_sum_really_wraps(compact) -> None:
    # Six nodes with weight 1 and coordinates 1.0 sum to 6, above headroom 4.
    update = np.full(4096, 1.0)

    with pytest.raises(ckks.PreflightError):
        ckks.preflight("compact", num_nodes=6, norm_bound=1.0, weights=[1.0] * 6)
    batches = [ckks.encrypt_update(compact, update, 1.0) for _ in range(6)]
    result = ckks.aggregate_batches(batches, compact.public, 4096)
    total = ckks.decrypt_sum(compact, result.batch, 4096)

    assert np.max(np.abs(total - 6.0)) > 1.0


def test_generate_rejects_unregistered_preset() -> None:
    narrow = dataclasses.replace(ckks.get_preset("compact"), coeff_mod_bit_sizes=(40,))

    with pytest.raises(ValueError, match="not registered"):
        ckks.generate_context(narrow)


def test_security_table_matches_seal() -> None:
    for degree, max_bits in ckks.params.HE_STANDARD_MAX_MODULUS_BITS_128.items():
        assert sealapi.CoeffModulus.MaxBitCount(degree, sealapi.SEC_LEVEL_TYPE.TC128) == max_bits
    for preset in ckks.PRESETS.values():
        assert preset.total_modulus_bits <= preset.max_modulus_bits_128

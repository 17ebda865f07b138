"""Encrypted scoring statistics on real SEAL ciphertexts, checked against numpy in float64."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.ckks import scoring
from crypto.ckks.errors import (
    ContextFileError,
    FingerprintMismatchError,
    PreflightError,
    SecretKeyRequiredError,
    VectorLengthError,
)

# 10,000 values span three 4096-slot ciphertexts, the last one zero-padded.
LENGTH = 10_000
# Norms and distances: error relative to the value. Inner products can be
# near zero, so their error is relative to ||u|| * ||r|| (Cauchy-Schwarz bound).
RELATIVE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def secret() -> scoring.ScoringSecretContext:
    return scoring.generate_scoring_context()


@pytest.fixture(scope="module")
def public(secret: scoring.ScoringSecretContext) -> scoring.ScoringPublicContext:
    # A round trip through bytes, as the server receives it.
    return scoring.ScoringPublicContext.from_bytes(secret.public.serialize())


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.normal(0.0, 0.02, LENGTH)
    return {
        "u": base + rng.normal(0.0, 0.005, LENGTH),
        "v": base + rng.normal(0.0, 0.005, LENGTH),
        "r": rng.normal(0.0, 0.03, LENGTH),
    }


@pytest.fixture(scope="module")
def encrypted(secret, public, vectors) -> dict[str, scoring.ScoringUpdate]:
    return {
        name: scoring.ScoringUpdate.from_bytes(
            public, scoring.encrypt_for_scoring(secret, values), LENGTH
        )
        for name, values in vectors.items()
    }


def decrypt_via_bytes(secret, scalar: scoring.ScalarCiphertext) -> float:
    return scoring.decrypt_scalar(
        secret, scoring.ScalarCiphertext.from_bytes(secret, scalar.serialize())
    )


def test_update_spans_several_ciphertexts(encrypted) -> None:
    assert len(encrypted["u"].chunks) == 3


def test_squared_norm_matches_numpy(secret, public, vectors, encrypted) -> None:
    expected = float(vectors["u"] @ vectors["u"])
    value = decrypt_via_bytes(secret, scoring.squared_norm(public, encrypted["u"]))
    assert value == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


def test_squared_distance_matches_numpy(secret, public, vectors, encrypted) -> None:
    difference = vectors["u"] - vectors["v"]
    expected = float(difference @ difference)
    value = decrypt_via_bytes(
        secret, scoring.squared_distance(public, encrypted["u"], encrypted["v"])
    )
    assert value == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("reference", ["v", "r"])
def test_inner_product_matches_numpy(
    secret, public, vectors, encrypted, reference
) -> None:
    u, r = vectors["u"], vectors[reference]
    expected = float(u @ r)
    value = decrypt_via_bytes(
        secret, scoring.inner_product(public, encrypted["u"], encrypted[reference])
    )
    bound = RELATIVE_TOLERANCE * float(np.linalg.norm(u) * np.linalg.norm(r))
    assert abs(value - expected) <= bound


def test_public_context_has_no_decryptor(public) -> None:
    assert not hasattr(public, "decryptor")
    assert not hasattr(public, "secret_key")
    assert b"FSSCORSC" not in public.serialize()[:8]


def test_public_context_cannot_decrypt(public, encrypted) -> None:
    scalar = scoring.squared_norm(public, encrypted["u"])
    with pytest.raises(SecretKeyRequiredError, match="only committee nodes decrypt"):
        scoring.decrypt_scalar(public, scalar)  # type: ignore[arg-type]
    with pytest.raises(ContextFileError, match="secret scoring context"):
        scoring.ScoringSecretContext.from_bytes(public.serialize())


def test_scalar_under_other_context_rejected(public, encrypted) -> None:
    other = scoring.generate_scoring_context()
    data = scoring.squared_norm(public, encrypted["u"]).serialize()
    with pytest.raises(FingerprintMismatchError, match="different scoring keys"):
        scoring.ScalarCiphertext.from_bytes(other, data)


def test_update_under_other_context_rejected(vectors) -> None:
    first, second = (
        scoring.generate_scoring_context(),
        scoring.generate_scoring_context(),
    )
    data = scoring.encrypt_for_scoring(first, vectors["u"])
    with pytest.raises(FingerprintMismatchError):
        scoring.ScoringUpdate.from_bytes(second.public, data, LENGTH)


def test_update_of_wrong_length_rejected(public, secret, vectors) -> None:
    data = scoring.encrypt_for_scoring(secret, vectors["u"])
    with pytest.raises(VectorLengthError, match="expected 9999"):
        scoring.ScoringUpdate.from_bytes(public, data, LENGTH - 1)


def test_raw_update_not_decrypted_as_scalar(secret, encrypted) -> None:
    # Built directly, because from_bytes already rejects a fresh chunk by its level.
    raw = scoring.ScalarCiphertext(
        fingerprint=secret.fingerprint, ciphertext=encrypted["u"].chunks[0]
    )
    with pytest.raises(scoring.NotAScalarError, match="slots spread"):
        scoring.decrypt_scalar(secret, raw)


def test_norm_bound_enforced(secret, vectors) -> None:
    with pytest.raises(PreflightError, match="above the scoring norm bound"):
        scoring.encrypt_for_scoring(secret, vectors["u"], norm_bound=0.1)
    with pytest.raises(PreflightError, match="must be at most"):
        scoring.check_scoring_bound("scoring_8192", 1000.0)
    assert scoring.check_scoring_bound("scoring_8192", 10.0) == pytest.approx(
        256.0, rel=1e-3
    )


def test_context_files_round_trip(secret, tmp_path) -> None:
    scoring.write_scoring_secret_context(secret, tmp_path)
    scoring.write_scoring_public_context(secret, tmp_path)
    assert (
        scoring.read_scoring_secret_context(tmp_path).fingerprint == secret.fingerprint
    )
    assert (
        scoring.read_scoring_public_context(tmp_path).fingerprint == secret.fingerprint
    )
    assert (
        tmp_path / scoring.SCORING_SECRET_CONTEXT_FILENAME
    ).stat().st_mode & 0o077 == 0


def test_distance_skips_equal_chunks(secret, public, vectors, encrypted) -> None:
    # A node that copies part of another's ciphertext: equal chunks differ by exactly 0.
    u, v = encrypted["u"], encrypted["v"]
    mixed = scoring.ScoringUpdate(
        fingerprint=u.fingerprint, length=u.length, chunks=[u.chunks[0], *v.chunks[1:]]
    )
    difference = vectors["u"] - vectors["v"]
    expected = float(difference[4096:] @ difference[4096:])

    value = decrypt_via_bytes(secret, scoring.squared_distance(public, u, mixed))

    assert value == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


def test_distance_of_duplicate_rejected(public, encrypted) -> None:
    with pytest.raises(ValueError, match="reject the duplicate upload"):
        scoring.squared_distance(public, encrypted["u"], encrypted["u"])

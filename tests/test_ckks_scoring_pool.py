"""Scoring statistics from worker processes match the single-process ones."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.ckks import scoring
from crypto.ckks.errors import FingerprintMismatchError
from crypto.ckks.scoring.pool import ScoringWorkerPool

# Three ciphertexts, so two workers get uneven chunk ranges (1 and 2).
LENGTH = 10_000
RELATIVE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def secret() -> scoring.ScoringSecretContext:
    return scoring.generate_scoring_context()


@pytest.fixture(scope="module")
def plain() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.normal(0.0, 0.01, LENGTH) for _ in range(4)]


@pytest.fixture(scope="module")
def uploads(secret, plain) -> list[bytes]:
    return [scoring.encrypt_for_scoring(secret, values) for values in plain]


@pytest.fixture(scope="module")
def pool(secret):
    with ScoringWorkerPool(
        scoring.ScoringPublicContext.from_bytes(secret.public.serialize()), workers=2
    ) as workers:
        yield workers


def test_pool_statistics_match_numpy(secret, plain, uploads, pool) -> None:
    statistics = [
        ("norm", 0, 0),
        ("norm", 2, 2),
        ("distance", 0, 1),
        ("distance", 1, 2),
        ("inner", 0, 3),
    ]
    expected = [
        plain[0] @ plain[0],
        plain[2] @ plain[2],
        (plain[0] - plain[1]) @ (plain[0] - plain[1]),
        (plain[1] - plain[2]) @ (plain[1] - plain[2]),
        plain[0] @ plain[3],
    ]

    scalars = pool.compute(uploads, statistics, LENGTH)

    assert len(scalars) == len(statistics)
    for statistic, scalar, value in zip(statistics, scalars, expected, strict=True):
        bound = RELATIVE_TOLERANCE * float(
            np.linalg.norm(plain[statistic[1]]) * np.linalg.norm(plain[statistic[2]])
        )
        assert abs(scoring.decrypt_scalar(secret, scalar) - value) <= bound, statistic


def test_pool_matches_single_process(secret, uploads, pool) -> None:
    public = secret.public
    first, second = (
        scoring.ScoringUpdate.from_bytes(public, data, LENGTH) for data in uploads[:2]
    )
    single = scoring.decrypt_scalar(
        secret, scoring.squared_distance(public, first, second)
    )

    pooled = scoring.decrypt_scalar(
        secret, pool.compute(uploads, [("distance", 0, 1)], LENGTH)[0]
    )

    # The workers add partial chunk ranges, so the two ciphertexts carry
    # different CKKS noise: they agree to about 1e-9 relative, not exactly.
    assert pooled == pytest.approx(single, rel=1e-7)


def test_pool_rejects_duplicate_distance(uploads, pool) -> None:
    with pytest.raises(ValueError, match="reject the duplicate upload"):
        pool.compute([uploads[0], uploads[0]], [("distance", 0, 1)], LENGTH)


def test_pool_rejects_bad_input(secret, uploads, pool) -> None:
    with pytest.raises(ValueError, match="outside 0..1"):
        pool.compute(uploads[:2], [("norm", 2, 2)], LENGTH)
    with pytest.raises(ValueError, match="Unknown statistic 'mean'"):
        pool.compute(uploads[:2], [("mean", 0, 0)], LENGTH)
    other = scoring.generate_scoring_context()
    with pytest.raises(FingerprintMismatchError):
        pool.compute(
            [scoring.encrypt_for_scoring(other, np.ones(LENGTH))],
            [("norm", 0, 0)],
            LENGTH,
        )


def test_pool_takes_public_context_only(secret) -> None:
    with pytest.raises(TypeError, match="never receive a secret key"):
        ScoringWorkerPool(secret, workers=1)  # type: ignore[arg-type]

"""Worker processes that compute a round's scoring statistics in parallel.

The multiply-accumulate is linear in the chunks, so it splits by chunk
range. Phase 1 gives each worker one chunk range of every update. The
worker returns, for every requested statistic, the relinearized sum of its
products. The parent adds these partial sums. Phase 2 spreads the
statistics over the workers, which rotate-and-sum and rescale each one.
Each worker loads only its slice of each update, so the updates' loading is
split too.

Each worker rebuilds the public scoring context once, from bytes sent
through the process pipe. Workers never receive a secret key.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from types import TracebackType
from typing import Any, Self

from tenseal import sealapi

from crypto.ckks.context import SealBytesIO
from crypto.ckks.scoring.context import ScoringPublicContext
from crypto.ckks.scoring.scalars import ScalarCiphertext
from crypto.ckks.scoring.statistics import (
    STATISTICS,
    chunk_products,
    load_chunks,
    relinearized_sum,
    rotate_and_sum,
    split_update,
)

__all__ = ["ScoringWorkerPool", "Statistic"]

logger = logging.getLogger(__name__)

# (kind, i, j): "norm" uses update i (j is ignored), "distance" updates i and
# j, "inner" update i and reference j. Indices refer to the list of updates.
Statistic = tuple[str, int, int]

_CONTEXT: ScoringPublicContext | None = None


class ScoringWorkerPool:
    """Computes scoring statistics in worker processes.

    Parameters
    ----------
    context : ScoringPublicContext
        The server's public scoring context.
    workers : int, default 2
        Number of worker processes, at least 1.
    """

    def __init__(self, context: ScoringPublicContext, workers: int = 2) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
        if not isinstance(context, ScoringPublicContext):
            raise TypeError(
                f"ScoringWorkerPool takes the public scoring context, got {type(context).__name__}; "
                "workers must never receive a secret key."
            )

        self.context = context
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(context.serialize(),),
        )
        logger.info(
            "ScoringWorkerPool: started %d workers, fingerprint %s",
            workers,
            context.fingerprint[:16],
        )

    def compute(
        self,
        updates: Sequence[bytes],
        statistics: Sequence[Statistic],
        expected_length: int,
    ) -> list[ScalarCiphertext]:
        """Compute the requested statistics of serialized updates.

        Parameters
        ----------
        updates : sequence of bytes
            Outputs of `encrypt_for_scoring`, reference included.
        statistics : sequence of Statistic
            ``(kind, i, j)`` per statistic, indices into `updates`.
        expected_length : int
            Number of model parameters.

        Returns
        -------
        list of ScalarCiphertext
            One per statistic, in order.

        Raises
        ------
        CkksError
            If an update is malformed, under another key or of the wrong size.
        ValueError
            If a statistic names an unknown kind or index, or a distance
            compares two identical updates.
        """
        _check_statistics(statistics, len(updates))
        chunk_lists = [
            split_update(self.context, data, expected_length) for data in updates
        ]
        total_chunks = len(chunk_lists[0])
        parts = min(self.workers, total_chunks)
        ranges = [
            (total_chunks * k // parts, total_chunks * (k + 1) // parts)
            for k in range(parts)
        ]

        tasks = [
            ([chunks[start:stop] for chunks in chunk_lists], start, list(statistics))
            for start, stop in ranges
        ]
        partials = list(self._executor.map(_worker_partial_sums, tasks))
        totals = [
            self._add_partials([part[index] for part in partials], statistic)
            for index, statistic in enumerate(statistics)
        ]

        scalars = list(self._executor.map(_worker_rotate_and_sum, totals))
        return [ScalarCiphertext.from_bytes(self.context, data) for data in scalars]

    def _add_partials(
        self, partials: list[bytes | None], statistic: Statistic
    ) -> bytes:
        """Add the workers' partial sums of one statistic and return the serialized total."""
        present = [data for data in partials if data is not None]
        if not present:
            raise ValueError(
                f"Statistic {statistic} compares identical ciphertexts, so it is exactly 0, which "
                "SEAL cannot encrypt without a key; reject the duplicate upload before scoring."
            )
        if len(present) == 1:
            return present[0]

        with SealBytesIO() as scratch:
            total = _load_partial(self.context, scratch, present[0])
            for data in present[1:]:
                self.context.evaluator.add_inplace(
                    total, _load_partial(self.context, scratch, data)
                )
            return scratch.save(total)

    def close(self) -> None:
        """Stop the worker processes."""
        self._executor.shutdown(wait=True)
        logger.info("ScoringWorkerPool: stopped %d workers", self.workers)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_statistics(statistics: Sequence[Statistic], count: int) -> None:
    """Raise ValueError for an unknown kind or an index outside the update list."""
    if count == 0:
        raise ValueError("ScoringWorkerPool.compute needs at least one update.")
    for kind, i, j in statistics:
        if kind not in STATISTICS:
            raise ValueError(
                f"Unknown statistic {kind!r}; expected one of {STATISTICS}."
            )
        if not (0 <= i < count and 0 <= j < count):
            raise ValueError(
                f"Statistic {(kind, i, j)} names an update outside 0..{count - 1}."
            )


def _load_partial(
    context: ScoringPublicContext, scratch: SealBytesIO, data: bytes
) -> Any:
    """Load a partial sum written by a worker (size 2, first level, scale 2^80)."""
    ciphertext = sealapi.Ciphertext()
    scratch.load(ciphertext, data, context.seal_context)
    return ciphertext


def _init_worker(serialized_public: bytes) -> None:
    global _CONTEXT
    _CONTEXT = ScoringPublicContext.from_bytes(serialized_public)


def _worker_partial_sums(
    task: tuple[list[list[bytes]], int, list[Statistic]],
) -> list[bytes | None]:
    """Return the relinearized partial sum of every statistic over one chunk range."""
    chunk_lists, first_index, statistics = task
    context = _CONTEXT
    updates = [load_chunks(context, chunks, first_index) for chunks in chunk_lists]
    results: list[bytes | None] = []
    with SealBytesIO() as scratch:
        for kind, i, j in statistics:
            total = relinearized_sum(
                context, chunk_products(context, kind, updates[i], updates[j])
            )
            results.append(None if total is None else scratch.save(total))
    return results


def _worker_rotate_and_sum(data: bytes) -> bytes:
    """Rotate-and-sum and rescale one total; return the serialized scalar."""
    context = _CONTEXT
    with SealBytesIO() as scratch:
        total = _load_partial(context, scratch, data)
    return rotate_and_sum(context, total).serialize()

"""Ranking and rating metrics for leave-one-out recommendation.

Ranking follows the sampled protocol of He et al., "Neural Collaborative
Filtering" (WWW 2017): each user's held-out item is ranked among 99 items the
user never rated, and HR@k and NDCG@k are averaged over users.
"""

from __future__ import annotations

import numpy as np


def positive_ranks(positive_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """Rank each user's held-out item among that user's sampled negatives.

    Parameters
    ----------
    positive_scores : np.ndarray
        Score of each user's held-out item, shape ``(n,)``.
    negative_scores : np.ndarray
        Scores of each user's sampled negatives, shape ``(n, m)``.

    Returns
    -------
    np.ndarray
        0-based int64 rank per user, in ``0 .. m``. A negative whose score ties
        the held-out item's score counts as ranked above it, so a model that
        gives every item the same score ranks the held-out item last.

    Raises
    ------
    ValueError
        If the shapes do not match.
    """
    positive_scores = np.asarray(positive_scores)
    negative_scores = np.asarray(negative_scores)
    if negative_scores.ndim != 2 or positive_scores.shape != (negative_scores.shape[0],):
        raise ValueError(
            f"expected positive scores of shape (n,) and negative scores of shape (n, m), "
            f"got {positive_scores.shape} and {negative_scores.shape}"
        )

    return (negative_scores >= positive_scores[:, None]).sum(axis=1).astype(np.int64)


def hit_ratio_at_k(ranks: np.ndarray, k: int = 10) -> float:
    """Compute HR@k, the share of users whose held-out item has a 0-based rank below ``k``."""
    ranks = _check_ranks(ranks, k)
    return float(np.mean(ranks < k))


def ndcg_at_k(ranks: np.ndarray, k: int = 10) -> float:
    """Compute NDCG@k for one relevant item per user.

    The gain of a user is ``1 / log2(rank + 2)`` for a 0-based rank below ``k``
    and 0 otherwise. With a single relevant item the ideal DCG is 1, so this is
    also the normalised value.
    """
    ranks = _check_ranks(ranks, k)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(np.mean(gains))


def rmse(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Compute the root-mean-square error between predicted and true ratings.

    Raises
    ------
    ValueError
        If the arrays are empty or differ in shape.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions have shape {predictions.shape} but targets have shape {targets.shape}; "
            "pass one prediction per target"
        )
    if predictions.size == 0:
        raise ValueError("cannot compute RMSE of zero ratings; pass at least one rating")

    return float(np.sqrt(np.mean((predictions - targets) ** 2)))


def _check_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of ranks, got shape {ranks.shape}")
    if np.any(ranks < 0):
        raise ValueError(f"ranks are 0-based and must be non-negative, got minimum {ranks.min()}")
    return ranks

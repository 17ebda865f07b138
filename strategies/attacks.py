"""Model-poisoning attack maths on flattened update vectors.

Every function is pure: it takes float64 numpy vectors (one update) or
matrices (one honest update per row) and returns the malicious update. The
server-side simulation in ``strategies.attack_simulation`` chooses the
attackers and passes each one the honest updates it may use.

Sources:

- ALIE: Baruch, Baruch and Goldberg, "A Little Is Enough: Circumventing
  Defenses For Distributed Learning", NeurIPS 2019.
- IPM: Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant
  SGD by Inner Product Manipulation", UAI 2019.
- Min-Max: Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing
  Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021
  (the AGR-agnostic Min-Max attack).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# Perturbation directions p of Min-Max, each the reverse of a statistic of the
# honest updates: their per-coordinate std, their unit mean and the sign of their mean.
MIN_MAX_DIRECTIONS = ("std", "unit_mean", "sign")


def _as_matrix(honest: np.ndarray) -> np.ndarray:
    matrix = np.asarray(honest, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(
            f"honest updates must be a non-empty (k, d) matrix, got shape {matrix.shape}"
        )
    return matrix


def sign_flip(update: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Return ``-scale * update``: the attacker sends its own update reversed and scaled.

    Parameters
    ----------
    update : np.ndarray
        The attacker's honestly trained update, 1-D.
    scale : float
        Factor applied after the sign flip; must be positive.
    """
    if scale <= 0:
        raise ValueError(
            f"sign_flip scale must be > 0, got {scale}; set attack.scale to a positive number"
        )
    return -scale * np.asarray(update, dtype=np.float64)


def scaling(update: np.ndarray, boost: float) -> np.ndarray:
    """Return ``boost * update``: the attacker's own update, boosted.

    Parameters
    ----------
    update : np.ndarray
        The attacker's update, 1-D. Under label flipping this is already poisoned.
    boost : float
        Multiplier; must be positive.
    """
    if boost <= 0:
        raise ValueError(
            f"scaling boost must be > 0, got {boost}; set attack.boost to a positive number"
        )
    return boost * np.asarray(update, dtype=np.float64)


def gaussian(honest: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a random Gaussian direction with the mean norm of the honest updates.

    Parameters
    ----------
    honest : np.ndarray
        Honest updates, shape ``(k, d)``; only their mean L2 norm is used.
    rng : np.random.Generator
        Source of the random direction.
    """
    matrix = _as_matrix(honest)
    target_norm = float(np.linalg.norm(matrix, axis=1).mean())

    direction = rng.standard_normal(matrix.shape[1])
    norm = float(np.linalg.norm(direction))
    if norm == 0.0:
        return direction
    return direction * (target_norm / norm)


def alie_z(num_nodes: int, num_malicious: int) -> float:
    """Return ALIE's z for ``n`` nodes of which ``f`` are malicious.

    Baruch et al. (2019) need ``s = floor(n / 2 + 1) - f`` honest nodes on the
    attacker's side to win a majority, and take ``z = Phi^-1((n - s) / n)``,
    with ``Phi`` the standard normal CDF.

    Raises
    ------
    ValueError
        If ``f`` is not in ``1 .. n - 1``.
    """
    if not 0 < num_malicious < num_nodes:
        raise ValueError(
            f"ALIE needs 0 < f < n malicious nodes, got f={num_malicious}, n={num_nodes}"
        )

    supporters = math.floor(num_nodes / 2 + 1) - num_malicious
    quantile = (num_nodes - supporters) / num_nodes
    # With f >= n/2 + 1 the attackers are a majority on their own and the
    # formula's quantile reaches 1; cap it so z stays finite.
    quantile = min(quantile, 1.0 - 1e-6)
    return float(NormalDist().inv_cdf(quantile))


def alie(
    honest: np.ndarray, num_nodes: int, num_malicious: int, z: float | None = None
) -> np.ndarray:
    """Return the ALIE update ``mean - z * std`` of the honest updates, per coordinate.

    Parameters
    ----------
    honest : np.ndarray
        Honest updates, shape ``(k, d)``.
    num_nodes : int
        Nodes in the round, honest and malicious (``n``).
    num_malicious : int
        Malicious nodes in the round (``f``); sets z through ``alie_z``.
    z : float, optional
        Fixed z in place of ``alie_z(n, f)``; must be positive. Setting it
        departs from Baruch et al., whose z depends only on n and f.

    Notes
    -----
    The standard deviation is the sample one (``ddof=1``) when ``k > 1``, and
    zero for a single honest update.
    """
    if z is not None and not (math.isfinite(z) and z > 0):
        raise ValueError(
            f"ALIE z must be a positive finite number, got {z}; set attack.z to a positive number or null"
        )
    matrix = _as_matrix(honest)
    mean = matrix.mean(axis=0)
    std = matrix.std(axis=0, ddof=1) if matrix.shape[0] > 1 else np.zeros_like(mean)
    shift = alie_z(num_nodes, num_malicious) if z is None else z
    return mean - shift * std


def ipm(honest: np.ndarray, epsilon: float) -> np.ndarray:
    """Return the inner-product manipulation update ``-epsilon * mean(honest)``.

    Parameters
    ----------
    honest : np.ndarray
        Honest updates, shape ``(k, d)``.
    epsilon : float
        Positive scale of the reversed mean.
    """
    if epsilon <= 0:
        raise ValueError(
            f"ipm epsilon must be > 0, got {epsilon}; set attack.epsilon to a positive number"
        )
    return -epsilon * _as_matrix(honest).mean(axis=0)


def min_max_direction(honest: np.ndarray, direction: str) -> np.ndarray:
    """Return the perturbation direction p of Min-Max.

    ``std`` gives ``-std`` (per coordinate), ``unit_mean`` gives
    ``-mean / ||mean||`` and ``sign`` gives ``-sign(mean)``, the inverse
    standard deviation, inverse unit vector and inverse sign of Shejwalkar and
    Houmansadr (NDSS 2021). A zero mean gives a zero ``unit_mean`` direction.
    """
    matrix = _as_matrix(honest)
    if direction == "std":
        return -matrix.std(axis=0)
    mean = matrix.mean(axis=0)
    if direction == "unit_mean":
        norm = float(np.linalg.norm(mean))
        return -mean / norm if norm > 0 else np.zeros_like(mean)
    if direction == "sign":
        return -np.sign(mean)
    raise ValueError(
        f"unknown Min-Max direction {direction!r}; set attack.direction to one of {MIN_MAX_DIRECTIONS}"
    )


def _max_distance_to(point: np.ndarray, matrix: np.ndarray) -> float:
    return float(np.sqrt(((matrix - point) ** 2).sum(axis=1)).max())


def max_pairwise_distance(matrix: np.ndarray) -> float:
    """Return the largest L2 distance between two rows of ``matrix``."""
    matrix = _as_matrix(matrix)
    return max(_max_distance_to(row, matrix) for row in matrix)


def min_max(
    honest: np.ndarray,
    direction: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
    max_doublings: int = 60,
) -> tuple[np.ndarray, float]:
    """Return the Min-Max update ``mean + gamma * p`` and its gamma.

    Gamma is the largest value for which the malicious update's largest distance
    to any honest update stays within the largest distance between two honest
    updates. Gamma = 0 always meets that bound, so the search doubles an upper
    bound until it fails and then bisects.

    Parameters
    ----------
    honest : np.ndarray
        Honest updates, shape ``(k, d)``.
    direction : str
        One of ``MIN_MAX_DIRECTIONS``: ``std`` (p = -std of the honest
        updates), ``unit_mean`` (p = -mean / ||mean||) or ``sign`` (p = -sign(mean)).
    gamma_init : float
        First gamma tried.
    tolerance : float
        Width of the final bisection interval.
    max_doublings : int
        Bound on the doublings of the upper bound, for a direction that never
        violates the bound (a zero direction).

    Returns
    -------
    update : np.ndarray
        The malicious update, 1-D.
    gamma : float
        The gamma used.
    """
    matrix = _as_matrix(honest)
    mean = matrix.mean(axis=0)
    perturbation = min_max_direction(matrix, direction)
    bound = max_pairwise_distance(matrix)

    def feasible(gamma: float) -> bool:
        return _max_distance_to(mean + gamma * perturbation, matrix) <= bound

    low, high = 0.0, float(gamma_init)
    for _ in range(max_doublings):
        if not feasible(high):
            break
        low, high = high, 2.0 * high
    else:
        return mean + low * perturbation, low

    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if feasible(middle):
            low = middle
        else:
            high = middle
    return mean + low * perturbation, low

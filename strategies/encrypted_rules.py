"""Robust rules on decrypted statistics: which encrypted updates to sum, and with what weight.

``he_robust`` never reads an update. It gets the committee's medians of the
round's squared norms, pairwise squared distances and inner products with
the validator's reference (``strategies.encrypted_scoring.RoundScores``), and
turns them into one plaintext weight per update. The server then sums
``weight_i * Enc(u_i)``. Each rule matches its plaintext counterpart:

- ``norm_bound``: reject (or scale down to the limit) every update whose
  norm exceeds ``multiple`` times the round's median norm, as
  ``strategies.validation`` does with ``max_norm_ratio``; the rest are
  averaged by example count.
- ``krum`` / ``multikrum``: the selection of ``strategies.robust`` from the
  decrypted distances (``multikrum_selection``), averaged by example count,
  as Flower's MultiKrum averages the selected replies.
- ``trust``: FLTrust (Cao et al., NDSS 2021) as ``strategies.trust``:
  ``score_i = ReLU(<u_i, r> / (||u_i|| ||r||))``, rescale factor
  ``||r|| / ||u_i||`` and weight ``score_i / sum(score) * factor_i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from strategies.robust import krum_scores, multikrum_selection

RULES = ("norm_bound", "krum", "multikrum", "trust")
NORM_MODES = ("reject", "scale")


@dataclass
class RuleDecision:
    """One round's outcome of a rule, by update position.

    Attributes
    ----------
    weights : numpy.ndarray
        Shape (n,): the plaintext multiplier of each encrypted update; 0 leaves it out.
    reasons : dict of int to str
        Why each left-out update was rejected.
    details : dict of int to dict
        Per-update figures for the logs (norms, Krum scores, trust scores).
    """

    weights: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)
    details: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def selected(self) -> list[int]:
        """Positions with a non-zero weight."""
        return [int(i) for i in np.flatnonzero(self.weights)]


def norms_from_squares(squared_norms: np.ndarray) -> np.ndarray:
    """Return L2 norms from decrypted squared norms; CKKS noise can make a zero slightly negative."""
    return np.sqrt(np.maximum(np.asarray(squared_norms, dtype=np.float64), 0.0))


def example_weights(examples: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Return weights proportional to `examples` over the positions in `keep`, summing to 1 (zeros elsewhere)."""
    examples = np.asarray(examples, dtype=np.float64) * np.asarray(keep, dtype=bool)
    total = float(examples.sum())
    return examples / total if total > 0 else np.zeros_like(examples)


def norm_bound_rule(squared_norms: np.ndarray, examples: np.ndarray, multiple: float, mode: str = "reject") -> RuleDecision:
    """Reject or scale updates whose norm exceeds ``multiple`` times the median norm.

    Parameters
    ----------
    squared_norms : numpy.ndarray
        Shape (n,), decrypted ``||u_i||^2``.
    examples : numpy.ndarray
        Shape (n,), each node's training example count.
    multiple : float
        Largest accepted norm as a multiple of the round's median, > 0.
    mode : {"reject", "scale"}
        ``reject`` leaves such updates out; ``scale`` multiplies them by
        ``limit / norm`` so they count with the limit's norm.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"Unknown norm mode {mode!r}; use one of {NORM_MODES}.")
    norms = norms_from_squares(squared_norms)
    median = float(np.median(norms))
    limit = multiple * median
    over = norms > limit

    decision = RuleDecision(weights=np.zeros(norms.size))
    factors = np.ones(norms.size)
    if mode == "scale":
        factors = np.where(over, np.divide(limit, norms, out=np.ones_like(norms), where=norms > 0), 1.0)
        decision.weights = example_weights(examples, np.ones(norms.size, dtype=bool)) * factors
    else:
        decision.weights = example_weights(examples, ~over)
        for i in np.flatnonzero(over):
            decision.reasons[int(i)] = f"norm {norms[i]:.6g} exceeds {multiple:g} x the round's median norm {median:.6g}"
    for i in range(norms.size):
        decision.details[i] = {"norm": float(norms[i]), "median_norm": median, "factor": float(factors[i])}
    return decision


def krum_rule(squared_distances: np.ndarray, examples: np.ndarray, num_malicious: int, num_selected: int) -> RuleDecision:
    """Select the `num_selected` updates with the lowest Krum scores and average them by example count.

    Parameters
    ----------
    squared_distances : numpy.ndarray
        Shape (n, n), decrypted ``||u_i - u_j||^2``, symmetric with a zero diagonal.
    examples : numpy.ndarray
        Shape (n,), each node's training example count.
    num_malicious : int
        f, the malicious updates assumed.
    num_selected : int
        1 for Krum, up to n for Multi-Krum.
    """
    distances = np.maximum(np.asarray(squared_distances, dtype=np.float64), 0.0)
    scores = krum_scores(distances, num_malicious)
    chosen = multikrum_selection(distances, num_malicious, num_selected)
    keep = np.zeros(distances.shape[0], dtype=bool)
    keep[chosen] = True

    decision = RuleDecision(weights=example_weights(examples, keep))
    for i in range(distances.shape[0]):
        decision.details[i] = {"krum_score": float(scores[i])}
        if not keep[i]:
            decision.reasons[i] = f"Krum score {scores[i]:.6g} is not among the {num_selected} lowest (f={num_malicious})"
    return decision


def trust_rule(inner_products: np.ndarray, squared_norms: np.ndarray, reference_norm: float) -> RuleDecision:
    """Weight updates by FLTrust scores, each rescaled to the reference norm.

    Parameters
    ----------
    inner_products : numpy.ndarray
        Shape (n,), decrypted ``<u_i, r>``.
    squared_norms : numpy.ndarray
        Shape (n,), decrypted ``||u_i||^2``.
    reference_norm : float
        ``||r||``, reported by the validator.

    Returns
    -------
    RuleDecision
        All weights 0 when every score is 0; then no update can be trusted.
    """
    norms = norms_from_squares(squared_norms)
    denominators = norms * float(reference_norm)
    inner = np.asarray(inner_products, dtype=np.float64)
    cosines = np.divide(inner, denominators, out=np.zeros_like(inner), where=denominators > 0)
    scores = np.maximum(cosines, 0.0)
    factors = np.divide(float(reference_norm), norms, out=np.zeros_like(norms), where=norms > 0)

    total = float(scores.sum())
    shares = scores / total if total > 0 else np.zeros_like(scores)
    decision = RuleDecision(weights=shares * factors)
    for i in range(norms.size):
        decision.details[i] = {"trust": float(scores[i]), "weight": float(shares[i]), "factor": float(factors[i]), "norm": float(norms[i])}
        if scores[i] == 0.0:
            decision.reasons[i] = f"trust score 0: cosine {cosines[i]:.6g} with the reference is not positive"
    return decision

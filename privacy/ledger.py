"""A node's privacy ledger: every DP-SGD step it has taken in a run, kept on disk.

The ledger is the source of truth for a node's privacy loss. It stores the
Opacus accountant history, a list of ``(noise_multiplier, sample_rate, steps)``
entries, as JSON in the node's state directory. Epsilon is computed from the
whole history, so it composes over every step of every round and survives
process restarts. In simulation a node's ClientApp can run in a different
worker process each round, so the file, never a process's memory, contains the
state.

A round is charged *before* it trains (``PrivacyLedger.charge``): once the
data has been touched the privacy cost is spent, even if the process dies
before it replies.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Version of the JSON layout, checked on read.
LEDGER_FORMAT = 1

# Accountants whose state is the (noise_multiplier, sample_rate, steps) history.
ACCOUNTANTS = ("rdp", "prv")

# Error code of a node's reply when it declines to train because of its budget.
# Flower's own codes (flwr.common.constant.ErrorCode) are below 100.
BUDGET_EXHAUSTED_ERROR_CODE = 1001

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


class PrivacyBudgetExhausted(RuntimeError):
    """Raised when a node's next round would take its epsilon above its budget.

    Parameters
    ----------
    partition_id : int
        The node that declines.
    epsilon : float
        Epsilon spent so far.
    projected : float
        Epsilon after the declined round.
    budget : float
        The node's epsilon budget.
    delta : float
        The delta all three epsilons refer to.
    """

    def __init__(self, partition_id: int, epsilon: float, projected: float, budget: float, delta: float) -> None:
        self.partition_id = partition_id
        self.epsilon = epsilon
        self.projected = projected
        self.budget = budget
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: node {partition_id} has spent epsilon={epsilon:.4f} "
            f"(delta={delta:.3g}); one more round would reach {projected:.4f}, above its budget "
            f"{budget:.4f}. The node declines to train; raise privacy.budget or start a new run."
        )


@dataclass(frozen=True)
class Charge:
    """One round's DP-SGD steps, all with the same noise multiplier and sampling rate."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: float = 0.0


def ledger_path(state_dir: Path, run_key: str) -> Path:
    """Return the ledger file of run ``run_key`` inside a node's state directory.

    Raises
    ------
    ValueError
        If ``run_key`` contains characters other than letters, digits, ``_``, ``.`` and ``-``.
    """
    if not _SAFE_KEY.match(run_key):
        raise ValueError(f"run key {run_key!r} is not a safe file name; use letters, digits, '_', '.' or '-'")
    return Path(state_dir) / f"privacy-ledger-{run_key}.json"


def merge_history(charges: list[Charge]) -> list[tuple[float, float, int]]:
    """Return ``(noise_multiplier, sample_rate, steps)`` entries, merging consecutive equal settings."""
    merged: list[tuple[float, float, int]] = []
    for charge in charges:
        if merged and merged[-1][:2] == (charge.noise_multiplier, charge.sample_rate):
            noise, rate, steps = merged[-1]
            merged[-1] = (noise, rate, steps + charge.steps)
        else:
            merged.append((charge.noise_multiplier, charge.sample_rate, charge.steps))
    return merged


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Return the epsilon of an Opacus accountant history at ``delta``.

    Parameters
    ----------
    history : list of (float, float, int)
        ``(noise_multiplier, sample_rate, steps)`` entries, composed in order.
    delta : float
        Target delta, in (0, 1).
    accountant : str
        ``rdp`` or ``prv`` (``opacus.accountants``).

    Returns
    -------
    float
        0.0 for an empty history; ``inf`` when an entry has no noise.
    """
    entries = tuple((float(noise), float(rate), int(steps)) for noise, rate, steps in history)
    return _cached_epsilon(entries, float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # A round's projected epsilon is the next round's spent epsilon, and one
    # RDP evaluation at fractional orders takes about 0.2 s on one core.
    if not history:
        return 0.0
    if any(noise <= 0.0 for noise, _, _ in history):
        return math.inf

    # Imported here so that reading a ledger's settings does not load Opacus.
    from opacus.accountants import create_accountant

    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = list(history)
    return float(opacus_accountant.get_epsilon(delta=delta))


class PrivacyLedger:
    """The DP-SGD steps one node has taken in one run, stored in a JSON file.

    Parameters
    ----------
    path : Path
        The ledger file (see ``ledger_path``). Its folder is created on the first charge.
    accountant : str
        ``rdp`` or ``prv``; must match the accountant of an existing file.

    Notes
    -----
    One node has one writer: Flower sends a node at most one training
    message at a time, so read-charge-write needs no file lock. Writes go
    through a temporary file and ``os.replace``, so a crash leaves either the
    old or the new ledger, never a partial one.
    """

    def __init__(self, path: Path, accountant: str = "rdp") -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")

        self.path = Path(path)
        self.accountant = accountant
        self.charges: list[Charge] = []
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        raw = json.loads(self.path.read_text(encoding="utf-8"))
        if raw.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{self.path} has ledger format {raw.get('format')!r}, expected {LEDGER_FORMAT}; it was written by another version")
        if raw.get("accountant") != self.accountant:
            raise ValueError(
                f"{self.path} was kept with the {raw.get('accountant')!r} accountant but privacy.accountant={self.accountant!r}; "
                "keep the accountant of a run unchanged"
            )
        self.charges = [Charge(**entry) for entry in raw["charges"]]

    @property
    def steps(self) -> int:
        """Number of DP-SGD steps charged so far."""
        return sum(charge.steps for charge in self.charges)

    @property
    def rounds(self) -> int:
        """Number of rounds charged so far."""
        return len(self.charges)

    def history(self) -> list[tuple[float, float, int]]:
        """Return the Opacus accountant history, with equal consecutive entries merged.

        Merging gives the same history that ``RDPAccountant.step`` builds one
        step at a time, so the epsilon is identical.
        """
        return merge_history(self.charges)

    def epsilon(self, delta: float) -> float:
        """Return the epsilon spent so far at ``delta``."""
        return compute_epsilon(self.history(), delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Return the epsilon at ``delta`` after ``steps`` more steps, without charging them."""
        planned = Charge(-1, float(noise_multiplier), float(sample_rate), int(steps))
        return compute_epsilon(merge_history([*self.charges, planned]), delta, self.accountant)

    def charge(self, server_round: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append one round's steps and write the ledger to disk.

        Raises
        ------
        ValueError
            If ``steps`` is negative or ``sample_rate`` is outside (0, 1].
        """
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")

        self.charges.append(Charge(int(server_round), float(noise_multiplier), float(sample_rate), int(steps), round(time.time(), 3)))
        self.save()
        logger.debug("Charged round %d: %d steps at noise %.4f, rate %.5f to %s", server_round, steps, noise_multiplier, sample_rate, self.path)

    def save(self) -> None:
        """Write the ledger atomically (temporary file, then ``os.replace``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "format": LEDGER_FORMAT,
            "accountant": self.accountant,
            "charges": [charge.__dict__ for charge in self.charges],
            "history": [list(entry) for entry in self.history()],
        }

        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

"""Per-node reputation from trust scores, with quarantine and probation.

Reputation is an exponential moving average of a node's trust scores:
``r <- decay * r + (1 - decay) * score``, starting from ``initial``. A node is
*low* in a round when its reputation is below ``threshold`` times the median
reputation of the nodes scored in that round. The bar is relative because
honest cosine scores fall as training converges. On the fraud scenario (10
nodes, Dirichlet alpha 1, SGD at lr 0.03 for 2 epochs per round) the median
honest trust score fell from 0.97 in round 1 to about 0.4 in round 8, so a
fixed bar would in time flag every node. A node that is low in ``patience`` consecutive scored rounds is
quarantined: it is not sampled for ``quarantine_rounds`` rounds. It then
comes back on probation for ``probation_rounds`` rounds with its reputation
reset to the bar, and a single low round during probation quarantines it again.

Nodes are keyed by partition id, which stays the same across rounds and runs,
unlike Flower's node ids.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReputationSettings:
    """Settings of the reputation average and of quarantine.

    Parameters
    ----------
    decay : float
        Weight of the previous reputation in the moving average, in [0, 1).
    initial : float
        Reputation of a node before its first score.
    threshold : float
        Share of the round's median reputation below which a round counts against the node.
    patience : int
        Consecutive rounds below ``threshold`` that trigger quarantine (k >= 1).
    quarantine_rounds : int
        Rounds a quarantined node is left out of sampling (>= 1).
    probation_rounds : int
        Rounds after release in which one round below ``threshold`` quarantines again (>= 0).
    """

    decay: float = 0.5
    initial: float = 1.0
    threshold: float = 0.2
    patience: int = 3
    quarantine_rounds: int = 5
    probation_rounds: int = 3

    def __post_init__(self) -> None:
        checks = [
            ("decay", 0.0 <= self.decay < 1.0, "in [0, 1)"),
            ("threshold", 0.0 <= self.threshold <= 1.0, "in [0, 1]"),
            ("patience", self.patience >= 1, "an integer >= 1"),
            ("quarantine_rounds", self.quarantine_rounds >= 1, "an integer >= 1"),
            ("probation_rounds", self.probation_rounds >= 0, "an integer >= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"Invalid setting strategy.{name}={getattr(self, name)}: it must be {allowed}.")


@dataclass
class NodeStanding:
    """One node's reputation and quarantine state.

    Attributes
    ----------
    reputation : float
        Current moving average of trust scores.
    rounds_below : int
        Consecutive scored rounds with reputation below the threshold.
    quarantined_until : int
        Last round the node is left out; 0 when it is not quarantined.
    probation_until : int
        Last round of probation; 0 when it is not on probation.
    quarantines : int
        How many times the node has been quarantined.
    """

    reputation: float
    rounds_below: int = 0
    quarantined_until: int = 0
    probation_until: int = 0
    quarantines: int = 0


@dataclass
class ReputationBook:
    """Reputation of every node seen so far, and the quarantine decisions that follow from it.

    Parameters
    ----------
    settings : ReputationSettings
        Decay, threshold and quarantine lengths.
    """

    settings: ReputationSettings = field(default_factory=ReputationSettings)
    standings: dict[int, NodeStanding] = field(default_factory=dict)

    def is_quarantined(self, partition_id: int, server_round: int) -> bool:
        """Return whether ``partition_id`` must be left out of ``server_round``."""
        standing = self.standings.get(partition_id)
        return standing is not None and server_round <= standing.quarantined_until

    def release_due(self, server_round: int) -> list[int]:
        """Put nodes whose quarantine ended before ``server_round`` on probation; return their ids."""
        reputations = [standing.reputation for standing in self.standings.values() if not standing.quarantined_until]
        bar = self.settings.threshold * (float(np.median(reputations)) if reputations else self.settings.initial)

        released = []
        for partition_id, standing in sorted(self.standings.items()):
            if standing.quarantined_until and server_round > standing.quarantined_until:
                standing.quarantined_until = 0
                standing.rounds_below = 0
                standing.reputation = bar
                standing.probation_until = server_round + self.settings.probation_rounds - 1
                released.append(partition_id)
        return released

    def record_round(self, scores: dict[int, float], server_round: int) -> list[int]:
        """Fold one round's trust scores into the reputations and return the nodes quarantined now.

        Parameters
        ----------
        scores : dict of int to float
            Trust score per partition id scored in this round.
        server_round : int
            The round; a node quarantined now is left out from the next round
            for ``quarantine_rounds`` rounds.
        """
        settings = self.settings
        for partition_id, score in scores.items():
            standing = self.standings.setdefault(partition_id, NodeStanding(reputation=settings.initial))
            standing.reputation = settings.decay * standing.reputation + (1.0 - settings.decay) * float(score)
        if not scores:
            return []

        bar = settings.threshold * float(np.median([self.standings[pid].reputation for pid in scores]))
        quarantined = []
        for partition_id in sorted(scores):
            standing = self.standings[partition_id]
            below = standing.reputation < bar
            standing.rounds_below = standing.rounds_below + 1 if below else 0

            on_probation = server_round <= standing.probation_until
            if below and (on_probation or standing.rounds_below >= settings.patience):
                standing.quarantined_until = server_round + settings.quarantine_rounds
                standing.probation_until = 0
                standing.quarantines += 1
                quarantined.append(partition_id)
        return quarantined

    def reputation(self, partition_id: int) -> float:
        """Return the node's reputation (``settings.initial`` before its first score)."""
        standing = self.standings.get(partition_id)
        return self.settings.initial if standing is None else standing.reputation

    def state_dict(self) -> dict[str, Any]:
        """Return the settings and every node's standing as plain JSON-serializable data."""
        return {
            "settings": asdict(self.settings),
            "standings": {str(partition_id): asdict(standing) for partition_id, standing in self.standings.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the settings in ``state`` replace the current ones."""
        self.settings = ReputationSettings(**state["settings"])
        self.standings = {int(partition_id): NodeStanding(**standing) for partition_id, standing in state["standings"].items()}

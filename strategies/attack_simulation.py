"""Simulated Byzantine nodes: a server-side wrapper that swaps attacker replies for crafted ones.

The attacker nodes train like every other node. In ``aggregate_train`` this
wrapper replaces the arrays of their replies with a malicious update computed
from the round's replies, before update validation and the aggregation rule
see them. That is the usual way to simulate model poisoning, and it keeps the
ClientApp free of attack code.

Threat model. ``sign_flip`` and ``scaling`` use only the attacker's own
update. ``gaussian`` (honest norm), ``alie``, ``ipm`` and ``min_max`` assume
the attackers see every honest update of the round, the strong model of the
papers that define them (see ``strategies.attacks``). ``label_flip`` is data
poisoning: the attacker nodes flip their own training labels (the ClientApp
reads the attacker ids from ``TaskSpec.attack``) and send honest-looking
updates, so this wrapper leaves their replies alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies import attacks
from strategies.recording import partition_of
from strategies.updates import (
    arrays_from_update,
    flat_update,
    replace_arrays,
    reply_arrays,
    report_event,
    to_numpy,
)

logger = logging.getLogger(__name__)

ATTACKS = (
    "none",
    "sign_flip",
    "gaussian",
    "scaling",
    "label_flip",
    "alie",
    "ipm",
    "min_max",
)
# Attacks crafted on the server from the replies of the round.
MODEL_POISONING = ("sign_flip", "gaussian", "scaling", "alie", "ipm", "min_max")
# Attacks that read the honest updates of the round (the strong threat model).
SEES_HONEST_UPDATES = ("gaussian", "alie", "ipm", "min_max")


@dataclass(frozen=True)
class AttackSettings:
    """One simulated attack, as set in the Hydra ``attack`` group.

    Parameters
    ----------
    name : str
        One of ``ATTACKS``.
    fraction : float
        Share of the nodes that attack, in [0, 1). The count is ``round(fraction * nodes)``.
    seed : int
        Seed of the attacker choice and of random attack updates.
    scale : float
        ``sign_flip`` factor.
    boost : float
        ``scaling`` multiplier.
    epsilon : float
        ``ipm`` scale of the reversed honest mean.
    direction : str
        ``min_max`` perturbation: ``std``, ``unit_mean`` or ``sign``.
    z : float or None
        ``alie`` shift in standard deviations; None takes z from n and f as
        Baruch et al. do, a positive number replaces it.
    """

    name: str = "none"
    fraction: float = 0.0
    seed: int = 0
    scale: float = 1.0
    boost: float = 10.0
    epsilon: float = 0.5
    direction: str = "std"
    z: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(
                f"Unknown attack {self.name!r}. Valid attacks: {', '.join(ATTACKS)}."
            )
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(
                f"Invalid setting attack.fraction={self.fraction}: it must be in [0, 1)."
            )
        if self.direction not in attacks.MIN_MAX_DIRECTIONS:
            raise ValueError(
                f"Invalid setting attack.direction={self.direction!r}: use one of {attacks.MIN_MAX_DIRECTIONS}."
            )
        if self.z is not None and not (np.isfinite(self.z) and self.z > 0):
            raise ValueError(
                f"Invalid setting attack.z={self.z}: it must be a positive number, or null for the z of n and f."
            )

    @classmethod
    def from_config(cls, attack_cfg: Any) -> AttackSettings:
        """Build the settings from the Hydra ``attack`` node; missing keys take the defaults."""
        if attack_cfg is None:
            return cls()
        fields = {
            key: attack_cfg[key]
            for key in cls.__dataclass_fields__
            if key in attack_cfg
        }
        return cls(**fields)


def choose_attackers(num_nodes: int, fraction: float, seed: int) -> list[int]:
    """Draw ``round(fraction * num_nodes)`` attacker partition ids, sorted, with ``seed``.

    Raises
    ------
    ValueError
        If the count would leave no honest node.
    """
    count = round(fraction * num_nodes)
    if count >= num_nodes:
        raise ValueError(
            f"attack.fraction={fraction} makes all {num_nodes} nodes attackers; lower attack.fraction."
        )
    rng = np.random.default_rng([seed, num_nodes])
    return sorted(
        int(node) for node in rng.choice(num_nodes, size=count, replace=False)
    )


def attack_spec(settings: AttackSettings, num_nodes: int) -> dict[str, Any] | None:
    """Return the ``TaskSpec.attack`` entry: the settings plus the attacker ids, or None without an attack."""
    if settings.name == "none":
        return None
    return {
        **asdict(settings),
        "attackers": choose_attackers(num_nodes, settings.fraction, settings.seed),
    }


class AttackSimulation(Strategy):
    """Wrap ``strategy`` and replace the attackers' train replies with crafted updates.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy (update validation and the aggregation rule).
    settings : AttackSettings
        Which attack and its parameters.
    attackers : list of int
        Partition ids of the malicious nodes.
    sink : object, optional
        The run log, for one ``attack`` event per round.
    """

    def __init__(
        self,
        strategy: Strategy,
        settings: AttackSettings,
        attackers: list[int],
        sink: Any = None,
    ) -> None:
        self.strategy = strategy
        self.settings = settings
        self.attackers = set(attackers)
        self.sink = sink
        self._global: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"AttackSimulation({self.settings.name}, attackers={sorted(self.attackers)}, {self.strategy!r})"

    def summary(self) -> None:
        """Log the attack, then the inner strategy's settings."""
        logger.info(
            "\t├──> AttackSimulation: %s by partitions %s",
            self.settings.name,
            sorted(self.attackers),
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays of the round, then delegate."""
        self._global = to_numpy(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replace the attackers' replies, let the inner strategy aggregate, then report its deviation."""
        replies = list(replies)
        honest = (
            self._poison(server_round, replies)
            if self.settings.name in MODEL_POISONING
            else None
        )
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if honest is not None and arrays is not None:
            self._report_deviation(server_round, honest, arrays)
        return arrays, metrics

    def _poison(self, server_round: int, replies: list[Message]) -> np.ndarray | None:
        """Replace the attackers' arrays in ``replies`` and return the honest updates.

        A round without an attacker reply changes nothing but still returns the
        honest updates, so that ``attack.fraction=0`` measures a rule's own
        distance from the honest mean. Returns None when no reply is honest.
        """
        usable = [
            reply
            for reply in replies
            if not reply.has_error() and reply.content.array_records
        ]
        malicious = [reply for reply in usable if partition_of(reply) in self.attackers]
        honest = [
            reply for reply in usable if partition_of(reply) not in self.attackers
        ]
        if not malicious:
            return (
                np.stack(
                    [flat_update(reply_arrays(reply), self._global) for reply in honest]
                )
                if honest
                else None
            )

        honest_updates = (
            np.stack(
                [flat_update(reply_arrays(reply), self._global) for reply in honest]
            )
            if honest
            else None
        )
        # Without an honest reply, the attackers fall back on their own honestly trained updates.
        known = (
            honest_updates
            if honest_updates is not None
            else np.stack(
                [flat_update(reply_arrays(reply), self._global) for reply in malicious]
            )
        )
        known_mean = known.mean(axis=0)

        norms, distances = [], []
        for reply in malicious:
            own = flat_update(reply_arrays(reply), self._global)
            update = self._craft(
                server_round,
                partition_of(reply),
                own,
                known,
                len(usable),
                len(malicious),
            )
            replace_arrays(reply, arrays_from_update(update, self._global))
            norms.append(float(np.linalg.norm(update)))
            distances.append(float(np.linalg.norm(update - known_mean)))

        partitions = [partition_of(reply) for reply in malicious]
        logger.info(
            "Round %d: %s updates sent by partitions %s (norms %s, distance to the honest mean %s)",
            server_round,
            self.settings.name,
            partitions,
            [round(n, 4) for n in norms],
            [round(d, 4) for d in distances],
        )
        report_event(
            self.sink,
            None,
            "attack",
            server_round,
            "updates_replaced",
            attack=self.settings.name,
            partitions=partitions,
            norms=norms,
            distances_to_honest_mean=distances,
        )
        return honest_updates

    def _report_deviation(
        self, server_round: int, honest: np.ndarray, arrays: ArrayRecord
    ) -> None:
        """Report how far the aggregate update lies from the mean of the honest updates.

        The distance measures how much the attack and the rule together moved
        the round's update away from the honest nodes. The honest mean here is
        unweighted, while FedAvg weights by example count, so an attack-free
        FedAvg aggregate also lies a small distance from it.
        """
        aggregate = flat_update(to_numpy(arrays), self._global)
        honest_mean = honest.mean(axis=0)
        distance = float(np.linalg.norm(aggregate - honest_mean))
        honest_norm = float(np.linalg.norm(honest_mean))
        aggregate_norm = float(np.linalg.norm(aggregate))
        denominator = honest_norm * aggregate_norm
        cosine = (
            float(aggregate @ honest_mean / denominator)
            if denominator > 0
            else float("nan")
        )

        logger.info(
            "Round %d: aggregate is %.4g from the honest mean (norm %.4g), cosine %.4f",
            server_round,
            distance,
            honest_norm,
            cosine,
        )
        report_event(
            self.sink,
            None,
            "attack",
            server_round,
            "aggregate_deviation",
            distance=distance,
            honest_mean_norm=honest_norm,
            aggregate_norm=aggregate_norm,
            cosine=cosine,
        )

    def _craft(
        self,
        server_round: int,
        partition_id: int,
        own: np.ndarray,
        known: np.ndarray,
        num_nodes: int,
        num_malicious: int,
    ) -> np.ndarray:
        name = self.settings.name
        if name == "sign_flip":
            return attacks.sign_flip(own, self.settings.scale)
        if name == "scaling":
            return attacks.scaling(own, self.settings.boost)
        if name == "gaussian":
            rng = np.random.default_rng(
                [self.settings.seed, server_round, partition_id]
            )
            return attacks.gaussian(known, rng)
        if name == "alie":
            return attacks.alie(known, num_nodes, num_malicious, self.settings.z)
        if name == "ipm":
            return attacks.ipm(known, self.settings.epsilon)
        update, gamma = attacks.min_max(known, self.settings.direction)
        logger.debug(
            "Round %d: Min-Max gamma %.6g for partition %d",
            server_round,
            gamma,
            partition_id,
        )
        return update

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the inner strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)

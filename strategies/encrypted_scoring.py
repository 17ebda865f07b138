"""Server side of encrypted robust scoring: compute a round's statistics, have a committee decrypt them.

The server holds only the public scoring context. For the round's encrypted
updates u_1..u_n it computes the squared norms, the pairwise squared
distances and, when a reference r is given, the inner products <u_i, r>
(``crypto.ckks.scoring``). It sends all scalars in one ``query.scoring``
message to each member of a committee of key-holding nodes
(``clients.committee``) and takes the median of the members' values per
scalar. With at least 2f+1 values per scalar, f wrong values cannot move
the median outside the range of the honest ones; fewer values raise
`CommitteeError`.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from clients.committee import (
    KIND_DISTANCE,
    KIND_INNER,
    KIND_NORM,
    RECORD_KEY,
    SCORING_QUERY,
    TASK_RECORD_KEY,
)
from crypto.ckks.scoring import (
    ScalarCiphertext,
    ScoringPublicContext,
    ScoringUpdate,
    inner_product,
    squared_distance,
    squared_norm,
)
from crypto.ckks.scoring.pool import ScoringWorkerPool

__all__ = [
    "SCORING_MESSAGE_TYPE",
    "CommitteeDecryptor",
    "CommitteeError",
    "RoundScores",
    "ScalarRequest",
    "build_round_requests",
    "build_round_requests_parallel",
    "decrypt_scores",
    "round_statistics",
    "score_round",
    "select_committee",
]

logger = logging.getLogger(__name__)

SCORING_MESSAGE_TYPE = f"query.{SCORING_QUERY}"

# A member whose value differs from the median by more than this (absolute,
# after the committee's rounding to 1e-6) is logged as disagreeing.
DISAGREEMENT_TOLERANCE = 1e-5


class CommitteeError(RuntimeError):
    """Too few committee members returned a value for a scalar to outvote faulty ones."""


@dataclass
class ScalarRequest:
    """One statistic to decrypt.

    Attributes
    ----------
    kind : str
        ``"norm"``, ``"distance"`` or ``"inner"``, what the committee's budget counts.
    label : str
        ``norm/i``, ``distance/i/j`` or ``inner/i``, with update positions i < j.
    scalar : ScalarCiphertext
        The encrypted statistic.
    """

    kind: str
    label: str
    scalar: ScalarCiphertext


def round_statistics(
    num_updates: int, *, reference: bool = False, distances: bool = True
) -> list[tuple[str, str, int, int]]:
    """List a round's statistics as (kind, label, i, j), norms first, then distances, then inner products.

    Parameters
    ----------
    num_updates : int
        Number of updates n; the reference, if any, has index n.
    reference : bool, default False
        Whether to add one inner product per update with the reference.
    distances : bool, default True
        Whether to add the n(n-1)/2 pairwise squared distances (Krum needs them).
    """
    if num_updates < 1:
        raise ValueError(
            f"A round needs at least one encrypted update, got {num_updates}."
        )

    listed = [(KIND_NORM, f"norm/{i}", i, i) for i in range(num_updates)]
    if distances:
        for i in range(num_updates):
            for j in range(i + 1, num_updates):
                listed.append((KIND_DISTANCE, f"distance/{i}/{j}", i, j))
    if reference:
        listed += [
            (KIND_INNER, f"inner/{i}", i, num_updates) for i in range(num_updates)
        ]
    return listed


def build_round_requests(
    context: ScoringPublicContext,
    updates: Sequence[ScoringUpdate],
    reference: ScoringUpdate | None = None,
    *,
    distances: bool = True,
) -> list[ScalarRequest]:
    """Compute the round's statistics homomorphically, in this process.

    Parameters
    ----------
    context : ScoringPublicContext
        The server's public scoring context.
    updates : sequence of ScoringUpdate
        The round's encrypted updates, in a fixed order.
    reference : ScoringUpdate, optional
        A freshly encrypted reference direction (the validator's update);
        adds one inner product per update.
    distances : bool, default True
        Whether to add the n(n-1)/2 pairwise squared distances.

    Returns
    -------
    list of ScalarRequest
        In the order of `round_statistics`.
    """
    operands = [*updates, reference]
    listed = round_statistics(
        len(updates), reference=reference is not None, distances=distances
    )
    return [
        ScalarRequest(kind, label, _statistic(context, kind, operands[i], operands[j]))
        for kind, label, i, j in listed
    ]


def _statistic(
    context: ScoringPublicContext,
    kind: str,
    first: ScoringUpdate,
    second: ScoringUpdate,
) -> ScalarCiphertext:
    if kind == KIND_NORM:
        return squared_norm(context, first)
    if kind == KIND_DISTANCE:
        return squared_distance(context, first, second)
    return inner_product(context, first, second)


def build_round_requests_parallel(
    pool: ScoringWorkerPool,
    uploads: Sequence[bytes],
    expected_length: int,
    reference: bytes | None = None,
    *,
    distances: bool = True,
) -> list[ScalarRequest]:
    """Compute the round's statistics in the pool's worker processes.

    Parameters
    ----------
    pool : ScoringWorkerPool
        Worker processes with the public scoring context.
    uploads : sequence of bytes
        The round's serialized encrypted updates, in a fixed order.
    expected_length : int
        Number of model parameters.
    reference : bytes, optional
        Serialized fresh encryption of the reference direction.
    distances : bool, default True
        Whether to add the n(n-1)/2 pairwise squared distances.

    Returns
    -------
    list of ScalarRequest
        In the order of `round_statistics`, equal to `build_round_requests` up to CKKS noise.
    """
    listed = round_statistics(
        len(uploads), reference=reference is not None, distances=distances
    )
    operands = [*uploads, reference] if reference is not None else list(uploads)
    scalars = pool.compute(
        operands, [(kind, i, j) for kind, _, i, j in listed], expected_length
    )
    return [
        ScalarRequest(kind, label, scalar)
        for (kind, label, _, _), scalar in zip(listed, scalars, strict=True)
    ]


def select_committee(
    node_ids: Iterable[int],
    size: int,
    server_round: int,
    *,
    seed: int = 0,
    members: Sequence[int] | None = None,
) -> list[int]:
    """Choose the committee for a round.

    Parameters
    ----------
    node_ids : iterable of int
        Connected nodes that hold the scoring secret key.
    size : int
        Committee size; 2f+1 members tolerate f wrong replies.
    server_round : int
        Round number; with `seed` it fixes the random draw, so a restarted
        server draws the same committee.
    seed : int, default 0
        Seed of the draw.
    members : sequence of int, optional
        Fixed committee; used instead of a draw when given.

    Raises
    ------
    ValueError
        If `size` is below 1 or above the number of nodes, or a fixed member is not connected.
    """
    available = sorted(set(node_ids))
    if members is not None:
        missing = sorted(set(members) - set(available))
        if missing:
            raise ValueError(
                f"Committee members {missing} are not connected; connected nodes are {available}."
            )
        return list(members)
    if not 1 <= size <= len(available):
        raise ValueError(
            f"Committee size must be between 1 and {len(available)} connected nodes, got {size}."
        )
    return sorted(random.Random(f"{seed}:{server_round}").sample(available, size))


@dataclass
class CommitteeDecryptor:
    """Sends scalar requests to a committee through the Grid and takes medians.

    Parameters
    ----------
    grid : Grid
        The ServerApp's Grid.
    size : int, default 3
        Committee size, drawn per round by `select_committee`.
    max_faulty : int, default 1
        Members that may lie or fail. A median over 2f+1 values is bounded by
        honest values when at most f are wrong, so every scalar needs
        ``2 * max_faulty + 1`` values, and `size` must be at least that.
    timeout : float, default 600.0
        Seconds to wait for the committee's replies.
    seed : int, default 0
        Seed of the committee draw.
    members : sequence of int, optional
        Fixed committee instead of a draw.
    task : ConfigRecord, optional
        The task record, sent along so that simulated members find their key
        and state folders (``clients.committee.scoring_node_config``).
    """

    grid: Grid
    size: int = 3
    max_faulty: int = 1
    timeout: float = 600.0
    seed: int = 0
    members: Sequence[int] | None = None
    task: ConfigRecord | None = None
    last_committee: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        size = len(self.members) if self.members is not None else self.size
        if self.max_faulty < 0 or size < 2 * self.max_faulty + 1:
            raise ValueError(
                f"A committee of {size} cannot outvote {self.max_faulty} faulty members; "
                f"use at least {2 * self.max_faulty + 1} members or a smaller max_faulty."
            )

    def decrypt(
        self, server_round: int, num_updates: int, requests: Sequence[ScalarRequest]
    ) -> dict[str, float]:
        """Have the committee decrypt `requests` and return the median value per label.

        Parameters
        ----------
        server_round : int
            Round the scalars belong to; the committee's budget is per round.
        num_updates : int
            The round's update count n, which sets the committee's budget.
        requests : sequence of ScalarRequest
            Scalars to decrypt.

        Raises
        ------
        CommitteeError
            If a scalar got fewer than ``2 * max_faulty + 1`` values.
        """
        committee = select_committee(
            self.grid.get_node_ids(),
            self.size,
            server_round,
            seed=self.seed,
            members=self.members,
        )
        self.last_committee = committee
        logger.info(
            "encrypted scoring: round %d, %d scalars to committee %s",
            server_round,
            len(requests),
            committee,
        )
        record = ConfigRecord(
            {
                "server-round": server_round,
                "num-updates": num_updates,
                "kinds": [request.kind for request in requests],
                "labels": [request.label for request in requests],
                "scalars": [request.scalar.serialize() for request in requests],
            }
        )
        content = RecordDict({RECORD_KEY: record})
        if self.task is not None:
            content[TASK_RECORD_KEY] = self.task
        messages = [
            Message(
                content=content,
                message_type=SCORING_MESSAGE_TYPE,
                dst_node_id=node_id,
            )
            for node_id in committee
        ]
        values = self._collect(
            self.grid.send_and_receive(messages, timeout=self.timeout), requests
        )
        return self._medians(server_round, values, requests)

    def _collect(
        self, replies: Iterable[Message], requests: Sequence[ScalarRequest]
    ) -> dict[int, dict[str, float]]:
        """Return each replying member's values by label; log error replies."""
        expected = {request.label for request in requests}
        values: dict[int, dict[str, float]] = {}
        for reply in replies:
            member = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning(
                    "encrypted scoring: committee node %d returned an error: %s",
                    member,
                    reply.error.reason,
                )
                continue
            record = reply.content.config_records.get(RECORD_KEY)
            if record is None:
                logger.warning(
                    "encrypted scoring: committee node %d replied without a %r record",
                    member,
                    RECORD_KEY,
                )
                continue
            try:
                labels = [str(label) for label in record["labels"]]
                numbers = [float(value) for value in record["values"]]
            except (KeyError, TypeError, ValueError) as error:
                logger.warning(
                    "encrypted scoring: committee node %d sent a malformed reply: %s",
                    member,
                    error,
                )
                continue
            if len(labels) != len(numbers):
                logger.warning(
                    "encrypted scoring: committee node %d sent %d labels and %d values; ignoring its reply",
                    member,
                    len(labels),
                    len(numbers),
                )
                continue
            # A NaN would break the ordering that the median relies on.
            finite = {
                label: value
                for label, value in zip(labels, numbers)
                if label in expected and math.isfinite(value)
            }
            if len(finite) < len(expected):
                logger.warning(
                    "encrypted scoring: committee node %d left out or sent non-finite values for %d scalars",
                    member,
                    len(expected) - len(finite),
                )
            values[member] = finite
        return values

    def _medians(
        self,
        server_round: int,
        values: dict[int, dict[str, float]],
        requests: Sequence[ScalarRequest],
    ) -> dict[str, float]:
        """Take the median per label and log members that disagree with it."""
        needed = 2 * self.max_faulty + 1
        medians: dict[str, float] = {}
        disagreeing: set[int] = set()
        for request in requests:
            received = {
                member: member_values[request.label]
                for member, member_values in values.items()
                if request.label in member_values
            }
            if len(received) < needed:
                raise CommitteeError(
                    f"Round {server_round}: scalar {request.label} got {len(received)} committee values, "
                    f"{needed} needed; check that the committee nodes have the scoring key and budget."
                )
            median = statistics.median(received.values())
            medians[request.label] = median
            disagreeing.update(
                m
                for m, value in received.items()
                if abs(value - median) > DISAGREEMENT_TOLERANCE
            )
        if disagreeing:
            logger.warning(
                "encrypted scoring: round %d, committee nodes %s returned values off the median",
                server_round,
                sorted(disagreeing),
            )
        return medians


@dataclass
class RoundScores:
    """Decrypted statistics of one round, indexed by update position.

    Attributes
    ----------
    squared_norms : numpy.ndarray
        Shape (n,).
    squared_distances : numpy.ndarray or None
        Shape (n, n), symmetric with a zero diagonal; None when not requested.
    inner_products : numpy.ndarray or None
        Shape (n,), with the reference; None without a reference.
    """

    squared_norms: np.ndarray
    squared_distances: np.ndarray | None
    inner_products: np.ndarray | None


def score_round(
    context: ScoringPublicContext,
    updates: Sequence[ScoringUpdate],
    decryptor: CommitteeDecryptor,
    server_round: int,
    *,
    reference: ScoringUpdate | None = None,
    distances: bool = True,
) -> RoundScores:
    """Compute and decrypt (through the committee) the statistics of one round.

    Parameters
    ----------
    context : ScoringPublicContext
        The server's public scoring context.
    updates : sequence of ScoringUpdate
        The round's encrypted updates.
    decryptor : CommitteeDecryptor
        Committee access through the Grid.
    server_round : int
        Current round.
    reference : ScoringUpdate, optional
        Fresh encryption of the reference direction.
    distances : bool, default True
        Whether to compute pairwise squared distances.
    """
    requests = build_round_requests(context, updates, reference, distances=distances)
    return decrypt_scores(decryptor, server_round, len(updates), requests)


def decrypt_scores(
    decryptor: CommitteeDecryptor,
    server_round: int,
    num_updates: int,
    requests: Sequence[ScalarRequest],
) -> RoundScores:
    """Have the committee decrypt a round's requests and arrange the values by update position.

    Parameters
    ----------
    decryptor : CommitteeDecryptor
        Committee access through the Grid.
    server_round : int
        Current round.
    num_updates : int
        Number of updates n in the round.
    requests : sequence of ScalarRequest
        From `build_round_requests` or `build_round_requests_parallel`.
    """
    values = decryptor.decrypt(server_round, num_updates, requests)
    labels = {request.label for request in requests}

    n = num_updates
    norms = np.array([values[f"norm/{i}"] for i in range(n)])
    matrix = None
    if n == 1 or "distance/0/1" in labels:
        matrix = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                matrix[i, j] = matrix[j, i] = values[f"distance/{i}/{j}"]
    inner = (
        np.array([values[f"inner/{i}"] for i in range(n)])
        if "inner/0" in labels
        else None
    )
    return RoundScores(
        squared_norms=norms, squared_distances=matrix, inner_products=inner
    )

"""MovieLens 100K: parsing, temporal leave-one-out splits and user-level partitioning.

Every node owns a disjoint set of users and all of their ratings. Within a
user, the latest rating is the test row, the second latest the validation row
and the rest are training rows. Ties in the timestamp are broken by item id,
so the split is deterministic.

User and item ids are converted to 0-based indices (``id - 1``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

# The model has one embedding row per item, so its size is fixed by the dataset
# and identical on every node. MovieLens 100K has 1,682 movies.
NUM_ITEMS = 1682

RATINGS_KEY = "recommendations/u.data"
USERS_KEY = "recommendations/u.user"

# Negatives per held-out item in the sampled ranking protocol of NCF.
EVAL_NEGATIVES = 99

TRAIN, VAL, TEST = 0, 1, 2

# Zip codes that do not start with a digit (Canadian and other postal codes).
OTHER_REGION = "other"


@dataclass(frozen=True)
class Ratings:
    """All rows of ``u.data`` as 0-based indices, sorted by user, then time, then item."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray


@dataclass(frozen=True)
class Users:
    """Demographics of ``u.user``, one entry per 0-based user index.

    Attributes
    ----------
    occupation_codes : np.ndarray
        int64 index of the occupation in ``occupations``.
    occupations : tuple of str
        Sorted distinct occupation names.
    zip_codes : np.ndarray
        Zip code strings as written in the file.
    """

    occupation_codes: np.ndarray
    occupations: tuple[str, ...]
    zip_codes: np.ndarray


@dataclass(frozen=True)
class MovieLens:
    """Parsed dataset with the leave-one-out role of each rating and the evaluation negatives.

    Attributes
    ----------
    ratings : Ratings
        All ratings.
    users : Users
        All users.
    roles : np.ndarray
        ``TRAIN``, ``VAL`` or ``TEST`` per rating row.
    val_negatives, test_negatives : np.ndarray
        int64 array of shape ``(num_users, EVAL_NEGATIVES)``: items the user never
        rated, drawn once per dataset so that every model is ranked against the
        same candidates.
    """

    ratings: Ratings
    users: Users
    roles: np.ndarray
    val_negatives: np.ndarray
    test_negatives: np.ndarray

    @property
    def num_users(self) -> int:
        """Number of users in ``u.user``."""
        return len(self.users.zip_codes)


@dataclass(frozen=True)
class InteractionSplit:
    """One split of one node: rating rows plus the history used to represent their users.

    Attributes
    ----------
    users, items : np.ndarray
        int64 0-based user and item index per row.
    ratings : np.ndarray
        float32 rating (1 to 5) per row.
    timestamps : np.ndarray
        int64 Unix time per row.
    history_users, history_items : np.ndarray
        Ratings that are known when the rows are scored. For the train split
        these are the rows themselves, for validation the users' training rows
        and for test the users' training and validation rows.
    negatives : np.ndarray
        int64 array of shape ``(n, EVAL_NEGATIVES)`` with the unrated items each
        row is ranked against, or shape ``(n, 0)`` for the train split.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    history_users: np.ndarray
    history_items: np.ndarray
    negatives: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


@functools.lru_cache(maxsize=4)
def read_ratings(path: Path) -> Ratings:
    """Read ``u.data`` (tab-separated user id, item id, rating, Unix time).

    Raises
    ------
    ValueError
        If an item id is outside ``1 .. NUM_ITEMS``.
    """
    frame = pd.read_csv(
        path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"], dtype=np.int64
    )

    users = frame["user"].to_numpy() - 1
    items = frame["item"].to_numpy() - 1
    timestamps = frame["timestamp"].to_numpy()
    if items.min() < 0 or items.max() >= NUM_ITEMS:
        raise ValueError(
            f"{path} has item ids {items.min() + 1}..{items.max() + 1}, but the model is sized for "
            f"item ids 1..{NUM_ITEMS} (MovieLens 100K); use the MovieLens 100K u.data file"
        )

    # Sorting by user, then time, then item puts each user's test row last.
    order = np.lexsort((items, timestamps, users))
    ratings = Ratings(
        users=users[order],
        items=items[order],
        ratings=frame["rating"].to_numpy()[order].astype(np.float32),
        timestamps=timestamps[order],
    )
    logger.debug("Read %d ratings from %s", len(order), path)
    return ratings


@functools.lru_cache(maxsize=4)
def read_users(path: Path) -> Users:
    """Read ``u.user`` (pipe-separated user id, age, gender, occupation, zip code)."""
    frame = pd.read_csv(
        path,
        sep="|",
        header=None,
        names=["user", "age", "gender", "occupation", "zip"],
        dtype={"user": np.int64, "age": np.int64, "gender": str, "occupation": str, "zip": str},
        encoding="latin-1",
    )
    frame = frame.sort_values("user")

    expected_ids = np.arange(1, len(frame) + 1)
    if not np.array_equal(frame["user"].to_numpy(), expected_ids):
        raise ValueError(f"{path} must list user ids 1..{len(frame)} exactly once each")

    occupations, codes = np.unique(frame["occupation"].to_numpy(), return_inverse=True)
    return Users(
        occupation_codes=codes.astype(np.int64),
        occupations=tuple(str(name) for name in occupations),
        zip_codes=frame["zip"].to_numpy(),
    )


@functools.lru_cache(maxsize=4)
def load_movielens(ratings_path: Path, users_path: Path, eval_seed: int) -> MovieLens:
    """Parse both files, mark leave-one-out roles and draw the evaluation negatives.

    The result is cached per process and shared by callers, who must not
    modify its arrays.
    """
    ratings = read_ratings(ratings_path)
    users = read_users(users_path)
    if ratings.users.min() < 0 or ratings.users.max() >= len(users.zip_codes):
        raise ValueError(
            f"{ratings_path} has user ids up to {ratings.users.max() + 1}, but {users_path} lists "
            f"{len(users.zip_codes)} users; use u.data and u.user from the same MovieLens release"
        )

    roles = leave_one_out_roles(ratings.users, len(users.zip_codes))
    val_negatives, test_negatives = sample_eval_negatives(ratings, len(users.zip_codes), eval_seed)
    return MovieLens(
        ratings=ratings,
        users=users,
        roles=roles,
        val_negatives=val_negatives,
        test_negatives=test_negatives,
    )


def leave_one_out_roles(sorted_users: np.ndarray, num_users: int) -> np.ndarray:
    """Mark each user's last row ``TEST``, the row before it ``VAL`` and the rest ``TRAIN``.

    Parameters
    ----------
    sorted_users : np.ndarray
        0-based user index per row, grouped by user with rows in time order.
    num_users : int
        Number of users. Every user must have at least 3 rows.

    Raises
    ------
    ValueError
        If a user has fewer than 3 ratings, which leaves no training row.
    """
    counts = np.bincount(sorted_users, minlength=num_users)
    if counts.min() < 3:
        user = int(np.argmin(counts))
        raise ValueError(
            f"user id {user + 1} has {counts[user]} ratings, but a leave-one-out split needs at "
            "least 3 (train, validation, test); drop users with fewer ratings first"
        )

    ends = np.cumsum(counts)
    roles = np.full(len(sorted_users), TRAIN, dtype=np.int8)
    roles[ends - 1] = TEST
    roles[ends - 2] = VAL
    return roles


def sample_eval_negatives(ratings: Ratings, num_users: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``EVAL_NEGATIVES`` never-rated items per user for validation and for test.

    The draw depends only on the ratings and ``seed``, never on the partition,
    so a user is ranked against the same items on a node and in the pooled data.

    Returns
    -------
    tuple of np.ndarray
        Validation and test negatives, each of shape ``(num_users, EVAL_NEGATIVES)``.
    """
    rated = np.zeros((num_users, NUM_ITEMS), dtype=bool)
    rated[ratings.users, ratings.items] = True

    rng = np.random.default_rng(seed)
    val_negatives = np.empty((num_users, EVAL_NEGATIVES), dtype=np.int64)
    test_negatives = np.empty((num_users, EVAL_NEGATIVES), dtype=np.int64)
    for user in range(num_users):
        unrated = np.flatnonzero(~rated[user])
        val_negatives[user] = rng.choice(unrated, size=EVAL_NEGATIVES, replace=False)
        test_negatives[user] = rng.choice(unrated, size=EVAL_NEGATIVES, replace=False)

    return val_negatives, test_negatives


def zip_regions(zip_codes: np.ndarray) -> np.ndarray:
    """Return each user's region: the first digit of the zip code, or ``OTHER_REGION``.

    US zip codes start with a digit that names a group of states (0 for New
    England through 9 for the West Coast). The few non-numeric codes are
    foreign postal codes and share one region.
    """
    first_characters = np.array([str(code)[:1] for code in zip_codes])
    return np.where(np.char.isdigit(first_characters), first_characters, OTHER_REGION)


def group_regions(regions: np.ndarray, num_groups: int) -> np.ndarray:
    """Merge regions into ``num_groups`` groups of similar size and return each user's group.

    Regions are taken largest first (ties by name) and each goes to the group
    with the fewest users so far (ties to the lowest group index), which is the
    longest-processing-time rule for balancing loads.

    Raises
    ------
    ValueError
        If there are fewer distinct regions than ``num_groups``.
    """
    names, counts = np.unique(regions, return_counts=True)
    if len(names) < num_groups:
        raise ValueError(
            f"MovieLens 100K has {len(names)} zip-code regions, fewer than num_nodes={num_groups}; "
            f"use at most {len(names)} nodes with scheme=natural, or scheme=iid or dirichlet"
        )

    group_sizes = np.zeros(num_groups, dtype=np.int64)
    group_of_region: dict[str, int] = {}
    for index in sorted(range(len(names)), key=lambda i: (-counts[i], names[i])):
        group = int(np.argmin(group_sizes))
        group_of_region[str(names[index])] = group
        group_sizes[group] += counts[index]

    return np.array([group_of_region[str(region)] for region in regions], dtype=np.int64)


def build_node_splits(
    dataset: MovieLens, user_mask: np.ndarray
) -> tuple[InteractionSplit, InteractionSplit, InteractionSplit]:
    """Return the train, validation and test splits of the users where ``user_mask`` is true."""
    ratings = dataset.ratings
    owned = user_mask[ratings.users]
    train_rows = np.flatnonzero(owned & (dataset.roles == TRAIN))
    val_rows = np.flatnonzero(owned & (dataset.roles == VAL))
    test_rows = np.flatnonzero(owned & (dataset.roles == TEST))

    train = _split_from_rows(ratings, train_rows, train_rows, None)
    val = _split_from_rows(ratings, val_rows, train_rows, dataset.val_negatives)
    test_history = np.sort(np.concatenate([train_rows, val_rows]))
    test = _split_from_rows(ratings, test_rows, test_history, dataset.test_negatives)
    return train, val, test


def concat_splits(splits: list[InteractionSplit]) -> InteractionSplit:
    """Concatenate splits of disjoint user sets into one split.

    Raises
    ------
    ValueError
        If ``splits`` is empty.
    """
    if not splits:
        raise ValueError("cannot concatenate an empty list of splits; pass at least one split")

    return InteractionSplit(
        users=np.concatenate([split.users for split in splits]),
        items=np.concatenate([split.items for split in splits]),
        ratings=np.concatenate([split.ratings for split in splits]),
        timestamps=np.concatenate([split.timestamps for split in splits]),
        history_users=np.concatenate([split.history_users for split in splits]),
        history_items=np.concatenate([split.history_items for split in splits]),
        negatives=np.concatenate([split.negatives for split in splits]),
    )


def _split_from_rows(
    ratings: Ratings, rows: np.ndarray, history_rows: np.ndarray, negatives: np.ndarray | None
) -> InteractionSplit:
    users = ratings.users[rows]
    if negatives is None:
        row_negatives = np.empty((len(rows), 0), dtype=np.int64)
    else:
        row_negatives = negatives[users]

    return InteractionSplit(
        users=users,
        items=ratings.items[rows],
        ratings=ratings.ratings[rows],
        timestamps=ratings.timestamps[rows],
        history_users=ratings.users[history_rows],
        history_items=ratings.items[history_rows],
        negatives=row_negatives,
    )


@dataclass(frozen=True)
class UserHistory:
    """Items of each user in compressed sparse row form, ready for ``nn.EmbeddingBag``.

    Attributes
    ----------
    offsets : np.ndarray
        int64 array of shape ``(num_users + 1,)``. The items of user ``u`` are
        ``items[offsets[u]:offsets[u + 1]]``.
    items : np.ndarray
        int64 item indices grouped by user.
    """

    offsets: np.ndarray
    items: np.ndarray

    @classmethod
    def from_rows(
        cls, users: np.ndarray, items: np.ndarray, num_users: int
    ) -> tuple[UserHistory, np.ndarray]:
        """Group rows by user and return the history and the position of each row in it.

        Positions let ``bags`` leave a training row's own item out of its user's
        history, so the model cannot predict an item from itself.
        """
        order = np.argsort(users, kind="stable")
        positions = np.empty(len(users), dtype=np.int64)
        positions[order] = np.arange(len(users))

        offsets = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=num_users), out=offsets[1:])
        return cls(offsets=offsets, items=items[order]), positions

    def bags(self, users: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return the flat items and bag offsets of ``users``' histories.

        Parameters
        ----------
        users : np.ndarray
            User index per bag.
        exclude : np.ndarray, optional
            Per bag, one position in ``items`` to leave out. It must lie inside
            that user's history.

        Returns
        -------
        tuple of np.ndarray
            ``(flat_items, bag_offsets)`` as expected by ``nn.EmbeddingBag``.
        """
        starts = self.offsets[users]
        lengths = self.offsets[users + 1] - starts

        # Position of every history entry of every bag, bag after bag.
        bag_of_entry = np.repeat(np.arange(len(users)), lengths)
        first_entry = np.cumsum(lengths) - lengths
        positions = starts[bag_of_entry] + np.arange(lengths.sum()) - first_entry[bag_of_entry]

        if exclude is not None:
            positions = positions[positions != exclude[bag_of_entry]]
            lengths = lengths - 1

        bag_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return self.items[positions], bag_offsets

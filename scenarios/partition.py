"""Partition a dataset's rows across nodes and split each node's rows into train, validation and test.

Three schemes assign rows to nodes:

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: label skew. For each class, node shares are drawn from
  Dir(alpha) and the class's rows are split in those shares, so a smaller
  alpha gives each node fewer classes.
- ``natural``: one node per distinct value of a key the scenario names,
  such as the product type in AI4I 2020.

Every function is deterministic for ``PartitionSettings.seed`` and never
touches global random state.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from scenarios.base import PartitionSettings

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "natural")

# Number of Dirichlet draws tried before giving up on the min_rows constraint.
# A draw costs one Dirichlet sample per class, so the bound is about speed, not memory.
MAX_DIRICHLET_DRAWS = 1000

# Tags that give the node assignment, the per-node splits and the server holdout independent random streams.
_ASSIGN_STREAM = 0
_SPLIT_STREAM = 1
_HOLDOUT_STREAM = 2

_MAX_KEYS_IN_MESSAGE = 10


def validate_partition_settings(settings: PartitionSettings) -> None:
    """Raise ValueError unless ``settings`` describe a valid partition.

    ``num_nodes`` must be at least 1, ``scheme`` one of ``SCHEMES``,
    ``alpha`` positive and finite, ``seed`` a non-negative integer, and both
    fractions non-negative with a sum below 1. The message names the field
    and the valid range.
    """
    if not isinstance(settings.num_nodes, (int, np.integer)) or settings.num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {settings.num_nodes!r}")

    if settings.scheme not in SCHEMES:
        raise ValueError(f"Unknown partition scheme {settings.scheme!r}. Valid schemes: {', '.join(SCHEMES)}.")

    if not math.isfinite(settings.alpha) or settings.alpha <= 0:
        raise ValueError(
            f"alpha must be a finite number > 0, got {settings.alpha!r}. Smaller values give more label skew."
        )

    if not isinstance(settings.seed, (int, np.integer)) or settings.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {settings.seed!r}")

    for name in ("val_fraction", "test_fraction"):
        value = getattr(settings, name)
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")

    held_out = settings.val_fraction + settings.test_fraction
    if held_out >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 so that training rows remain, got "
            f"{settings.val_fraction!r} + {settings.test_fraction!r} = {held_out!r}"
        )

    if not isinstance(settings.holdout, (int, np.integer)) or settings.holdout < 0:
        raise ValueError(f"holdout must be a non-negative integer (rows reserved for the server), got {settings.holdout!r}")


def assign_nodes(
    labels: np.ndarray,
    settings: PartitionSettings,
    natural_keys: np.ndarray | None = None,
    min_rows: int = 10,
    *,
    scenario: str | None = None,
) -> np.ndarray:
    """Assign every row to a node.

    Parameters
    ----------
    labels : np.ndarray
        One label per row, shape ``(n,)`` or ``(n, 1)``. ``dirichlet`` skews
        the nodes on these labels. The other schemes use only their count.
    settings : PartitionSettings
        Scheme, number of nodes, alpha and seed.
    natural_keys : np.ndarray, optional
        One key per row for ``natural``. Node ``i`` gets the ``i``-th distinct
        key in sorted order.
    min_rows : int
        Minimum number of rows per node. ``dirichlet`` redraws up to
        ``MAX_DIRICHLET_DRAWS`` times to meet it.
    scenario : str, optional
        Scenario name, used only in error messages.

    Returns
    -------
    np.ndarray
        Node index in ``0 .. num_nodes - 1`` per row, dtype int64.

    Raises
    ------
    ValueError
        If the settings are invalid, a node would get fewer than
        ``min_rows`` rows, or the natural keys do not give ``num_nodes`` nodes.
    """
    validate_partition_settings(settings)
    labels = _as_1d(labels, "labels")
    if len(labels) == 0:
        raise ValueError("labels is empty, but a partition needs at least one row")

    if not isinstance(min_rows, (int, np.integer)) or min_rows < 0:
        raise ValueError(f"min_rows must be a non-negative integer, got {min_rows!r}")

    if settings.scheme == "natural":
        return _assign_natural(len(labels), settings, natural_keys, min_rows, scenario)

    needed = settings.num_nodes * min_rows
    if len(labels) < needed:
        raise ValueError(
            f"{len(labels)} rows cannot give num_nodes={settings.num_nodes} nodes at least "
            f"min_rows={min_rows} rows each ({needed} rows needed). Lower num_nodes or min_rows."
        )

    rng = np.random.default_rng([settings.seed, _ASSIGN_STREAM])
    if settings.scheme == "iid":
        return _assign_iid(len(labels), settings.num_nodes, rng)
    return _assign_dirichlet(labels, settings, min_rows, rng)


def _assign_iid(num_rows: int, num_nodes: int, rng: np.random.Generator) -> np.ndarray:
    assignment = np.empty(num_rows, dtype=np.int64)
    for node, rows in enumerate(np.array_split(rng.permutation(num_rows), num_nodes)):
        assignment[rows] = node
    return assignment


def _assign_dirichlet(
    labels: np.ndarray, settings: PartitionSettings, min_rows: int, rng: np.random.Generator
) -> np.ndarray:
    """Split each class across nodes in Dir(alpha) shares, redrawing until every node has ``min_rows`` rows."""
    num_nodes = settings.num_nodes
    _, class_index = np.unique(labels, return_inverse=True)
    class_rows = [rng.permutation(np.flatnonzero(class_index == c)) for c in range(class_index.max() + 1)]

    for draw in range(1, MAX_DIRICHLET_DRAWS + 1):
        counts = np.stack([_dirichlet_counts(len(rows), num_nodes, settings.alpha, rng) for rows in class_rows])
        if counts.sum(axis=0).min() >= min_rows:
            logger.debug("Dirichlet partition met min_rows=%d on draw %d", min_rows, draw)
            return _assignment_from_counts(len(labels), class_rows, counts)

    raise ValueError(
        f"dirichlet partition with alpha={settings.alpha} and num_nodes={settings.num_nodes} left a node "
        f"with fewer than min_rows={min_rows} rows in each of {MAX_DIRICHLET_DRAWS} draws. "
        f"Raise alpha, lower num_nodes or lower min_rows."
    )


def _dirichlet_counts(num_rows: int, num_nodes: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Draw node shares from Dir(alpha) and turn them into row counts that sum to ``num_rows``."""
    shares = rng.dirichlet(np.full(num_nodes, alpha))
    # Rounding the cumulative shares keeps the cuts monotone and the total exact.
    cuts = np.round(np.cumsum(shares) * num_rows).astype(np.int64)
    cuts[-1] = num_rows
    return np.diff(cuts, prepend=0)


def _assignment_from_counts(num_rows: int, class_rows: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    assignment = np.empty(num_rows, dtype=np.int64)
    for rows, class_counts in zip(class_rows, counts):
        nodes = np.repeat(np.arange(len(class_counts)), class_counts)
        assignment[rows] = nodes
    return assignment


def _assign_natural(
    num_rows: int,
    settings: PartitionSettings,
    natural_keys: np.ndarray | None,
    min_rows: int,
    scenario: str | None,
) -> np.ndarray:
    """Give each distinct natural key its own node, in sorted key order."""
    if natural_keys is None:
        name = f"scenario {scenario!r}" if scenario else "this scenario"
        raise ValueError(f"{name} has no natural partition key; use scheme=iid or dirichlet")

    natural_keys = _as_1d(natural_keys, "natural_keys")
    if len(natural_keys) != num_rows:
        raise ValueError(
            f"natural_keys has {len(natural_keys)} entries but labels has {num_rows}. Pass one key per row."
        )

    keys, assignment = np.unique(natural_keys, return_inverse=True)
    if len(keys) != settings.num_nodes:
        raise ValueError(
            f"natural partition has {len(keys)} distinct keys ({_preview(keys)}) but num_nodes is "
            f"{settings.num_nodes}. Set num_nodes={len(keys)} or use scheme=iid or dirichlet."
        )

    counts = np.bincount(assignment, minlength=len(keys))
    small = np.flatnonzero(counts < min_rows)
    if len(small):
        details = ", ".join(f"{keys[i]}: {counts[i]}" for i in small[:_MAX_KEYS_IN_MESSAGE])
        raise ValueError(
            f"natural partition gives {len(small)} node(s) fewer than min_rows={min_rows} rows ({details}). "
            f"Lower min_rows or use scheme=iid or dirichlet."
        )

    return assignment.astype(np.int64)


def split_rows(
    rows: np.ndarray,
    labels: np.ndarray | None,
    settings: PartitionSettings,
    node: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one node's rows into train, validation and test indices.

    The split totals are ``round(val_fraction * n)`` and
    ``round(test_fraction * n)``. With labels, each class is split in
    proportion to its share of the node (largest-remainder rounding). A class
    with at least 3 rows keeps at least one row in train and, when the
    fraction is positive, one in validation and one in test. These minimums
    take precedence over the totals.

    Parameters
    ----------
    rows : np.ndarray
        This node's row indices into the full dataset.
    labels : np.ndarray or None
        The labels of ``rows`` (same length and order), or None for an
        unstratified split.
    settings : PartitionSettings
        Fractions and seed.
    node : int
        Node index. The result depends only on ``settings.seed``, ``node``
        and the set of ``rows`` with their labels, not on the order of ``rows``.

    Returns
    -------
    tuple of np.ndarray
        Sorted ``(train, val, test)`` row indices, disjoint, whose union is ``rows``.
    """
    validate_partition_settings(settings)
    rows = _as_1d(rows, "rows").astype(np.int64)

    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    rng = np.random.default_rng([settings.seed, _SPLIT_STREAM, node])

    if labels is None:
        return _split_unlabelled(rows, settings, rng)

    labels = _as_1d(labels, "labels")
    if len(labels) != len(rows):
        raise ValueError(
            f"labels has {len(labels)} entries but rows has {len(rows)}. Pass the labels of these rows (labels[rows])."
        )
    if len(rows) == 0:
        return rows, rows.copy(), rows.copy()
    return _split_stratified(rows, labels[order], settings, rng)


def _split_unlabelled(
    rows: np.ndarray, settings: PartitionSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shuffled = rng.permutation(rows)
    num_val = _round_half_up(settings.val_fraction * len(rows))
    num_test = _round_half_up(settings.test_fraction * len(rows))

    val = shuffled[:num_val]
    test = shuffled[num_val : num_val + num_test]
    train = shuffled[num_val + num_test :]
    return np.sort(train), np.sort(val), np.sort(test)


def _split_stratified(
    rows: np.ndarray, labels: np.ndarray, settings: PartitionSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apportion the validation and test totals across classes, then cut each shuffled class."""
    _, class_index = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_index)
    large = class_sizes >= 3

    # Classes with at least 3 rows keep one row for training and, when the fraction
    # is positive, one for each held-out split.
    min_val = (large & (settings.val_fraction > 0)).astype(np.int64)
    min_test = (large & (settings.test_fraction > 0)).astype(np.int64)
    train_reserve = large.astype(np.int64)

    num_val = _round_half_up(settings.val_fraction * len(rows))
    num_test = _round_half_up(settings.test_fraction * len(rows))
    val_counts = _apportion(num_val, class_sizes, min_val, class_sizes - min_test - train_reserve)
    test_counts = _apportion(num_test, class_sizes, min_test, class_sizes - val_counts - train_reserve)

    splits: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c, (n_val, n_test) in enumerate(zip(val_counts, test_counts)):
        shuffled = rng.permutation(rows[class_index == c])
        splits[1].append(shuffled[:n_val])
        splits[2].append(shuffled[n_val : n_val + n_test])
        splits[0].append(shuffled[n_val + n_test :])

    train, val, test = (np.sort(np.concatenate(parts)) for parts in splits)
    return train, val, test


def _apportion(total: int, sizes: np.ndarray, minimum: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Share ``total`` across classes in proportion to ``sizes`` by largest remainder.

    Each count stays within ``[minimum, capacity]``, so the result sums to
    ``total`` only when the bounds allow it.
    """
    capacity = np.maximum(capacity, minimum)
    quota = total * sizes / sizes.sum()
    counts = np.clip(np.floor(quota).astype(np.int64), minimum, capacity)

    # Add rows to the classes furthest below their quota, and take rows from those furthest above it.
    while counts.sum() < total:
        gap = np.where(counts < capacity, quota - counts, -np.inf)
        if not np.isfinite(gap.max()):
            break
        counts[np.argmax(gap)] += 1

    while counts.sum() > total:
        excess = np.where(counts > minimum, counts - quota, -np.inf)
        if not np.isfinite(excess.max()):
            break
        counts[np.argmax(excess)] -= 1

    return counts


def holdout_rows(labels: np.ndarray, settings: PartitionSettings) -> np.ndarray:
    """Draw the ``settings.holdout`` rows reserved for the server, stratified by label.

    Each class gets a share of the holdout in proportion to its size
    (largest remainder), and at least one row when the holdout has room for
    every class, so a rare class is still represented.

    Parameters
    ----------
    labels : np.ndarray
        One label per row of the whole dataset.
    settings : PartitionSettings
        ``holdout`` (number of rows) and ``seed``.

    Returns
    -------
    np.ndarray
        Sorted row indices, int64; empty when ``holdout`` is 0.

    Raises
    ------
    ValueError
        If ``holdout`` is not smaller than the number of rows.
    """
    validate_partition_settings(settings)
    labels = _as_1d(labels, "labels")
    if settings.holdout == 0:
        return np.zeros(0, dtype=np.int64)
    if settings.holdout >= len(labels):
        raise ValueError(f"holdout={settings.holdout} reserves every one of the {len(labels)} rows; lower the holdout.")

    _, class_index = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_index)
    minimum = np.full(len(class_sizes), 1 if settings.holdout >= len(class_sizes) else 0, dtype=np.int64)
    counts = _apportion(settings.holdout, class_sizes, np.minimum(minimum, class_sizes), class_sizes)

    rng = np.random.default_rng([settings.seed, _HOLDOUT_STREAM])
    chosen = [rng.choice(np.flatnonzero(class_index == c), size=count, replace=False) for c, count in enumerate(counts)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def partition_rows(
    labels: np.ndarray,
    settings: PartitionSettings,
    natural_keys: np.ndarray | None = None,
    *,
    min_rows: int = 10,
    scenario: str | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Assign rows to nodes and split each node's rows into train, validation and test.

    Parameters
    ----------
    labels : np.ndarray
        One label per row. Used for the Dirichlet skew and for stratification.
    settings : PartitionSettings
        Scheme, number of nodes, alpha, seed and split fractions.
    natural_keys : np.ndarray, optional
        One key per row, required for ``scheme="natural"``.
    min_rows : int
        Minimum number of rows per node (see ``assign_nodes``).
    scenario : str, optional
        Scenario name, used only in error messages.

    Returns
    -------
    list of tuple of np.ndarray
        ``(train, val, test)`` row indices for nodes ``0 .. num_nodes - 1``.
        The ``holdout_rows`` of ``settings`` are in no node's splits.
    """
    labels = _as_1d(labels, "labels")

    # Rows reserved for the server leave the pool before any node is assigned.
    available = np.arange(len(labels))
    keys = natural_keys
    if settings.holdout:
        available = np.setdiff1d(available, holdout_rows(labels, settings))
        if natural_keys is not None:
            keys = _as_1d(natural_keys, "natural_keys")
            if len(keys) != len(labels):
                raise ValueError(f"natural_keys has {len(keys)} entries but labels has {len(labels)}. Pass one key per row.")
            keys = keys[available]
    assignment = assign_nodes(labels[available], settings, keys, min_rows, scenario=scenario)

    splits = []
    for node in range(settings.num_nodes):
        rows = available[assignment == node]
        splits.append(split_rows(rows, labels[rows], settings, node))
    return splits


def label_skew(labels: np.ndarray, assignment: np.ndarray, num_nodes: int) -> float:
    """Measure label skew as the mean total-variation distance to the global label distribution.

    Parameters
    ----------
    labels : np.ndarray
        One label per row.
    assignment : np.ndarray
        Node index per row, as returned by ``assign_nodes``.
    num_nodes : int
        Number of nodes. Nodes without rows are left out of the mean.

    Returns
    -------
    float
        0 when every node has the global label distribution, approaching 1
        when every node holds a single rare class.
    """
    labels = _as_1d(labels, "labels")
    assignment = _as_1d(assignment, "assignment").astype(np.int64)

    if len(assignment) != len(labels):
        raise ValueError(
            f"assignment has {len(assignment)} entries but labels has {len(labels)}. Pass one node index per row."
        )
    if len(labels) == 0:
        raise ValueError("labels is empty, but label skew needs at least one row")
    outside = assignment[(assignment < 0) | (assignment >= num_nodes)]
    if len(outside):
        raise ValueError(
            f"assignment contains node {outside[0]}, outside 0 .. {num_nodes - 1}. "
            f"Pass the num_nodes used to build it."
        )

    _, class_index = np.unique(labels, return_inverse=True)
    counts = np.zeros((num_nodes, class_index.max() + 1))
    np.add.at(counts, (assignment, class_index), 1)

    global_share = counts.sum(axis=0) / len(labels)
    node_sizes = counts.sum(axis=1)
    present = node_sizes > 0
    node_share = counts[present] / node_sizes[present, None]

    distances = 0.5 * np.abs(node_share - global_share).sum(axis=1)
    return float(distances.mean())


def _as_1d(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D array, accepting a column vector of shape ``(n, 1)``."""
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or a column of shape (n, 1)), got shape {array.shape}")
    return array


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _preview(keys: np.ndarray) -> str:
    preview = ", ".join(str(key) for key in keys[:_MAX_KEYS_IN_MESSAGE])
    if len(keys) > _MAX_KEYS_IN_MESSAGE:
        preview += f", ... {len(keys) - _MAX_KEYS_IN_MESSAGE} more"
    return preview

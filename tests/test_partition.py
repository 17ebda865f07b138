"""Tests for scenarios.partition on real labels (fraud, AI4I product type) and a synthetic label array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scenarios.base import PartitionSettings
from scenarios.datasets import FILES
from scenarios.partition import (
    MAX_DIRICHLET_DRAWS,
    assign_nodes,
    label_skew,
    partition_rows,
    split_rows,
    validate_partition_settings,
)


@pytest.fixture(scope="session")
def fraud_labels(data_root: Path) -> np.ndarray:
    frame = pd.read_csv(data_root / FILES["fraud/sub50k"].relpath, usecols=["Class"])
    return frame["Class"].to_numpy()


@pytest.fixture(scope="session")
def product_types(data_root: Path) -> np.ndarray:
    frame = pd.read_csv(data_root / FILES["maintenance/ai4i2020"].relpath, usecols=["Type"])
    return frame["Type"].to_numpy()


@pytest.fixture(scope="module")
def synthetic_labels() -> np.ndarray:
    return np.random.default_rng(123).choice(3, size=3000, p=[0.6, 0.3, 0.1])


def all_rows(splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.concatenate([part for node in splits for part in node])


def mean_skew(labels: np.ndarray, alpha: float, num_nodes: int, seeds: range) -> float:
    skews = []
    for seed in seeds:
        settings = PartitionSettings(num_nodes=num_nodes, scheme="dirichlet", alpha=alpha, seed=seed)
        skews.append(label_skew(labels, assign_nodes(labels, settings), num_nodes))
    return float(np.mean(skews))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_fraud_partition_disjoint_and_complete(fraud_labels: np.ndarray, scheme: str) -> None:
    splits = partition_rows(fraud_labels, PartitionSettings(num_nodes=5, scheme=scheme, alpha=0.5, seed=3))
    rows = all_rows(splits)

    assert len(splits) == 5
    assert len(rows) == len(fraud_labels)
    assert np.array_equal(np.sort(rows), np.arange(len(fraud_labels)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_synthetic_partition_disjoint_and_complete(synthetic_labels: np.ndarray, scheme: str) -> None:
    splits = partition_rows(synthetic_labels, PartitionSettings(num_nodes=7, scheme=scheme, alpha=1.0, seed=0))
    rows = all_rows(splits)

    assert len(rows) == len(synthetic_labels)
    assert len(np.unique(rows)) == len(synthetic_labels)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_deterministic_per_seed(fraud_labels: np.ndarray, scheme: str) -> None:
    first = partition_rows(fraud_labels, PartitionSettings(num_nodes=4, scheme=scheme, seed=11))
    again = partition_rows(fraud_labels, PartitionSettings(num_nodes=4, scheme=scheme, seed=11))
    other = partition_rows(fraud_labels, PartitionSettings(num_nodes=4, scheme=scheme, seed=12))

    for node in range(4):
        for split in range(3):
            assert np.array_equal(first[node][split], again[node][split])
    assert not np.array_equal(first[0][0], other[0][0])


def test_skew_grows_as_alpha_falls_fraud(fraud_labels: np.ndarray) -> None:
    seeds = range(3)
    high = mean_skew(fraud_labels, 100.0, 5, seeds)
    medium = mean_skew(fraud_labels, 1.0, 5, seeds)
    low = mean_skew(fraud_labels, 0.1, 5, seeds)

    assert high < medium
    assert medium < low
    assert high < 0.01


def test_skew_grows_as_alpha_falls_synthetic(synthetic_labels: np.ndarray) -> None:
    seeds = range(3)
    high = mean_skew(synthetic_labels, 100.0, 5, seeds)
    medium = mean_skew(synthetic_labels, 1.0, 5, seeds)
    low = mean_skew(synthetic_labels, 0.1, 5, seeds)

    assert high < medium
    assert medium < low
    assert high < 0.05
    assert low > 0.3


def test_iid_skew_near_zero(synthetic_labels: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=5, scheme="iid", seed=0)
    assignment = assign_nodes(synthetic_labels, settings)

    assert np.bincount(assignment).tolist() == [600] * 5
    assert label_skew(synthetic_labels, assignment, 5) < 0.05


def test_label_skew_known_values() -> None:
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])

    same_mix = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert label_skew(labels, same_mix, 2) == 0.0

    one_class_each = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    assert label_skew(labels, one_class_each, 2) == 0.5

    # Node 2 has no rows and is left out of the mean.
    assert label_skew(labels, one_class_each, 3) == 0.5


def test_label_skew_rejects_bad_assignment() -> None:
    with pytest.raises(ValueError, match="assignment contains node 3, outside 0 .. 2"):
        label_skew(np.array([0, 1, 1]), np.array([0, 3, 1]), 3)
    with pytest.raises(ValueError, match="assignment has 2 entries but labels has 3"):
        label_skew(np.array([0, 1, 1]), np.array([0, 1]), 3)


def test_dirichlet_honours_min_rows(fraud_labels: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=10, scheme="dirichlet", alpha=0.1, seed=0)

    # Without the constraint, this seed's first draw leaves a node below 50 rows.
    first_draw = assign_nodes(fraud_labels, settings, min_rows=0)
    assert np.bincount(first_draw, minlength=10).min() < 50

    redrawn = assign_nodes(fraud_labels, settings, min_rows=50)
    assert np.bincount(redrawn, minlength=10).min() >= 50


def test_dirichlet_gives_up_after_bounded_draws(synthetic_labels: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=10, scheme="dirichlet", alpha=0.01, seed=0)

    with pytest.raises(ValueError) as caught:
        assign_nodes(synthetic_labels[:100], settings, min_rows=10)

    message = str(caught.value)
    assert "alpha=0.01" in message
    assert "num_nodes=10" in message
    assert f"{MAX_DIRICHLET_DRAWS} draws" in message
    assert "Raise alpha, lower num_nodes or lower min_rows." in message


def test_too_few_rows_for_min_rows(synthetic_labels: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=10, scheme="iid")

    with pytest.raises(ValueError, match="99 rows cannot give num_nodes=10 nodes at least min_rows=10 rows"):
        assign_nodes(synthetic_labels[:99], settings)


def test_natural_one_node_per_product_type(product_types: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=3, scheme="natural")
    labels = np.zeros(len(product_types))

    assignment = assign_nodes(labels, settings, natural_keys=product_types)

    # Keys in sorted order: H, L, M.
    assert np.bincount(assignment).tolist() == [1003, 6000, 2997]
    assert set(product_types[assignment == 0]) == {"H"}
    assert set(product_types[assignment == 1]) == {"L"}


def test_natural_wrong_node_count(product_types: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=5, scheme="natural")

    with pytest.raises(ValueError, match=r"3 distinct keys \(H, L, M\) but num_nodes is 5. Set num_nodes=3"):
        assign_nodes(np.zeros(len(product_types)), settings, natural_keys=product_types)


def test_natural_without_keys() -> None:
    settings = PartitionSettings(num_nodes=3, scheme="natural")

    expected = "scenario 'imaging' has no natural partition key; use scheme=iid or dirichlet"
    with pytest.raises(ValueError, match=expected):
        assign_nodes(np.zeros(30), settings, scenario="imaging")
    with pytest.raises(ValueError, match="this scenario has no natural partition key"):
        partition_rows(np.zeros(30), settings)


def test_natural_small_key_rejected() -> None:
    keys = np.array(["a"] * 20 + ["b"] * 4)
    settings = PartitionSettings(num_nodes=2, scheme="natural")

    with pytest.raises(ValueError, match=r"fewer than min_rows=10 rows \(b: 4\)"):
        assign_nodes(np.zeros(24), settings, natural_keys=keys)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (PartitionSettings(num_nodes=0), "num_nodes must be an integer >= 1, got 0"),
        (PartitionSettings(num_nodes=2, alpha=0.0), "alpha must be a finite number > 0, got 0.0"),
        (PartitionSettings(num_nodes=2, alpha=-1.0), "alpha must be a finite number > 0, got -1.0"),
        (PartitionSettings(num_nodes=2, alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
        (PartitionSettings(num_nodes=2, seed=-1), "seed must be a non-negative integer, got -1"),
        (PartitionSettings(num_nodes=2, val_fraction=-0.1), r"val_fraction must be in \[0, 1\), got -0.1"),
        (PartitionSettings(num_nodes=2, test_fraction=1.0), r"test_fraction must be in \[0, 1\), got 1.0"),
        (PartitionSettings(num_nodes=2, val_fraction=0.5, test_fraction=0.5), r"0.5 \+ 0.5 = 1.0"),
        (
            PartitionSettings(num_nodes=2, scheme="random"),
            "Unknown partition scheme 'random'. Valid schemes: iid, dirichlet, natural.",
        ),
    ],
)
def test_invalid_settings_rejected(settings: PartitionSettings, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        validate_partition_settings(settings)
    with pytest.raises(ValueError, match=expected):
        assign_nodes(np.zeros(100), settings)


def test_split_sizes_and_stratification(fraud_labels: np.ndarray) -> None:
    rows = np.arange(10_000)
    settings = PartitionSettings(num_nodes=1, seed=0, val_fraction=0.15, test_fraction=0.15)

    train, val, test = split_rows(rows, fraud_labels[rows], settings, node=0)

    assert (len(train), len(val), len(test)) == (7000, 1500, 1500)
    assert int(fraud_labels[rows].sum()) == 157
    # Each held-out split has a quota of 0.15 * 157 = 23.55 frauds, and largest-remainder
    # rounding gives 24, so every split keeps the node's fraud rate of about 1.6 %.
    assert int(fraud_labels[val].sum()) == 24
    assert int(fraud_labels[test].sum()) == 24
    assert int(fraud_labels[train].sum()) == 109


def test_split_small_class_reaches_every_split() -> None:
    labels = np.array([0] * 40 + [1] * 3)
    rows = np.arange(100, 143)
    settings = PartitionSettings(num_nodes=1, val_fraction=0.1, test_fraction=0.1)

    train, val, test = split_rows(rows, labels, settings, node=0)

    for split in (train, val, test):
        assert int(np.isin(split, rows[labels == 1]).sum()) == 1
    assert (len(train), len(val), len(test)) == (35, 4, 4)


def test_split_covers_rows_exactly() -> None:
    rng = np.random.default_rng(5)
    rows = rng.choice(100_000, size=997, replace=False)
    labels = rng.choice(4, size=997, p=[0.7, 0.2, 0.09, 0.01])
    settings = PartitionSettings(num_nodes=1, val_fraction=0.2, test_fraction=0.1)

    train, val, test = split_rows(rows, labels, settings, node=0)
    union = np.concatenate([train, val, test])

    assert len(union) == len(rows)
    assert np.array_equal(np.sort(union), np.sort(rows))
    assert (len(val), len(test)) == (199, 100)


def test_split_deterministic_in_seed_and_node() -> None:
    labels = np.random.default_rng(1).choice(2, size=500)
    rows = np.arange(500)
    settings = PartitionSettings(num_nodes=4, seed=9)

    first = split_rows(rows, labels, settings, node=2)
    again = split_rows(rows[::-1], labels[::-1], settings, node=2)
    other_node = split_rows(rows, labels, settings, node=3)

    for split in range(3):
        assert np.array_equal(first[split], again[split])
    assert not np.array_equal(first[1], other_node[1])


def test_split_without_labels() -> None:
    settings = PartitionSettings(num_nodes=1, val_fraction=0.25, test_fraction=0.25)

    train, val, test = split_rows(np.arange(10), None, settings, node=0)

    assert (len(train), len(val), len(test)) == (4, 3, 3)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(10))


def test_split_label_length_mismatch() -> None:
    settings = PartitionSettings(num_nodes=1)

    expected = r"labels has 5 entries but rows has 4. Pass the labels of these rows \(labels\[rows\]\)"
    with pytest.raises(ValueError, match=expected):
        split_rows(np.arange(4), np.zeros(5), settings, node=0)


def test_column_vector_labels_accepted(synthetic_labels: np.ndarray) -> None:
    settings = PartitionSettings(num_nodes=3, scheme="dirichlet", seed=2)

    flat = assign_nodes(synthetic_labels, settings)
    column = assign_nodes(synthetic_labels[:, None], settings)

    assert np.array_equal(flat, column)

"""Tests of the MovieLens 100K recommendations scenario: metrics, splits, partition and training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scenarios.base import NodeData, PartitionSettings, TrainSettings
from scenarios.datasets import ensure_file
from scenarios.recommendations import RecommendationsScenario
from scenarios.recommendations.data import (
    EVAL_NEGATIVES,
    NUM_ITEMS,
    OTHER_REGION,
    RATINGS_KEY,
    UserHistory,
    group_regions,
    zip_regions,
)
from scenarios.recommendations.metrics import hit_ratio_at_k, ndcg_at_k, positive_ranks, rmse

NUM_USERS = 943
NUM_NODES = 5
FAST_TRAINING = TrainSettings(epochs=1, batch_size=256, lr=0.02, seed=7)


@pytest.fixture(scope="module")
def scenario() -> RecommendationsScenario:
    return RecommendationsScenario(allow_download=False)


@pytest.fixture(scope="module")
def nodes(scenario: RecommendationsScenario, data_root: Path) -> list[NodeData]:
    settings = PartitionSettings(num_nodes=NUM_NODES, scheme="dirichlet", alpha=1.0, seed=0)
    return scenario.load_nodes(data_root, settings)


@pytest.fixture(scope="module")
def raw_ratings(data_root: Path) -> pd.DataFrame:
    path = ensure_file(RATINGS_KEY, data_root, allow_download=False)
    frame = pd.read_csv(path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"])
    frame["user"] -= 1
    frame["item"] -= 1
    return frame


def test_ranks_count_ties_against_positive() -> None:
    positive = np.array([0.9, 0.5, 0.2])
    negative = np.array([[0.1, 0.2, 0.3], [0.6, 0.5, 0.1], [0.2, 0.2, 0.2]])

    ranks = positive_ranks(positive, negative)

    assert ranks.tolist() == [0, 2, 3]


def test_ranks_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"got \(2,\) and \(3, 4\)"):
        positive_ranks(np.zeros(2), np.zeros((3, 4)))


def test_hit_ratio_and_ndcg_by_hand() -> None:
    first = np.array([0])
    third = np.array([2])
    eleventh = np.array([10])

    assert hit_ratio_at_k(first) == 1.0
    assert ndcg_at_k(first) == 1.0
    assert hit_ratio_at_k(third) == 1.0
    assert ndcg_at_k(third) == pytest.approx(1.0 / math.log2(4))
    assert hit_ratio_at_k(eleventh) == 0.0
    assert ndcg_at_k(eleventh) == 0.0


def test_hit_ratio_and_ndcg_average_users() -> None:
    ranks = np.array([0, 2, 10, 50])

    assert hit_ratio_at_k(ranks) == pytest.approx(0.5)
    assert ndcg_at_k(ranks) == pytest.approx((1.0 + 0.5) / 4)
    assert hit_ratio_at_k(ranks, k=3) == pytest.approx(0.5)
    assert hit_ratio_at_k(ranks, k=2) == pytest.approx(0.25)


def test_ranking_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        hit_ratio_at_k(np.array([1]), k=0)
    with pytest.raises(ValueError, match="non-empty 1-D array"):
        ndcg_at_k(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="got minimum -1"):
        hit_ratio_at_k(np.array([3, -1]))


def test_rmse_known_values() -> None:
    assert rmse(np.array([3.0, 4.0, 5.0]), np.array([3.0, 4.0, 5.0])) == 0.0
    assert rmse(np.array([1.0, 3.0]), np.array([2.0, 5.0])) == pytest.approx(math.sqrt(2.5))
    with pytest.raises(ValueError, match=r"shape \(2,\) but targets have shape \(3,\)"):
        rmse(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="zero ratings"):
        rmse(np.array([]), np.array([]))


def test_history_bags_leave_out_target() -> None:
    users = np.array([1, 0, 1, 1])
    items = np.array([10, 20, 30, 40])
    history, positions = UserHistory.from_rows(users, items, num_users=2)

    all_items, all_offsets = history.bags(np.array([1, 0]))
    kept_items, kept_offsets = history.bags(np.array([1, 1]), exclude=positions[[0, 3]])

    assert all_items.tolist() == [10, 30, 40, 20]
    assert all_offsets.tolist() == [0, 3]
    assert kept_items.tolist() == [30, 40, 10, 30]
    assert kept_offsets.tolist() == [0, 2]


def test_zip_regions_group_foreign_codes() -> None:
    regions = zip_regions(np.array(["85711", "T8H1N", "02139", "V3N4P", "9"]))

    assert regions.tolist() == ["8", OTHER_REGION, "0", OTHER_REGION, "9"]


def test_group_regions_largest_first() -> None:
    regions = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 1)

    groups = group_regions(regions, num_groups=2)

    # a (5) -> 0, b (3) -> 1, c (2) -> 1, d (1) -> 0 gives sizes 6 and 5.
    assert groups.tolist() == [0] * 5 + [1] * 3 + [1] * 2 + [0]


def test_group_regions_rejects_too_many_groups() -> None:
    with pytest.raises(ValueError, match="has 2 zip-code regions, fewer than num_nodes=3"):
        group_regions(np.array(["1", "2", "2"]), num_groups=3)


def test_users_disjoint_and_complete(nodes: list[NodeData]) -> None:
    user_sets = [set(node.test.users.tolist()) for node in nodes]

    assert sum(len(users) for users in user_sets) == NUM_USERS
    assert set().union(*user_sets) == set(range(NUM_USERS))
    for node, users in zip(nodes, user_sets):
        assert set(node.train.users.tolist()) == users
        assert set(node.val.users.tolist()) == users
        assert set(node.train.history_users.tolist()) == users
        assert set(node.test.history_users.tolist()) == users
        assert len(node.test) == len(users)
        assert len(node.val) == len(users)
        assert node.info["num_users"] == len(users)


def test_every_rating_in_one_split(nodes: list[NodeData], raw_ratings: pd.DataFrame) -> None:
    rows = [(split.users, split.items) for node in nodes for split in (node.train, node.val, node.test)]
    users = np.concatenate([pair[0] for pair in rows])
    items = np.concatenate([pair[1] for pair in rows])

    split_pairs = set(zip(users.tolist(), items.tolist()))
    raw_pairs = set(zip(raw_ratings["user"].tolist(), raw_ratings["item"].tolist()))
    assert len(users) == len(raw_ratings)
    assert split_pairs == raw_pairs


def test_test_row_is_latest_rating(nodes: list[NodeData], raw_ratings: pd.DataFrame) -> None:
    # Ties in time are broken by item id, so the latest rating is the last in (time, item) order.
    ordered = raw_ratings.sort_values(["user", "timestamp", "item"])
    latest = ordered.groupby("user").nth(-1).set_index("user")
    second_latest = ordered.groupby("user").nth(-2).set_index("user")

    for node in nodes:
        assert node.test.items.tolist() == latest.loc[node.test.users, "item"].tolist()
        assert node.test.timestamps.tolist() == latest.loc[node.test.users, "timestamp"].tolist()
        assert node.val.items.tolist() == second_latest.loc[node.val.users, "item"].tolist()

        newest_train = pd.Series(node.train.timestamps).groupby(node.train.users).max()
        val_time = pd.Series(node.val.timestamps, index=node.val.users)
        assert (newest_train <= val_time.loc[newest_train.index]).all()


def test_test_history_excludes_test_item(nodes: list[NodeData]) -> None:
    node = nodes[0]
    test_pairs = set(zip(node.test.users.tolist(), node.test.items.tolist()))
    history_pairs = set(zip(node.test.history_users.tolist(), node.test.history_items.tolist()))
    val_pairs = set(zip(node.val.users.tolist(), node.val.items.tolist()))

    assert not test_pairs & history_pairs
    assert val_pairs <= history_pairs
    assert len(node.test.history_users) == len(node.train) + len(node.val)


def test_eval_negatives_unrated_and_fixed(
    scenario: RecommendationsScenario, nodes: list[NodeData], raw_ratings: pd.DataFrame, data_root: Path
) -> None:
    rated = set(zip(raw_ratings["user"].tolist(), raw_ratings["item"].tolist()))
    test = nodes[1].test

    assert test.negatives.shape == (len(test), EVAL_NEGATIVES)
    for user, negatives in zip(test.users.tolist(), test.negatives.tolist()):
        assert len(set(negatives)) == EVAL_NEGATIVES
        assert not any((user, item) in rated for item in negatives)

    other_partition = scenario.load_nodes(data_root, PartitionSettings(num_nodes=2, scheme="iid", seed=3))
    pooled = scenario.pool(other_partition)
    position = {user: row for row, user in enumerate(pooled.test.users.tolist())}
    rows = [position[user] for user in test.users.tolist()]
    assert np.array_equal(pooled.test.negatives[rows], test.negatives)


def test_pool_concatenates_nodes(scenario: RecommendationsScenario, nodes: list[NodeData]) -> None:
    pooled = scenario.pool(nodes)

    assert pooled.node == -1
    assert scenario.num_examples(pooled.train) == sum(len(node.train) for node in nodes)
    assert len(pooled.test) == NUM_USERS
    assert pooled.info["num_users"] == NUM_USERS


def test_natural_partition_by_region(scenario: RecommendationsScenario, data_root: Path) -> None:
    nodes = scenario.load_nodes(data_root, PartitionSettings(num_nodes=4, scheme="natural"))

    sizes = [node.info["num_users"] for node in nodes]
    assert sum(sizes) == NUM_USERS
    assert max(sizes) - min(sizes) < 100

    with pytest.raises(ValueError, match="has 11 zip-code regions, fewer than num_nodes=12"):
        scenario.load_nodes(data_root, PartitionSettings(num_nodes=12, scheme="natural"))


def test_model_covers_all_items(scenario: RecommendationsScenario, raw_ratings: pd.DataFrame) -> None:
    model = scenario.build_model()

    assert model.history_embedding.num_embeddings == NUM_ITEMS
    assert raw_ratings["item"].nunique() == NUM_ITEMS


def test_fit_improves_validation_hr(scenario: RecommendationsScenario, nodes: list[NodeData]) -> None:
    torch.manual_seed(0)
    model = scenario.build_model()
    untrained = scenario.evaluate(model, nodes[0], "val")

    result = scenario.fit(model, nodes[0], FAST_TRAINING)
    trained = scenario.evaluate(model, nodes[0], "val")

    assert set(result) == {"train_loss"}
    assert math.isfinite(result["train_loss"])
    assert set(trained) == set(scenario.metric_names)
    assert untrained["hr_at_10"] < 0.2
    assert trained["hr_at_10"] > untrained["hr_at_10"] + 0.15
    assert trained["ndcg_at_10"] > untrained["ndcg_at_10"]
    assert trained["rmse"] < untrained["rmse"]


def test_fit_deterministic_for_seed(scenario: RecommendationsScenario, nodes: list[NodeData]) -> None:
    torch.manual_seed(0)
    initial = scenario.build_model().state_dict()
    node = min(nodes, key=lambda candidate: len(candidate.train))

    weights = []
    for seed in (7, 7, 8):
        model = scenario.build_model()
        model.load_state_dict(initial)
        scenario.fit(model, node, TrainSettings(epochs=1, batch_size=512, lr=0.02, seed=seed))
        weights.append(model.state_dict())

    for name in initial:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert not torch.equal(weights[0]["implicit_embedding.weight"], weights[2]["implicit_embedding.weight"])


def test_evaluate_rejects_train_split(scenario: RecommendationsScenario, nodes: list[NodeData]) -> None:
    model = scenario.build_model()

    with pytest.raises(ValueError, match="split must be 'val' or 'test', got 'train'"):
        scenario.evaluate(model, nodes[0], "train")

"""Tests of the binary-classification scenarios (fraud, maintenance, imaging) and their shared metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scenarios.base import NodeData, PartitionSettings, TrainSettings
from scenarios.binary import (
    BinarySplit,
    accuracy_at,
    best_f1_threshold,
    f1_at,
    pr_auc,
    roc_auc,
    standardize,
    train_binary,
)
from scenarios.fraud import FraudScenario
from scenarios.imaging import ImagingScenario
from scenarios.maintenance import MaintenanceScenario
from scenarios.maintenance.data import FEATURE_NAMES as MAINTENANCE_FEATURES

# Recommended local budgets (one round) of each scenario.
TRAIN_SETTINGS = {
    "fraud": TrainSettings(epochs=1, batch_size=256, lr=0.3, seed=0),
    "maintenance": TrainSettings(epochs=3, batch_size=64, lr=0.3, seed=0),
    "imaging": TrainSettings(epochs=1, batch_size=64, lr=0.03, seed=0),
}
SCENARIOS = {"fraud": FraudScenario, "maintenance": MaintenanceScenario, "imaging": ImagingScenario}
TWO_NODES = PartitionSettings(num_nodes=2, scheme="dirichlet", alpha=1.0, seed=0)


def _split_from_scores(labels: list[int], scores: list[float]) -> BinarySplit:
    """Build a split whose features are the logits of ``scores``, for an identity model."""
    probabilities = torch.tensor(scores, dtype=torch.float64)
    logits = torch.log(probabilities / (1 - probabilities)).float()[:, None]
    return BinarySplit(features=logits, labels=torch.tensor(labels, dtype=torch.float32))


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [tensor.detach().clone() for tensor in model.state_dict().values()]


# --------------------------------------------------------------------------- metrics


def test_roc_auc_known_value():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])

    # Of the four (negative, positive) pairs, only (0.4, 0.35) is ranked wrongly.
    assert roc_auc(labels, scores) == pytest.approx(0.75)


def test_pr_auc_known_value():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])

    # Ranked: 0.8 (pos), 0.4 (neg), 0.35 (pos). AP = 0.5 * 1 + 0.5 * 2/3.
    assert pr_auc(labels, scores) == pytest.approx(0.5 + 0.5 * 2 / 3)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], []])
def test_ranking_metrics_nan_on_one_class(labels):
    scores = np.linspace(0.1, 0.9, len(labels))

    assert math.isnan(roc_auc(np.array(labels), scores))
    assert math.isnan(pr_auc(np.array(labels), scores))


def test_f1_at_threshold():
    labels = np.array([1, 0, 1, 1])
    scores = np.array([0.9, 0.8, 0.3, 0.6])

    # score >= 0.6 predicts rows 0, 1 and 3: TP = 2, FP = 1, FN = 1.
    assert f1_at(labels, scores, 0.6) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_at(np.array([0, 0]), np.array([0.1, 0.2]), 0.5) == 0.0


def test_accuracy_at_threshold():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.5, 0.4, 0.1])

    # score >= 0.5 predicts [1, 1, 0, 0], two of four right.
    assert accuracy_at(labels, scores, 0.5) == pytest.approx(0.5)
    assert math.isnan(accuracy_at(np.array([]), np.array([]), 0.5))


def test_best_f1_threshold_on_split():
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.2, 0.6, 0.9, 0.7, 0.3])

    # score >= 0.3 gives TP = 3, FP = 1, FN = 0, the best F1 of any threshold.
    threshold = best_f1_threshold(labels, scores)

    assert threshold == pytest.approx(0.3)
    assert f1_at(labels, scores, threshold) == pytest.approx(6 / 7)


def test_best_f1_threshold_tie_takes_highest():
    labels = np.array([1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6])

    # Thresholds 0.9 (TP 1, FN 1) and 0.6 (TP 2, FP 2) both give F1 = 2/3.
    threshold = best_f1_threshold(labels, scores)

    assert threshold == pytest.approx(0.9)
    assert f1_at(labels, scores, threshold) == pytest.approx(2 / 3)


def test_best_f1_threshold_without_positives():
    assert best_f1_threshold(np.array([0, 0, 0]), np.array([0.1, 0.7, 0.9])) == 0.5
    assert best_f1_threshold(np.array([], dtype=int), np.array([]), default=0.3) == 0.3


def test_evaluate_takes_f1_threshold_from_val():
    # On val, threshold 0.6 separates the classes (F1 = 1). On test, 0.6 gives
    # F1 = 0.5, while the test-optimal threshold 0.5 would give F1 = 0.8.
    val = _split_from_scores([0, 1, 1], [0.2, 0.6, 0.9])
    test = _split_from_scores([1, 0, 1], [0.5, 0.7, 0.8])
    data = NodeData(node=0, train=val, val=val, test=test)

    metrics = FraudScenario().evaluate(torch.nn.Identity(), data, split="test")

    assert metrics["f1_threshold"] == pytest.approx(0.6)
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["roc_auc"] == pytest.approx(0.5)


def test_evaluate_nan_on_one_class_split():
    val = _split_from_scores([0, 1], [0.2, 0.8])
    test = _split_from_scores([0, 0, 0], [0.2, 0.5, 0.9])
    data = NodeData(node=0, train=val, val=val, test=test)

    metrics = MaintenanceScenario().evaluate(torch.nn.Identity(), data)

    assert math.isnan(metrics["roc_auc"])
    assert math.isnan(metrics["pr_auc"])
    assert metrics["f1"] == 0.0


def test_evaluate_rejects_unknown_split():
    split = _split_from_scores([0, 1], [0.2, 0.8])
    data = NodeData(node=0, train=split, val=split, test=split)

    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        FraudScenario().evaluate(torch.nn.Identity(), data, split="holdout")


# --------------------------------------------------------------------------- helpers


def test_standardize_uses_train_statistics():
    train = np.array([[1.0, 10.0, 1.0], [3.0, 10.0, 0.0]])
    test = np.array([[5.0, 12.0, 1.0]])

    train_out, test_out = standardize(train, test, num_columns=2)

    # Column 0: mean 2, std 1. Column 1 has no spread, so it is only centred.
    # Column 2 is past num_columns and copied unchanged.
    np.testing.assert_allclose(train_out, [[-1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(test_out, [[3.0, 2.0, 1.0]])
    assert test_out.dtype == np.float32


def test_binary_split_rejects_length_mismatch():
    with pytest.raises(ValueError, match="features have 3 rows but labels have 2"):
        BinarySplit(features=torch.zeros(3, 2), labels=torch.zeros(2))


def test_train_binary_rejects_empty_split():
    empty = BinarySplit(features=torch.zeros(0, 2), labels=torch.zeros(0))

    with pytest.raises(ValueError, match="cannot train on an empty split"):
        train_binary(torch.nn.Linear(2, 1), empty, TrainSettings())


# --------------------------------------------------------------------------- scenarios on real data


@pytest.mark.parametrize("name", ["fraud", "maintenance", "imaging"])
def test_fit_improves_val_roc_auc(name, data_root: Path):
    scenario = SCENARIOS[name]()
    nodes = scenario.load_nodes(data_root, TWO_NODES)
    torch.manual_seed(0)
    model = scenario.build_model()

    before = scenario.evaluate(model, nodes[0], split="val")["roc_auc"]
    result = scenario.fit(model, nodes[0], TRAIN_SETTINGS[name])
    after = scenario.evaluate(model, nodes[0], split="val")["roc_auc"]

    assert len(nodes) == 2
    assert math.isfinite(result["train_loss"])
    assert after > before
    assert after > 0.8


@pytest.mark.parametrize(
    ("name", "options"), [("maintenance", {}), ("imaging", {"dataset": "breastmnist"})]
)
def test_fit_deterministic_per_seed(name, options, data_root: Path):
    scenario = SCENARIOS[name](**options)
    node = scenario.load_nodes(data_root, TWO_NODES)[1]
    settings = TRAIN_SETTINGS[name]

    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(0)
        model = scenario.build_model()
        loss = scenario.fit(model, node, TrainSettings(settings.epochs, settings.batch_size, settings.lr, seed))
        runs.append((_weights(model), loss, scenario.evaluate(model, node)))

    (weights_a, loss_a, metrics_a), (weights_b, loss_b, metrics_b), (weights_c, _, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert loss_a == loss_b
    assert metrics_a == metrics_b
    assert not all(torch.equal(a, c) for a, c in zip(weights_a, weights_c))


def test_load_nodes_deterministic(data_root: Path):
    scenario = FraudScenario()
    first = scenario.load_nodes(data_root, TWO_NODES)
    second = scenario.load_nodes(data_root, TWO_NODES)

    for node_a, node_b in zip(first, second):
        assert torch.equal(node_a.train.features, node_b.train.features)
        assert torch.equal(node_a.test.labels, node_b.test.labels)


def test_pool_concatenates_nodes(data_root: Path):
    scenario = MaintenanceScenario()
    nodes = scenario.load_nodes(data_root, PartitionSettings(num_nodes=3, seed=1))

    pooled = scenario.pool(nodes)

    assert pooled.node == -1
    for split in ("train", "val", "test"):
        assert scenario.num_examples(getattr(pooled, split)) == sum(len(getattr(node, split)) for node in nodes)
    # Every AI4I row lands in exactly one split of one node.
    assert sum(len(getattr(pooled, split)) for split in ("train", "val", "test")) == 10_000


def test_maintenance_natural_partition_by_type(data_root: Path):
    scenario = MaintenanceScenario()
    nodes = scenario.load_nodes(data_root, PartitionSettings(num_nodes=3, scheme="natural"))

    type_columns = [MAINTENANCE_FEATURES.index(f"type_{letter}") for letter in "LMH"]
    node_types = []
    for node in nodes:
        assert len(node.info["product_types"]) == 1
        node_types.append(node.info["product_types"][0])

        # The node's one-hot columns mark only its own type.
        one_hot = node.train.features[:, type_columns]
        assert torch.all(one_hot.sum(dim=1) == 1)
        assert torch.all(one_hot[:, "LMH".index(node_types[-1])] == 1)

    assert len(nodes) == 3
    assert sorted(node_types) == ["H", "L", "M"]


def test_maintenance_natural_needs_three_nodes(data_root: Path):
    with pytest.raises(ValueError, match="3 distinct keys"):
        MaintenanceScenario().load_nodes(data_root, PartitionSettings(num_nodes=5, scheme="natural"))


@pytest.mark.parametrize("scenario", [FraudScenario(), ImagingScenario()])
def test_natural_partition_rejected(scenario, data_root: Path):
    with pytest.raises(ValueError, match=f"scenario '{scenario.name}' has no natural partition key"):
        scenario.load_nodes(data_root, PartitionSettings(num_nodes=3, scheme="natural"))


def test_maintenance_features_exclude_leaks():
    leaking = {"TWF", "HDF", "PWF", "OSF", "RNF", "UDI", "Product ID", "Machine failure"}

    assert leaking.isdisjoint(MAINTENANCE_FEATURES)
    assert len(MAINTENANCE_FEATURES) == 8


def test_standardize_option_uses_node_statistics(data_root: Path):
    nodes = MaintenanceScenario(standardize=True).load_nodes(data_root, TWO_NODES)

    numeric = nodes[0].train.features[:, :5].double()
    np.testing.assert_allclose(numeric.mean(dim=0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(numeric.std(dim=0, unbiased=False).numpy(), 1.0, atol=1e-5)


def test_imaging_model_has_no_batchnorm():
    model = ImagingScenario().build_model()
    module_types = [type(module) for module in model.modules()]

    assert not any(issubclass(kind, torch.nn.modules.batchnorm._BatchNorm) for kind in module_types)
    assert torch.nn.GroupNorm in module_types
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2,)


def test_imaging_breastmnist_option(data_root: Path):
    nodes = ImagingScenario(dataset="breastmnist").load_nodes(data_root, TWO_NODES)

    # BreastMNIST has 780 images in its official splits, all pooled.
    assert sum(len(node.train) + len(node.val) + len(node.test) for node in nodes) == 780
    assert nodes[0].train.features.shape[1:] == (1, 28, 28)
    assert nodes[0].info["dataset"] == "breastmnist"


def test_imaging_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="unknown imaging dataset 'chestmnist'"):
        ImagingScenario(dataset="chestmnist")

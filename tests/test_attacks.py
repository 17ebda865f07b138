"""Attack maths on known vectors, and the server-side attack simulation on built replies."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
from conftest import make_reply
from flwr.app import Array, ArrayRecord

from clients.local import is_label_flipper
from scenarios.spec import TaskSpec
from strategies import attacks
from strategies.attack_simulation import (
    AttackSettings,
    AttackSimulation,
    attack_spec,
    choose_attackers,
)
from strategies.updates import reply_arrays


class EventSink:
    """Stands in for the run log and keeps the robustness events."""

    def __init__(self) -> None:
        self.events = []

    def record_event(self, phase, server_round, event, node=None, **fields):
        self.events.append(
            {"phase": phase, "round": server_round, "event": event, **fields}
        )


class MeanStrategy:
    """Stands in for FedAvg: returns the unweighted mean of the reply arrays."""

    def __init__(self) -> None:
        self.replies = []

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        self.replies = list(replies)
        mean = np.mean([reply_arrays(reply)["w"] for reply in self.replies], axis=0)
        return ArrayRecord({"w": Array(mean.astype(np.float32))}), None


class CapturingStrategy:
    """Stands in for the inner strategy and keeps the replies it was given."""

    def __init__(self) -> None:
        self.replies = []
        self.strategy = None

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        self.replies = list(replies)
        return None, None

    def summary(self) -> None:
        pass


def test_sign_flip_negates_and_scales() -> None:
    result = attacks.sign_flip(np.array([1.0, -2.0, 3.0]), scale=2.0)

    np.testing.assert_allclose(result, [-2.0, 4.0, -6.0])


def test_sign_flip_rejects_nonpositive_scale() -> None:
    with pytest.raises(ValueError, match="set attack.scale to a positive number"):
        attacks.sign_flip(np.ones(2), scale=0.0)


def test_scaling_boosts_update() -> None:
    np.testing.assert_allclose(
        attacks.scaling(np.array([0.5, -1.0]), boost=4.0), [2.0, -4.0]
    )


def test_gaussian_has_mean_honest_norm() -> None:
    honest = np.array([[3.0, 0.0, 0.0], [0.0, 5.0, 0.0]])

    first = attacks.gaussian(honest, np.random.default_rng(1))
    again = attacks.gaussian(honest, np.random.default_rng(1))

    assert np.linalg.norm(first) == pytest.approx(4.0)
    np.testing.assert_array_equal(first, again)
    assert abs(first @ honest.mean(axis=0)) < 0.999 * np.linalg.norm(
        first
    ) * np.linalg.norm(honest.mean(axis=0))


def test_alie_z_matches_formula() -> None:
    # n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4, quantile (10 - 4) / 10 = 0.6.
    assert attacks.alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(0.6))
    assert attacks.alie_z(10, 2) == pytest.approx(0.253347, abs=1e-6)
    # n = 10, f = 4: s = 2, quantile 0.8.
    assert attacks.alie_z(10, 4) == pytest.approx(0.841621, abs=1e-6)


def test_alie_is_mean_minus_z_std() -> None:
    honest = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])

    result = attacks.alie(honest, num_nodes=10, num_malicious=2)

    # Column 0: mean 2, sample std 2. Column 1: mean 1, std 0.
    z = attacks.alie_z(10, 2)
    np.testing.assert_allclose(result, [2.0 - 2.0 * z, 1.0])


def test_alie_z_twenty_nodes() -> None:
    # n = 20, f = 4: s = floor(20/2 + 1) - 4 = 7, quantile (20 - 7) / 20 = 0.65.
    assert attacks.alie_z(20, 4) == pytest.approx(0.385320, abs=1e-6)


def test_alie_fixed_z_replaces_formula() -> None:
    honest = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])

    result = attacks.alie(honest, num_nodes=10, num_malicious=2, z=1.5)

    # Column 0: mean 2, sample std 2, so 2 - 1.5 * 2 = -1. Column 1 has std 0.
    np.testing.assert_allclose(result, [-1.0, 1.0])


@pytest.mark.parametrize("z", [0.0, -1.0, float("inf"), float("nan")])
def test_alie_rejects_bad_z(z: float) -> None:
    with pytest.raises(ValueError, match="set attack.z to a positive number or null"):
        attacks.alie(np.ones((2, 2)), num_nodes=10, num_malicious=2, z=z)


def test_alie_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="0 < f < n"):
        attacks.alie_z(4, 4)


def test_ipm_reverses_scaled_mean() -> None:
    honest = np.array([[1.0, 2.0], [3.0, 4.0]])

    np.testing.assert_allclose(attacks.ipm(honest, epsilon=0.5), [-1.0, -1.5])


def test_min_max_solves_one_dimension() -> None:
    # Honest 0 and 2: mean 1, std 1, direction -1. The largest pairwise distance
    # is 2, and the distance of 1 - gamma to 2 is 1 + gamma, so gamma = 1.
    honest = np.array([[0.0], [2.0]])

    for direction in ("std", "unit_mean"):
        update, gamma = attacks.min_max(honest, direction=direction)
        assert gamma == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(update, [0.0], atol=1e-4)


def test_min_max_gamma_is_largest_feasible() -> None:
    honest = np.random.default_rng(3).normal(size=(6, 20))
    bound = attacks.max_pairwise_distance(honest)

    update, gamma = attacks.min_max(honest, direction="std")
    perturbation = attacks.min_max_direction(honest, "std")
    beyond = honest.mean(axis=0) + (gamma + 1e-3) * perturbation

    assert gamma > 0
    assert np.sqrt(((honest - update) ** 2).sum(axis=1)).max() <= bound + 1e-9
    assert np.sqrt(((honest - beyond) ** 2).sum(axis=1)).max() > bound


def test_min_max_rejects_unknown_direction() -> None:
    with pytest.raises(ValueError, match="unknown Min-Max direction 'inverse'"):
        attacks.min_max(np.ones((2, 2)), direction="inverse")


def test_min_max_directions_on_known_mean() -> None:
    honest = np.array([[1.0, -2.0], [3.0, 0.0]])

    # Mean (2, -1), population std (1, 1), norm of the mean sqrt(5).
    np.testing.assert_allclose(attacks.min_max_direction(honest, "std"), [-1.0, -1.0])
    np.testing.assert_allclose(
        attacks.min_max_direction(honest, "unit_mean"),
        np.array([-2.0, 1.0]) / np.sqrt(5.0),
    )
    np.testing.assert_allclose(attacks.min_max_direction(honest, "sign"), [-1.0, 1.0])


def test_min_max_sign_solves_two_dimensions() -> None:
    # Mean (2, -1), p = -sign(mean) = (-1, 1), largest honest distance sqrt(8).
    # The update (2 - g, -1 + g) lies sqrt(2 + 2 g^2) from both honest
    # updates, so the bound gives g^2 <= 3.
    honest = np.array([[1.0, -2.0], [3.0, 0.0]])

    update, gamma = attacks.min_max(honest, direction="sign")

    assert gamma == pytest.approx(np.sqrt(3.0), abs=1e-4)
    np.testing.assert_allclose(
        update, [2.0 - np.sqrt(3.0), -1.0 + np.sqrt(3.0)], atol=1e-4
    )


def test_min_max_sign_zero_where_mean_zero() -> None:
    honest = np.array([[1.0, -1.0, 2.0], [-1.0, 1.0, 4.0]])

    np.testing.assert_array_equal(
        attacks.min_max_direction(honest, "sign"), [0.0, 0.0, -1.0]
    )


def test_choose_attackers_is_seeded() -> None:
    first = choose_attackers(10, 0.2, seed=0)

    assert len(first) == 2
    assert first == sorted(first)
    assert first == choose_attackers(10, 0.2, seed=0)
    assert len(choose_attackers(10, 0.4, seed=0)) == 4
    assert choose_attackers(10, 0.0, seed=0) == []


def test_choose_attackers_keeps_one_honest() -> None:
    with pytest.raises(ValueError, match="lower attack.fraction"):
        choose_attackers(2, 0.9, seed=0)


def test_attack_settings_reject_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown attack 'flood'"):
        AttackSettings(name="flood")


def test_attack_settings_read_z() -> None:
    assert AttackSettings.from_config({"name": "alie", "z": None}).z is None
    assert AttackSettings.from_config({"name": "alie", "z": 1.5}).z == 1.5
    with pytest.raises(ValueError, match="Invalid setting attack.z=-1"):
        AttackSettings(name="alie", z=-1.0)


def test_attack_settings_accept_sign_direction() -> None:
    assert AttackSettings(name="min_max", direction="sign").direction == "sign"
    with pytest.raises(ValueError, match="Invalid setting attack.direction='inverse'"):
        AttackSettings(name="min_max", direction="inverse")


def test_attack_spec_names_attackers() -> None:
    spec = attack_spec(
        AttackSettings(name="label_flip", fraction=0.2, seed=5), num_nodes=10
    )

    assert spec["name"] == "label_flip"
    assert spec["attackers"] == choose_attackers(10, 0.2, 5)
    assert attack_spec(AttackSettings(), num_nodes=10) is None


def test_label_flipper_read_from_spec() -> None:
    spec = TaskSpec(scenario="fraud", attack={"name": "label_flip", "attackers": [3]})

    assert is_label_flipper(spec, 3)
    assert not is_label_flipper(spec, 2)
    assert not is_label_flipper(TaskSpec(scenario="fraud"), 3)


def _round(global_value: np.ndarray, updates: dict[int, np.ndarray]):
    replies = [
        make_reply(
            100 + pid,
            ArrayRecord({"w": Array((global_value + update).astype(np.float32))}),
            {"num-examples": 10.0},
            pid,
        )
        for pid, update in updates.items()
    ]
    return ArrayRecord({"w": Array(global_value.astype(np.float32))}), replies


def test_simulation_replaces_attacker_with_ipm() -> None:
    global_value = np.array([1.0, 1.0])
    updates = {
        0: np.array([1.0, 0.0]),
        1: np.array([3.0, 2.0]),
        2: np.array([5.0, 5.0]),
    }
    global_arrays, replies = _round(global_value, updates)
    inner = CapturingStrategy()
    wrapper = AttackSimulation(
        inner, AttackSettings(name="ipm", fraction=0.3, epsilon=0.5), attackers=[2]
    )

    wrapper.configure_train(1, global_arrays, None, None)
    wrapper.aggregate_train(1, replies)

    # Honest mean update (2, 1), reversed and halved.
    crafted = reply_arrays(inner.replies[2])["w"]
    np.testing.assert_allclose(
        crafted, global_value + np.array([-1.0, -0.5]), rtol=1e-6
    )
    np.testing.assert_allclose(reply_arrays(inner.replies[0])["w"], [2.0, 1.0])


def test_simulation_flips_own_update() -> None:
    global_value = np.zeros(2)
    global_arrays, replies = _round(
        global_value, {0: np.array([1.0, 1.0]), 1: np.array([0.5, -2.0])}
    )
    inner = CapturingStrategy()
    wrapper = AttackSimulation(
        inner, AttackSettings(name="sign_flip", fraction=0.5, scale=3.0), attackers=[1]
    )

    wrapper.configure_train(1, global_arrays, None, None)
    wrapper.aggregate_train(1, replies)

    np.testing.assert_allclose(reply_arrays(inner.replies[1])["w"], [-1.5, 6.0])


def test_simulation_leaves_label_flip_replies() -> None:
    global_value = np.zeros(2)
    global_arrays, replies = _round(
        global_value, {0: np.array([1.0, 1.0]), 1: np.array([0.5, -2.0])}
    )
    inner = CapturingStrategy()
    wrapper = AttackSimulation(
        inner, AttackSettings(name="label_flip", fraction=0.5), attackers=[1]
    )

    wrapper.configure_train(1, global_arrays, None, None)
    wrapper.aggregate_train(1, replies)

    np.testing.assert_allclose(reply_arrays(inner.replies[1])["w"], [0.5, -2.0])


def test_binary_flip_labels_copies_train() -> None:
    import torch

    from scenarios.base import NodeData
    from scenarios.binary import BinarySplit
    from scenarios.fraud import FraudScenario

    split = BinarySplit(
        features=torch.zeros(3, 2), labels=torch.tensor([0.0, 1.0, 0.0])
    )
    node = NodeData(node=1, train=split, val=split, test=split)

    flipped = FraudScenario().flip_labels(node)

    assert flipped.train.labels.tolist() == [1.0, 0.0, 1.0]
    assert node.train.labels.tolist() == [0.0, 1.0, 0.0]
    assert flipped.test is node.test
    assert flipped.info["labels_flipped"] is True


def test_rating_flip_drops_liked_rows() -> None:
    from scenarios.base import NodeData
    from scenarios.recommendations import InteractionSplit, RecommendationsScenario

    train = InteractionSplit(
        users=np.array([0, 0, 1, 1]),
        items=np.array([5, 6, 7, 8]),
        ratings=np.array([1.0, 5.0, 3.0, 4.0], dtype=np.float32),
        timestamps=np.arange(4),
        history_users=np.array([0, 0, 1, 1]),
        history_items=np.array([5, 6, 7, 8]),
        negatives=np.zeros((4, 0), dtype=np.int64),
    )
    node = NodeData(node=0, train=train, val=train, test=train)

    flipped = RecommendationsScenario().flip_labels(node).train

    # 1 -> 5 and 3 -> 3 stay; the liked items 6 (5 stars) and 8 (4 stars) leave.
    assert flipped.items.tolist() == [5, 7]
    assert flipped.ratings.tolist() == [5.0, 3.0]
    assert flipped.history_items.tolist() == [5, 7]
    assert flipped.ratings.dtype == np.float32


def test_simulation_alie_attackers_send_same_update() -> None:
    global_value = np.zeros(2)
    updates = {
        0: np.array([0.0, 1.0]),
        1: np.array([2.0, 1.0]),
        2: np.array([4.0, 1.0]),
        3: np.array([9.0, 9.0]),
        4: np.array([-5.0, 3.0]),
    }
    global_arrays, replies = _round(global_value, updates)
    inner = CapturingStrategy()
    settings = AttackSettings(name="alie", fraction=0.4, z=1.5)
    wrapper = AttackSimulation(inner, settings, attackers=[3, 4])

    wrapper.configure_train(1, global_arrays, None, None)
    wrapper.aggregate_train(1, replies)

    # Honest column 0: mean 2, sample std 2; column 1: mean 1, std 0.
    for attacker in (3, 4):
        np.testing.assert_allclose(
            reply_arrays(inner.replies[attacker])["w"], [-1.0, 1.0]
        )


def test_simulation_reports_aggregate_deviation() -> None:
    global_value = np.array([1.0, 1.0])
    updates = {
        0: np.array([1.0, 0.0]),
        1: np.array([3.0, 0.0]),
        2: np.array([5.0, 5.0]),
    }
    global_arrays, replies = _round(global_value, updates)
    sink = EventSink()
    settings = AttackSettings(name="ipm", fraction=0.3, epsilon=1.0)
    wrapper = AttackSimulation(MeanStrategy(), settings, attackers=[2], sink=sink)

    wrapper.configure_train(1, global_arrays, None, None)
    wrapper.aggregate_train(1, replies)

    # Honest mean update (2, 0); the attacker sends (-2, 0), so the mean
    # aggregate update is (2/3, 0): 4/3 from the honest mean, same direction.
    replaced = next(e for e in sink.events if e["event"] == "updates_replaced")
    deviation = next(e for e in sink.events if e["event"] == "aggregate_deviation")
    assert replaced["distances_to_honest_mean"] == pytest.approx([4.0])
    assert deviation["round"] == 1
    assert deviation["distance"] == pytest.approx(4.0 / 3.0, rel=1e-6)
    assert deviation["honest_mean_norm"] == pytest.approx(2.0)
    assert deviation["aggregate_norm"] == pytest.approx(2.0 / 3.0, rel=1e-6)
    assert deviation["cosine"] == pytest.approx(1.0)


def test_simulation_without_attacker_measures_rule() -> None:
    global_value = np.zeros(2)
    global_arrays, replies = _round(
        global_value, {0: np.array([1.0, 1.0]), 1: np.array([0.5, -2.0])}
    )
    sink = EventSink()
    inner = MeanStrategy()
    wrapper = AttackSimulation(
        inner, AttackSettings(name="alie", fraction=0.0), attackers=[], sink=sink
    )

    wrapper.configure_train(1, global_arrays, None, None)
    wrapper.aggregate_train(1, replies)

    # No reply is replaced, and the mean rule lands on the honest mean (0.75, -0.5).
    np.testing.assert_allclose(reply_arrays(inner.replies[1])["w"], [0.5, -2.0])
    assert [event["event"] for event in sink.events] == ["aggregate_deviation"]
    assert sink.events[0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert sink.events[0]["honest_mean_norm"] == pytest.approx(np.hypot(0.75, 0.5))
    assert sink.events[0]["cosine"] == pytest.approx(1.0)

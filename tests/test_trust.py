"""Trust weighting, reputation and quarantine on constructed rounds."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from conftest import make_reply
from strategies.recording import aggregate_finite_metrics
from strategies.reputation import ReputationBook, ReputationSettings
from strategies.root_reference import matching_epochs
from strategies.trust import TrustWeighting, trust_aggregate, trust_scores


class EventSink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def record_event(self, phase, server_round, event, node=None, **fields) -> None:
        self.events.append((phase, server_round, event, node, fields))


class Grid:
    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(100, 100 + self.nodes))


REFERENCE = np.array([1.0, 0.0, 0.0, 0.0])


def _strategy(nodes: int, settings: ReputationSettings | None = None) -> tuple[TrustWeighting, EventSink]:
    sink = EventSink()
    strategy = TrustWeighting(
        lambda server_round, global_arrays, examples: REFERENCE,
        ReputationBook(settings or ReputationSettings()),
        sink=sink,
        min_train_nodes=1,
        min_available_nodes=nodes,
        train_metrics_aggr_fn=aggregate_finite_metrics,
        evaluate_metrics_aggr_fn=aggregate_finite_metrics,
    )
    return strategy, sink


def _play_round(strategy: TrustWeighting, server_round: int, nodes: int, updates: dict[int, np.ndarray]):
    """Run configure_train and aggregate_train; nodes reply with ``updates[pid]`` when sampled."""
    global_arrays = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    messages = strategy.configure_train(server_round, global_arrays, ConfigRecord(), Grid(nodes))
    sampled = sorted(message.metadata.dst_node_id - 100 for message in messages)

    replies = [
        make_reply(100 + pid, ArrayRecord({"w": Array(updates[pid].astype(np.float32))}), {"num-examples": 10.0}, pid)
        for pid in sampled
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return sampled, arrays


def _honest(rng: np.random.Generator) -> np.ndarray:
    # Cosine to the reference between about 0.3 and 1, like non-IID honest nodes.
    return REFERENCE + rng.uniform(-1.5, 1.5, size=4) * np.array([0.0, 1.0, 1.0, 1.0])


def test_trust_scores_are_relu_cosines() -> None:
    updates = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])

    scores = trust_scores(updates, np.array([1.0, 0.0]))

    np.testing.assert_allclose(scores, [1.0, 0.0, 0.0, 1 / math.sqrt(2), 0.0])


def test_trust_aggregate_rescales_to_reference_norm() -> None:
    updates = np.array([[4.0, 0.0], [0.0, 1.0]])
    reference = np.array([2.0, 0.0])

    result = trust_aggregate(updates, reference, np.array([0.75, 0.25]))

    # Each update rescaled to norm 2: (2, 0) and (0, 2), weighted 3:1.
    np.testing.assert_allclose(result, [1.5, 0.5])
    assert trust_aggregate(updates, reference, np.zeros(2)) is None


def test_sign_flipper_gets_zero_weight() -> None:
    strategy, sink = _strategy(3)
    updates = {0: np.array([2.0, 0.0, 0.0, 0.0]), 1: np.array([1.0, 1.0, 0.0, 0.0]), 2: np.array([-5.0, 0.0, 0.0, 0.0])}

    _, arrays = _play_round(strategy, 1, 3, updates)

    scores = {event[3]: event[4]["trust"] for event in sink.events if event[2] == "score"}
    assert scores[2] == 0.0
    assert scores[0] == pytest.approx(1.0)
    # Node 0 rescaled to (1, 0, 0, 0) with weight 1/(1 + 0.7071), node 1 to (0.7071, 0.7071, 0, 0).
    weight = 1 / (1 + 1 / math.sqrt(2))
    expected = weight * np.array([1.0, 0, 0, 0]) + (1 - weight) * np.array([1 / math.sqrt(2), 1 / math.sqrt(2), 0, 0])
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)


def test_all_zero_scores_keep_model() -> None:
    strategy, sink = _strategy(2)

    _, arrays = _play_round(strategy, 1, 2, {0: -REFERENCE, 1: np.array([0.0, 1.0, 0.0, 0.0])})

    np.testing.assert_array_equal(arrays["w"].numpy(), np.zeros(4))
    assert sink.events[-1][2] == "round_skipped"


def test_persistent_attacker_quarantined_in_bound(caplog) -> None:
    settings = ReputationSettings(decay=0.5, initial=1.0, threshold=0.25, patience=3, quarantine_rounds=5, probation_rounds=3)
    strategy, sink = _strategy(5, settings)

    # Honest nodes score 1, so the bar is 0.25 x median reputation 1. The
    # attacker's reputation 0.5**t is below 0.25 from t = 3, and its third
    # consecutive low round is round 5.
    bound = math.floor(math.log(settings.threshold) / math.log(settings.decay)) + settings.patience
    sampled_rounds = {}
    with caplog.at_level(logging.INFO, logger="strategies.trust"):
        for server_round in range(1, 13):
            updates = {pid: REFERENCE * (pid + 1) for pid in range(4)}
            updates[4] = -REFERENCE
            sampled, _ = _play_round(strategy, server_round, 5, updates)
            sampled_rounds[server_round] = sampled

    quarantined = [event for event in sink.events if event[2] == "quarantined"]
    assert quarantined[0][1] == bound == 5
    assert quarantined[0][3] == 4
    assert all(4 not in sampled_rounds[r] for r in range(6, 11))
    assert 4 in sampled_rounds[11]
    # Released on probation in round 11, one more zero score quarantines it again.
    assert [event[1] for event in sink.events if event[2] == "released" and event[3] == 4] == [11]
    assert quarantined[1][1] == 11
    assert {event[3] for event in quarantined} == {4}
    assert "partition 4 quarantined through round 10" in caplog.text


def test_low_but_typical_scores_not_quarantined() -> None:
    # Every node scores about 0.05: low in absolute terms, but typical for the round.
    strategy, sink = _strategy(4, ReputationSettings(patience=1))
    tilt = np.array([0.05, 1.0, 0.0, 0.0])

    for server_round in range(1, 11):
        _play_round(strategy, server_round, 4, {pid: tilt for pid in range(4)})

    assert not [event for event in sink.events if event[2] == "quarantined"]


def test_honest_nodes_never_quarantined() -> None:
    strategy, sink = _strategy(5)
    rng = np.random.default_rng(1)

    for server_round in range(1, 31):
        _play_round(strategy, server_round, 5, {pid: _honest(rng) for pid in range(5)})

    assert not [event for event in sink.events if event[2] == "quarantined"]
    assert min(strategy.reputation.reputation(pid) for pid in range(5)) > 0.25


def test_reputation_state_round_trip() -> None:
    strategy, _ = _strategy(3)
    _play_round(strategy, 1, 3, {0: REFERENCE, 1: -REFERENCE, 2: REFERENCE})

    restored, _ = _strategy(3)
    restored.load_state_dict(strategy.state_dict())

    assert restored.reputation.reputation(1) == pytest.approx(0.5)
    assert restored.reputation.reputation(0) == pytest.approx(1.0)
    assert restored.node_ids == {0: 100, 1: 101, 2: 102}


def test_reputation_settings_reject_bad_patience() -> None:
    with pytest.raises(ValueError, match=r"strategy.patience=0: it must be an integer >= 1"):
        ReputationSettings(patience=0)


def test_matching_epochs_weight_by_examples() -> None:
    # Nodes take 4, 8 and 12 steps at batch 256, weighted 1:2:3 the mean is
    # 56 / 6 = 9.33 steps; 200 root rows take 1 step per epoch.
    assert matching_epochs([1000.0, 2000.0, 3000.0], node_epochs=1, batch_size=256, root_examples=200) == 9
    # One node with 100 examples and 2 epochs takes 4 steps; the root set takes 4 per epoch.
    assert matching_epochs([100.0], node_epochs=2, batch_size=64, root_examples=200) == 1


def test_matching_epochs_cap_overstated_examples() -> None:
    honest = [1000.0] * 4
    # 1e9 claimed examples count as 3 x the median 1000 = 3000 (12 steps):
    # (4 x 1000 x 4 + 3000 x 12) / 7000 = 7.4 steps instead of 4.
    capped = matching_epochs([*honest, 1e9], node_epochs=1, batch_size=256, root_examples=200)

    assert capped == 7
    assert matching_epochs(honest, node_epochs=1, batch_size=256, root_examples=200) == 4


def test_holdout_rows_in_no_node() -> None:
    from scenarios.base import PartitionSettings
    from scenarios.partition import holdout_rows, partition_rows

    labels = np.array([1] * 20 + [0] * 980)
    settings = PartitionSettings(num_nodes=4, scheme="dirichlet", seed=3, holdout=100)

    reserved = holdout_rows(labels, settings)
    node_rows = np.concatenate([np.concatenate(splits) for splits in partition_rows(labels, settings)])

    assert len(reserved) == 100
    assert int(labels[reserved].sum()) == 2
    assert not set(reserved.tolist()) & set(node_rows.tolist())
    assert len(node_rows) == 900


def test_fraud_holdout_loads_reserved_rows(data_root) -> None:
    from scenarios.base import PartitionSettings
    from scenarios.fraud import FraudScenario

    holdout = FraudScenario().load_holdout(data_root, PartitionSettings(num_nodes=5, holdout=200))

    assert len(holdout.train) == 200
    assert holdout.info["train"] == {"rows": 200, "positives": 2}
    assert len(holdout.test) == 0


def test_maintenance_holdout_loads_reserved_rows(data_root) -> None:
    from scenarios.base import PartitionSettings
    from scenarios.maintenance import MaintenanceScenario

    holdout = MaintenanceScenario().load_holdout(data_root, PartitionSettings(num_nodes=5, holdout=100))

    assert len(holdout.train) == 100
    assert holdout.info["train"]["positives"] == 3

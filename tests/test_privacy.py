"""Tests of differential privacy: DP-SGD on nodes, the privacy ledger, central DP and the server records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_reply
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from opacus.accountants import RDPAccountant

from privacy import UNIFORM_WEIGHT_KEY, task_privacy
from privacy.central import CentralDPSettings, central_epsilon, clip_on_node
from privacy.dp_sgd import (
    DPSGDSettings,
    check_model,
    clear_cache,
    train_private,
    trainer_for,
)
from privacy.ledger import (
    BUDGET_EXHAUSTED_ERROR_CODE,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    ledger_path,
)
from privacy.recording import PrivacyRecorder, privacy_summary
from scenarios import get_scenario
from scenarios.base import NodeData, PartitionSettings, TrainSettings
from scenarios.binary import BinarySplit
from scenarios.spec import TASK_KEY, TaskSpec, load_node

DELTA = 1e-3


@pytest.fixture(autouse=True)
def fresh_trainers():
    """Each test starts without cached Opacus trainers, as a new node process would."""
    clear_cache()
    yield
    clear_cache()


def _slice(node: NodeData, rows: int) -> NodeData:
    """Keep the first ``rows`` training rows of a binary-classification node."""
    train = BinarySplit(
        features=node.train.features[:rows], labels=node.train.labels[:rows]
    )
    return NodeData(
        node=node.node, train=train, val=node.val, test=node.test, info=node.info
    )


@pytest.fixture(scope="module")
def maintenance_node(data_root: Path) -> NodeData:
    scenario = get_scenario("maintenance")
    nodes = scenario.load_nodes(
        data_root, PartitionSettings(num_nodes=2, scheme="iid", seed=0)
    )
    return _slice(nodes[0], 300)


def _privacy(tmp_path: Path, **settings: object) -> dict:
    base = {
        "name": "dp_sgd",
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "state_dir": str(tmp_path),
        "run_key": "test",
        "noise_seed": 7,
    }
    base.update(settings)
    return base


def _initial_state(scenario_name: str) -> OrderedDict:
    torch.manual_seed(0)
    return OrderedDict(get_scenario(scenario_name).build_model().state_dict())


def _train_rounds(
    privacy: dict,
    node: NodeData,
    rounds: range,
    state: OrderedDict | None = None,
    batch_size: int = 50,
    scenario_name: str = "maintenance",
):
    scenario = get_scenario(scenario_name)
    state = state if state is not None else _initial_state(scenario_name)
    reports = {}
    for server_round in rounds:
        settings = TrainSettings(
            epochs=1, batch_size=batch_size, lr=1e-3, seed=server_round
        )
        state, metrics = train_private(
            privacy, scenario, node, 0, state, settings, server_round
        )
        reports[server_round] = metrics
    return state, reports


def _independent_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Epsilon from Opacus's RDP accountant stepped once per optimizer step."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


# --- the ledger --------------------------------------------------------------


def test_epsilon_matches_opacus_after_1_5_10_rounds(
    maintenance_node: NodeData, tmp_path: Path
) -> None:
    privacy = _privacy(tmp_path, noise_multiplier=1.1)

    _, reports = _train_rounds(privacy, maintenance_node, range(1, 11))

    trainer = next(iter(_trainers()))
    steps_per_round = trainer.steps_per_epoch
    assert steps_per_round == 6  # 300 rows at an expected batch of 50
    for server_round in (1, 5, 10):
        expected = _independent_epsilon(
            1.1, trainer.sample_rate, steps_per_round * server_round, DELTA
        )
        assert reports[server_round]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert reports[server_round]["dp_steps"] == steps_per_round * server_round
    # Opacus's own accountant counted every optimizer step of the 10 rounds in this process.
    assert reports[10]["epsilon"] == pytest.approx(
        trainer.engine.accountant.get_epsilon(delta=DELTA), rel=1e-9
    )
    # Counting one step per round would give far less.
    assert reports[10]["epsilon"] > 2 * _independent_epsilon(
        1.1, trainer.sample_rate, 10, DELTA
    )


def _trainers():
    from privacy import dp_sgd

    return dp_sgd._TRAINERS.values()


def test_ledger_survives_node_restart(
    maintenance_node: NodeData, tmp_path: Path
) -> None:
    privacy = _privacy(tmp_path, noise_multiplier=1.1)
    state, reports = _train_rounds(privacy, maintenance_node, range(1, 3))
    path = ledger_path(tmp_path / "0", "test")

    # A new Python process reads the same epsilon from disk.
    code = f"from privacy.ledger import PrivacyLedger; print(PrivacyLedger({str(path)!r}).epsilon({DELTA}))"
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert float(output) == pytest.approx(reports[2]["epsilon"], rel=1e-12)

    # A restarted node (no cached trainer) continues the ledger instead of starting over.
    clear_cache()
    _, after_restart = _train_rounds(
        privacy, maintenance_node, range(3, 4), state=state
    )
    ledger = PrivacyLedger(path)
    assert ledger.rounds == 3
    assert [charge.server_round for charge in ledger.charges] == [1, 2, 3]
    assert after_restart[3]["epsilon"] == pytest.approx(
        _independent_epsilon(1.1, 1 / 6, 18, DELTA), rel=1e-9
    )


def test_ledger_rejects_other_accountant(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, "rdp").charge(1, 1.0, 0.1, 10)

    with pytest.raises(
        ValueError, match="kept with the 'rdp' accountant but privacy.accountant='prv'"
    ):
        PrivacyLedger(path, "prv")


def test_ledger_merges_equal_rounds(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for server_round in (1, 2, 3):
        ledger.charge(server_round, 1.0, 0.1, 10)
    ledger.charge(4, 2.0, 0.1, 5)

    assert ledger.history() == [(1.0, 0.1, 30), (2.0, 0.1, 5)]
    assert ledger.steps == 35
    stored = json.loads((tmp_path / "ledger.json").read_text())
    assert stored["history"] == [[1.0, 0.1, 30], [2.0, 0.1, 5]]


# --- budget --------------------------------------------------------------------


def test_budget_exhaustion_stops_training(
    maintenance_node: NodeData, tmp_path: Path
) -> None:
    privacy = _privacy(tmp_path, target_epsilon=2.0, rounds=2)
    state, reports = _train_rounds(privacy, maintenance_node, range(1, 3))
    assert reports[2]["epsilon"] <= 2.0
    assert (
        reports[2]["epsilon"] > 2.0 - 0.05
    )  # calibrated to spend nearly the whole budget

    ledger = PrivacyLedger(ledger_path(tmp_path / "0", "test"))
    steps_before = ledger.steps
    with pytest.raises(
        PrivacyBudgetExhausted,
        match=r"node 0 has spent epsilon=1\.9\d+ .*above its budget 2\.0000",
    ):
        _train_rounds(privacy, maintenance_node, range(3, 4), state=state)

    assert PrivacyLedger(ledger.path).steps == steps_before


def _train_message(spec: TaskSpec, state: OrderedDict, server_round: int):
    metadata = Metadata(
        run_id=1,
        message_id=f"train-{server_round}",
        src_node_id=0,
        dst_node_id=11,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord(
                {TASK_KEY: spec.to_json(), "server-round": server_round}
            ),
        }
    )
    return make_message(metadata=metadata, content=content)


def test_client_app_declines_with_error_reply(data_root: Path, tmp_path: Path) -> None:
    from clients import app as client_app

    spec = TaskSpec(
        scenario="maintenance",
        partition=PartitionSettings(num_nodes=2, scheme="iid", seed=0),
        train=TrainSettings(epochs=1, batch_size=64, lr=1e-3, seed=0),
        data_root=str(data_root),
        allow_download=False,
    )
    steps = math.ceil(len(load_node(spec, 1).train) / 64)
    one_round = _independent_epsilon(2.0, 1 / steps, steps, DELTA)
    two_rounds = _independent_epsilon(2.0, 1 / steps, 2 * steps, DELTA)
    budget = (one_round + two_rounds) / 2
    spec = replace(
        spec, privacy=_privacy(tmp_path, noise_multiplier=2.0, budget=budget)
    )
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    state = _initial_state("maintenance")

    first = client_app.train(_train_message(spec, state, 1), context)
    second = client_app.train(_train_message(spec, state, 2), context)

    assert not first.has_error()
    assert first.content["metrics"]["epsilon"] == pytest.approx(one_round, rel=1e-9)
    assert second.has_error()
    assert second.error.code == BUDGET_EXHAUSTED_ERROR_CODE
    assert second.error.reason.startswith(
        "privacy budget exhausted: node 1 has spent epsilon="
    )


# --- the private training loop ------------------------------------------------------


def _hook_count(model: torch.nn.Module) -> int:
    """Count the forward and backward hooks on ``model`` and its submodules."""
    return sum(
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        for module in model.modules()
    )


@pytest.mark.parametrize("clipping", ["linear", "opacus"])
def test_twenty_rounds_attach_hooks_once(
    clipping: str, maintenance_node: NodeData, tmp_path: Path
) -> None:
    node = _slice(maintenance_node, 100)
    privacy = _privacy(tmp_path, noise_multiplier=1.0, per_example_clipping=clipping)
    expected_keys = list(_initial_state("maintenance"))

    state = _initial_state("maintenance")
    hooks_per_round = []
    for server_round in range(1, 21):
        state, _ = train_private(
            privacy,
            get_scenario("maintenance"),
            node,
            0,
            state,
            TrainSettings(batch_size=25, seed=server_round),
            server_round,
        )
        trainer = next(iter(_trainers()))
        hooks_per_round.append(_hook_count(trainer.model))
        assert list(state) == expected_keys

    assert trainer.clipping == clipping
    assert len(list(_trainers())) == 1
    # At least one hook per nn.Linear (three in the maintenance MLP), added once.
    assert hooks_per_round[0] >= 3
    assert len(set(hooks_per_round)) == 1
    assert PrivacyLedger(ledger_path(tmp_path / "0", "test")).steps == 20 * 4


def test_empty_poisson_batches_still_take_noisy_steps(
    maintenance_node: NodeData, tmp_path: Path
) -> None:
    settings = DPSGDSettings.from_dict(_privacy(tmp_path, noise_multiplier=1.0))
    trainer = trainer_for(
        ("empty", 0, ""),
        get_scenario("maintenance"),
        _slice(maintenance_node, 3),
        settings,
        TrainSettings(batch_size=1),
    )
    state = _initial_state("maintenance")

    trainer.reseed(1)
    metrics = trainer.train_round(state, epochs=4, loss_seed=1)

    # 3 rows sampled at rate 1/3 over 12 steps: the seeded draw has empty batches.
    assert metrics["empty_batches"] > 0
    assert metrics["dp_steps_round"] == 12
    # Opacus's accountant counted every step, the empty ones included.
    assert sum(steps for _, _, steps in trainer.engine.accountant.history) == 12
    new_state = trainer.state_dict()
    assert all(torch.isfinite(value).all() for value in new_state.values())
    assert not torch.equal(new_state["net.0.weight"], state["net.0.weight"])


def _score(scenario, model: torch.nn.Module, node: NodeData, criterion: str) -> float:
    """Return the validation metric ``criterion``, or the negated training loss for ``loss``."""
    if criterion != "loss":
        return scenario.evaluate(model, node, "val")[criterion]

    dataset = scenario.training_dataset(node)
    with torch.no_grad():
        return -float(
            scenario.loss(
                model,
                dataset.__getitems__(list(range(len(dataset)))),
                torch.Generator().manual_seed(0),
            )
        )


@pytest.mark.parametrize(
    "scenario_name, rows, batch_size, lr, criterion",
    [
        ("fraud", 600, 64, 0.03, "loss"),
        ("maintenance", 600, 64, 0.03, "loss"),
        ("imaging", 600, 64, 0.05, "roc_auc"),
        ("recommendations", None, 32, 0.02, "loss"),
    ],
)
def test_each_scenario_trains_under_dp(
    scenario_name: str,
    rows: int | None,
    batch_size: int,
    lr: float,
    criterion: str,
    data_root: Path,
    tmp_path: Path,
) -> None:
    scenario = get_scenario(scenario_name)
    nodes = scenario.load_nodes(
        data_root, PartitionSettings(num_nodes=4, scheme="iid", seed=0)
    )
    node = _slice(nodes[0], rows) if rows else nodes[0]
    privacy = _privacy(tmp_path, noise_multiplier=0.7, max_grad_norm=1.0)
    model = scenario.build_model()
    state = _initial_state(scenario_name)
    model.load_state_dict(state)
    before = _score(scenario, model, node, criterion)

    for server_round in range(1, 4):
        settings = TrainSettings(
            epochs=1, batch_size=batch_size, lr=lr, seed=server_round
        )
        state, metrics = train_private(
            privacy, scenario, node, 0, state, settings, server_round
        )
    model.load_state_dict(state)
    after = _score(scenario, model, node, criterion)

    assert after > before
    assert metrics["epsilon"] > 0


@pytest.mark.parametrize(
    "scenario_name", ["fraud", "maintenance", "imaging", "recommendations"]
)
def test_scenario_models_are_dp_compatible(scenario_name: str) -> None:
    check_model(get_scenario(scenario_name).build_model())


def test_batchnorm_model_is_rejected() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
    )

    with pytest.raises(ValueError, match="Replace BatchNorm by GroupNorm"):
        check_model(model)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_recommendations_per_user_gradients_sum_to_batch_gradient(
    data_root: Path,
) -> None:
    from opacus import GradSampleModule

    scenario = get_scenario("recommendations", allow_download=False)
    node = scenario.load_nodes(data_root, PartitionSettings(num_nodes=5, seed=0))[1]
    dataset = scenario.training_dataset(node)
    torch.manual_seed(0)
    model = scenario.build_model()
    wrapped = GradSampleModule(model)

    loss = scenario.loss(
        wrapped, dataset.__getitems__([0, 3, 7, 11]), torch.Generator().manual_seed(0)
    )
    loss.backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad_sample.shape[0] == 4, name
        # With a mean loss, the batch gradient is the mean of the per-user gradients.
        torch.testing.assert_close(
            parameter.grad_sample.mean(dim=0), parameter.grad, rtol=1e-5, atol=1e-6
        )


def test_noise_calibration_is_per_node(
    maintenance_node: NodeData, tmp_path: Path
) -> None:
    privacy = DPSGDSettings.from_dict(_privacy(tmp_path, target_epsilon=3.0, rounds=5))
    scenario = get_scenario("maintenance")
    settings = TrainSettings(epochs=2, batch_size=50)

    small = trainer_for(
        ("a", 0, ""), scenario, _slice(maintenance_node, 100), privacy, settings
    )
    large = trainer_for(("a", 1, ""), scenario, maintenance_node, privacy, settings)

    # Fewer rows mean a larger sampling rate, so the small node needs more noise for the same epsilon.
    assert small.noise_multiplier > large.noise_multiplier
    for trainer in (small, large):
        steps = 5 * trainer.steps_for(2)
        assert (
            _independent_epsilon(
                trainer.noise_multiplier, trainer.sample_rate, steps, DELTA
            )
            <= 3.0
        )


# --- settings ---------------------------------------------------------------------


def test_settings_need_noise_or_target() -> None:
    with pytest.raises(ValueError, match="set exactly one of them"):
        DPSGDSettings(noise_multiplier=None, target_epsilon=None)
    with pytest.raises(ValueError, match=r"privacy.max_grad_norm=0.0: it must be > 0"):
        DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.0)


def test_task_privacy_names_run_folder(tmp_path: Path) -> None:
    from server.config import compose_config

    cfg = compose_config(["privacy=dp_sgd", "rounds=7"])

    privacy = task_privacy(cfg.privacy, int(cfg.rounds), tmp_path)

    assert privacy["rounds"] == 7
    assert privacy["state_dir"] == str(tmp_path.resolve() / "node_state")
    assert privacy["run_key"] == task_privacy(cfg.privacy, 7, tmp_path)["run_key"]
    assert (
        privacy["run_key"]
        != task_privacy(cfg.privacy, 7, tmp_path / "other")["run_key"]
    )
    assert task_privacy(compose_config([]).privacy, 7, tmp_path) is None


# --- central DP ---------------------------------------------------------------------


def test_client_side_clipping_bounds_update() -> None:
    received = OrderedDict(weight=torch.zeros(3), bias=torch.zeros(1))
    trained = OrderedDict(
        weight=torch.tensor([3.0, 0.0, 4.0]), bias=torch.tensor([0.0])
    )
    metrics: dict[str, float] = {}

    clip_on_node(
        ConfigRecord({"clipping_norm": 1.0}),
        {"name": "central", "clipping": "adaptive"},
        trained,
        received,
        metrics,
    )

    torch.testing.assert_close(trained["weight"], torch.tensor([0.6, 0.0, 0.8]))
    assert metrics["norm_bit"] == 1.0


def test_client_side_clipping_needs_norm_from_server() -> None:
    trained = OrderedDict(weight=torch.tensor([3.0, 4.0]))

    clip_on_node(
        ConfigRecord({}),
        {"name": "central"},
        trained,
        OrderedDict(weight=torch.zeros(2)),
        {},
    )

    torch.testing.assert_close(trained["weight"], torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize(
    "side, clipping, wrapper",
    [
        ("server", "fixed", "DifferentialPrivacyServerSideFixedClipping"),
        ("client", "fixed", "DifferentialPrivacyClientSideFixedClipping"),
        ("server", "adaptive", "DifferentialPrivacyServerSideAdaptiveClipping"),
        ("client", "adaptive", "DifferentialPrivacyClientSideAdaptiveClipping"),
    ],
)
def test_central_dp_wrapper_in_stack(side: str, clipping: str, wrapper: str) -> None:
    from server.config import compose_config
    from strategies.factory import build_strategy, sampling_settings

    cfg = compose_config(
        [
            "privacy=central",
            f"privacy.side={side}",
            f"privacy.clipping={clipping}",
            "privacy.clipped_count_stddev=1.0",
            "provenance.signatures=false",
        ]
    )

    stack = []
    strategy = build_strategy(cfg, sink=None)
    while strategy is not None:
        stack.append(type(strategy).__name__)
        strategy = getattr(strategy, "strategy", None)

    assert stack.index("PrivacyRecorder") + 1 == stack.index(wrapper)
    assert sampling_settings(cfg)["weighted_by_key"] == UNIFORM_WEIGHT_KEY


def test_central_dp_rejects_encrypted_strategy() -> None:
    from flwr.serverapp.strategy import FedAvg

    from privacy.recording import wrap_privacy
    from server.config import compose_config

    cfg = compose_config(["privacy=central", "strategy=he_fedavg"])

    with pytest.raises(
        ValueError,
        match="Use privacy=dp_sgd, which adds noise on the nodes before encryption",
    ):
        wrap_privacy(cfg, FedAvg(), min_train_nodes=5)


def test_central_epsilon_matches_opacus() -> None:
    settings = CentralDPSettings(noise_multiplier=1.2, delta=1e-5)

    assert central_epsilon(settings, 1.0, 0) == 0.0
    assert central_epsilon(settings, 1.0, 10) == pytest.approx(
        _independent_epsilon(1.2, 1.0, 10, 1e-5), rel=1e-9
    )
    assert math.isinf(central_epsilon(replace(settings, noise_multiplier=0.0), 1.0, 1))


# --- server records -------------------------------------------------------------------


class _InnerStrategy:
    """Stands in for the aggregation rule: returns a fixed aggregate."""

    def __init__(self, arrays: ArrayRecord | None) -> None:
        self.arrays = arrays
        self.seen: list = []

    def aggregate_train(self, server_round, replies):
        self.seen.append(list(replies))
        return self.arrays, MetricRecord({})


class _Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict]] = []

    def append(self, event: str, **fields: object) -> None:
        self.entries.append((event, fields))


def _budget_error_reply(node_id: int):
    reply = make_reply(node_id, error="placeholder")
    return make_message(
        metadata=reply.metadata,
        error=Error(
            code=BUDGET_EXHAUSTED_ERROR_CODE,
            reason="privacy budget exhausted: node 2 has spent epsilon=2.9",
        ),
    )


def test_recorder_reports_epsilon_per_node() -> None:
    inner = _InnerStrategy(None)
    audit = _Audit()
    recorder = PrivacyRecorder(inner, "dp_sgd", audit=audit)
    replies = [
        make_reply(
            10,
            metrics={"epsilon": 1.5, "delta": 1e-3, "num-examples": 5.0},
            partition_id=0,
        ),
        make_reply(
            11,
            metrics={"epsilon": 2.5, "delta": 2e-3, "num-examples": 5.0},
            partition_id=1,
        ),
        _budget_error_reply(12),
    ]

    recorder.aggregate_train(4, replies)
    section = privacy_summary(recorder)

    assert len(inner.seen[0]) == 3
    assert section["epsilon"] == 2.5
    assert section["delta"] == 2e-3
    assert section["nodes"] == {
        "0": {"epsilon": 1.5, "delta": 1e-3, "round": 4},
        "1": {"epsilon": 2.5, "delta": 2e-3, "round": 4},
    }
    assert section["declined"] == [
        {
            "round": 4,
            "node_id": 12,
            "reason": "privacy budget exhausted: node 2 has spent epsilon=2.9",
        }
    ]
    assert [event for event, _ in audit.entries] == [
        "epsilon",
        "epsilon",
        "budget_exhausted",
    ]
    assert audit.entries[1][1]["partition"] == 1


def test_recorder_counts_central_releases() -> None:
    settings = CentralDPSettings(noise_multiplier=1.2, delta=1e-5)
    recorder = PrivacyRecorder(
        _InnerStrategy(ArrayRecord()), "central", central=settings, sample_rate=1.0
    )

    for server_round in (1, 2, 3):
        recorder.aggregate_train(server_round, [])

    section = recorder.section()
    assert section["releases"] == 3
    assert section["epsilon"] == pytest.approx(
        _independent_epsilon(1.2, 1.0, 3, 1e-5), rel=1e-9
    )

"""Tests of per-example clipping in DP-SGD: both clipping modes against clipping by hand."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from privacy.clipping import LinearClipper
from privacy.dp_sgd import DPSGDSettings, clear_cache, resolve_clipping, trainer_for
from scenarios import get_scenario
from scenarios.base import NodeData, PartitionSettings, TrainSettings
from scenarios.binary import BinarySplit

LR = 0.1
ROWS = 8


@pytest.fixture(autouse=True)
def fresh_trainers():
    """Each test starts without cached trainers, as a new node process would."""
    clear_cache()
    yield
    clear_cache()


def _node(data_root: Path, scenario_name: str, rows: int) -> NodeData:
    scenario = get_scenario(scenario_name)
    node = scenario.load_nodes(
        data_root, PartitionSettings(num_nodes=2, scheme="iid", seed=0)
    )[0]
    train = BinarySplit(
        features=node.train.features[:rows], labels=node.train.labels[:rows]
    )
    return NodeData(node=node.node, train=train, val=node.val, test=node.test)


def _initial_state(scenario_name: str) -> OrderedDict:
    torch.manual_seed(0)
    return OrderedDict(get_scenario(scenario_name).build_model().state_dict())


def _example_gradients(
    scenario_name: str, state: OrderedDict, node: NodeData
) -> torch.Tensor:
    """Return each training row's gradient, flattened over all parameters, one row per example."""
    scenario = get_scenario(scenario_name)
    model = scenario.build_model()
    model.load_state_dict(state)
    rows = []
    for index in range(len(node.train)):
        batch = (
            node.train.features[index : index + 1],
            node.train.labels[index : index + 1],
        )
        loss = scenario.loss(model, batch, torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([grad.reshape(-1) for grad in grads]))
    return torch.stack(rows)


def _flat(state: OrderedDict) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in state.values()])


@pytest.mark.parametrize(
    "scenario_name, mode",
    [
        ("fraud", "linear"),
        ("fraud", "opacus"),
        ("maintenance", "linear"),
        ("maintenance", "opacus"),
        ("imaging", "opacus"),
    ],
)
def test_update_is_mean_of_clipped_gradients(
    scenario_name: str, mode: str, data_root: Path, tmp_path: Path
) -> None:
    node = _node(data_root, scenario_name, ROWS)
    state = _initial_state(scenario_name)
    example_grads = _example_gradients(scenario_name, state, node)
    norms = example_grads.norm(dim=1)
    # The median norm as the bound clips about half of the examples and leaves the rest.
    max_grad_norm = float(norms.median())
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped_mean = (factors.unsqueeze(1) * example_grads).sum(dim=0) / ROWS

    settings = DPSGDSettings(
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        delta=1e-3,
        state_dir=str(tmp_path),
        noise_seed=0,
        per_example_clipping=mode,
    )
    trainer = trainer_for(
        ("clip", 0, mode),
        get_scenario(scenario_name),
        node,
        settings,
        TrainSettings(batch_size=ROWS, lr=LR),
    )
    # DPSGDSettings accepts only positive noise, so the test switches the noise
    # off on the optimizer to see the clipped mean alone.
    trainer.optimizer.noise_multiplier = 0.0
    trainer.reseed(1)
    trainer.train_round(state, epochs=1, loss_seed=1)

    assert trainer.clipping == mode
    # A batch of all rows: the sampling rate is 1, so every step uses every example.
    assert trainer.sample_rate == 1.0
    assert trainer.steps_per_epoch == 1
    assert (norms > max_grad_norm).sum() >= ROWS // 2 - 1
    # The first SGD step with momentum moves the weights by -lr times the gradient.
    update = (_flat(trainer.state_dict()) - _flat(state)) / -LR
    torch.testing.assert_close(update, clipped_mean, rtol=1e-4, atol=1e-6)
    # The unclipped mean is outside the tolerance, so a step without clipping fails.
    unclipped_mean = example_grads.mean(dim=0)
    assert not torch.allclose(update, unclipped_mean, rtol=1e-4, atol=1e-6)


def test_linear_and_opacus_modes_train_alike(data_root: Path, tmp_path: Path) -> None:
    node = _node(data_root, "maintenance", 300)
    state = _initial_state("maintenance")
    results = {}
    for mode in ("linear", "opacus"):
        settings = DPSGDSettings(
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            delta=1e-3,
            state_dir=str(tmp_path),
            noise_seed=3,
            per_example_clipping=mode,
        )
        trainer = trainer_for(
            ("alike", 0, mode),
            get_scenario("maintenance"),
            node,
            settings,
            TrainSettings(epochs=2, batch_size=50, lr=LR),
        )
        trainer.reseed(1)
        metrics = trainer.train_round(state, epochs=2, loss_seed=1)
        results[mode] = (trainer, metrics, _flat(trainer.state_dict()))

    linear, opacus = results["linear"], results["opacus"]
    # The same seeds draw the same Poisson batches and the same noise in both modes.
    assert linear[1]["dp_steps_round"] == opacus[1]["dp_steps_round"] == 12
    assert linear[0].sample_rate == opacus[0].sample_rate
    assert linear[0].engine.accountant.history == opacus[0].engine.accountant.history
    torch.testing.assert_close(linear[2], opacus[2], rtol=1e-4, atol=1e-5)
    assert not torch.equal(linear[2], _flat(state))


@pytest.mark.parametrize(
    "scenario_name, expected",
    [
        ("fraud", "linear"),
        ("maintenance", "linear"),
        ("imaging", "opacus"),
        ("recommendations", "opacus"),
    ],
)
def test_auto_clipping_per_scenario(scenario_name: str, expected: str) -> None:
    model = get_scenario(scenario_name).build_model()

    assert resolve_clipping("auto", model) == expected
    assert resolve_clipping("opacus", model) == "opacus"


def test_linear_clipping_rejects_other_layers() -> None:
    model = get_scenario("imaging").build_model()

    with pytest.raises(ValueError, match=r"outside nn\.Linear: .*Conv2d"):
        resolve_clipping("linear", model)
    with pytest.raises(ValueError, match="per_example_clipping"):
        DPSGDSettings(noise_multiplier=1.0, per_example_clipping="ghost")


def test_linear_clipping_rejects_sequence_input() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    clipper = LinearClipper(model, max_grad_norm=1.0)
    loss = model(torch.randn(4, 5, 3)).mean()

    with pytest.raises(ValueError, match=r"input of shape \(4, 5, 3\)"):
        clipper.clipped_backward(loss, batch_size=4)


def test_linear_clipping_rejects_shared_layer() -> None:
    layer = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), layer)
    clipper = LinearClipper(model, max_grad_norm=1.0)
    loss = model(torch.randn(4, 3)).mean()

    with pytest.raises(ValueError, match="called 2 times"):
        clipper.clipped_backward(loss, batch_size=4)


def test_linear_clipping_norms_match_per_example_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1, bias=False)
    )
    reference = copy.deepcopy(model)
    features = torch.randn(6, 5)
    clipper = LinearClipper(model, max_grad_norm=1e6)

    norms = clipper.clipped_backward(model(features).square().mean(), batch_size=6)

    expected = []
    for row in features:
        loss = reference(row.unsqueeze(0)).square().mean()
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        expected.append(torch.cat([grad.reshape(-1) for grad in grads]).norm())
    torch.testing.assert_close(norms, torch.stack(expected), rtol=1e-5, atol=1e-7)
    # With a bound no example reaches, the gradient is the plain sum over the batch.
    total = reference(features).square().sum()
    for parameter, expected_grad in zip(
        model.parameters(), torch.autograd.grad(total, list(reference.parameters()))
    ):
        torch.testing.assert_close(parameter.grad, expected_grad, rtol=1e-5, atol=1e-6)

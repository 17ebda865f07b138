"""Node-side DP-SGD with Opacus: one private training loop for every scenario.

A scenario supplies three things through its contract (``scenarios.base``):
``training_dataset`` (one item per privacy unit), ``loss`` (the mean loss of a
batch of units) and ``optimizer``. This module wraps them with Opacus's
``PrivacyEngine`` (per-example clipping, Gaussian noise, Poisson sampling) and
charges every step to the node's ``PrivacyLedger`` before it trains. Models
made only of ``nn.Linear`` layers are clipped by ``privacy.clipping`` in
place of Opacus's per-example gradient hooks, with the same noise, sampling
and accountant (``DPSGDSettings.per_example_clipping``).

The engine is attached once per node and process (``PrivateTrainer`` objects
are cached by run and partition id). Each round loads the global weights into
the wrapped module in place, so Opacus never adds its hooks twice, and the
state sent back comes from the unwrapped module, without the ``_module.``
prefix of the Opacus wrapper.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from privacy.clipping import ClippedSumDPOptimizer, LinearClipper, unsupported_modules
from privacy.ledger import (
    ACCOUNTANTS,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    ledger_path,
)
from scenarios.base import NodeData, Scenario, TrainSettings

logger = logging.getLogger(__name__)

# Binary-search tolerance of the noise calibration: the planned run ends at
# most this far below the target epsilon (opacus.accountants.utils.get_noise_multiplier).
EPSILON_TOLERANCE = 0.01

# Relative slack of the budget check, so that the calibrated last round, whose
# epsilon equals the target up to rounding, is not declined.
BUDGET_SLACK = 1e-9

# Values of DPSGDSettings.per_example_clipping. ``auto`` takes ``linear`` for
# models whose trainable parameters all belong to nn.Linear layers, else ``opacus``.
CLIPPING_MODES = ("auto", "linear", "opacus")


@dataclass(frozen=True)
class DPSGDSettings:
    """DP-SGD settings of a run, sent to nodes in ``TaskSpec.privacy``.

    Parameters
    ----------
    max_grad_norm : float
        Per-example gradient clipping norm (L2, over all parameters).
    noise_multiplier : float, optional
        Noise standard deviation divided by ``max_grad_norm``. Set this or
        ``target_epsilon``, not both.
    target_epsilon : float, optional
        Epsilon each node may reach after ``rounds`` rounds; each node
        derives its noise multiplier from it before its first round.
    delta : float, optional
        Target delta; None uses ``1 / n`` with ``n`` the node's number of
        privacy units (rows, or users for recommendations).
    budget : float, optional
        Epsilon above which a node declines to train. None uses
        ``target_epsilon``, or no limit when only ``noise_multiplier`` is set.
    accountant : str
        ``rdp`` or ``prv`` (Opacus accountants).
    batch_size : int, optional
        Expected Poisson batch size in privacy units; None uses the
        scenario's ``train.batch_size``. Capped at the node's unit count.
    rounds : int
        Rounds planned for the run, used to calibrate ``target_epsilon``.
    run_key : str
        Names the run's ledger file in each node's state directory.
    state_dir : str, optional
        Folder with one state directory per partition, used when a node's
        config sets no ``state-dir``.
    noise_seed : int, optional
        Seed of the noise and of the Poisson sampling. None draws fresh
        seeds from the operating system. A fixed seed is for experiments
        only, because whoever knows it can subtract the noise.
    per_example_clipping : str
        How per-example gradients are clipped: ``linear``
        (``privacy.clipping.LinearClipper``, no per-example gradients
        stored, only for models made of ``nn.Linear`` layers), ``opacus``
        (Opacus's per-example gradient hooks, any model that passes
        ``check_model``) or ``auto`` (``linear`` where it applies). Both
        clip each example's gradient to ``max_grad_norm`` and add the same
        noise, so the privacy guarantee and the accounting do not depend on it.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    budget: float | None = None
    accountant: str = "rdp"
    batch_size: int | None = None
    rounds: int = 1
    run_key: str = "run"
    state_dir: str | None = None
    noise_seed: int | None = None
    per_example_clipping: str = "auto"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"privacy.noise_multiplier={self.noise_multiplier} and privacy.target_epsilon={self.target_epsilon}: "
                "set exactly one of them (the other to null)"
            )
        checks = [
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            (
                "noise_multiplier",
                self.noise_multiplier is None or self.noise_multiplier > 0,
                "> 0",
            ),
            (
                "target_epsilon",
                self.target_epsilon is None or self.target_epsilon > 0,
                "> 0",
            ),
            ("delta", self.delta is None or 0 < self.delta < 1, "in (0, 1)"),
            ("budget", self.budget is None or self.budget > 0, "> 0"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, ">= 1"),
            ("rounds", self.rounds >= 1, ">= 1"),
            ("accountant", self.accountant in ACCOUNTANTS, f"one of {ACCOUNTANTS}"),
            (
                "per_example_clipping",
                self.per_example_clipping in CLIPPING_MODES,
                f"one of {CLIPPING_MODES}",
            ),
        ]
        for key, valid, allowed in checks:
            if not valid:
                raise ValueError(
                    f"Invalid setting privacy.{key}={getattr(self, key)!r}: it must be {allowed}."
                )

    @classmethod
    def from_dict(cls, privacy: dict[str, Any]) -> DPSGDSettings:
        """Build the settings from ``TaskSpec.privacy``, ignoring keys of other modes (``name``)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in privacy.items() if key in known})

    @property
    def epsilon_budget(self) -> float:
        """Epsilon above which a node declines to train (``inf`` for no limit)."""
        if self.budget is not None:
            return float(self.budget)
        if self.target_epsilon is not None:
            return float(self.target_epsilon)
        return math.inf


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Return the smallest noise multiplier (within tolerance) whose ``steps`` steps stay within ``target_epsilon``.

    Parameters
    ----------
    target_epsilon, delta : float
        The privacy target of the whole run.
    sample_rate : float
        Poisson sampling rate of one step.
    steps : int
        Steps planned for the whole run: rounds x local epochs x steps per epoch.
    accountant : str
        ``rdp`` or ``prv``.

    Raises
    ------
    ValueError
        If no noise multiplier up to Opacus's limit (1e6) reaches the target.
    """
    try:
        with warnings.catch_warnings():
            # The search probes extreme noise levels, where the best RDP order is the largest one tried.
            warnings.filterwarnings(
                "ignore", message="Optimal order is the largest alpha"
            )
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=EPSILON_TOLERANCE,
                )
            )
    except ValueError as error:
        raise ValueError(
            f"target_epsilon={target_epsilon} at delta={delta:.3g} cannot be reached in {steps} steps at "
            f"sampling rate {sample_rate:.4g} ({error}); raise privacy.target_epsilon or lower rounds or epochs"
        ) from error


def check_model(model: torch.nn.Module) -> None:
    """Check that Opacus can compute per-example gradients of ``model``.

    Raises
    ------
    ValueError
        Listing the incompatible layers (BatchNorm, plain RNNs, layers with
        buffers) and how to replace them.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            f"{type(model).__name__} is not compatible with DP-SGD: {errors}. Replace BatchNorm by GroupNorm "
            "and nn.RNN/LSTM/GRU by opacus.layers.DPRNN/DPLSTM/DPGRU (opacus.validators.ModuleValidator.fix does both)."
        )


def resolve_clipping(mode: str, model: torch.nn.Module) -> str:
    """Return the per-example clipping mode for ``model``: ``linear`` or ``opacus``.

    ``auto`` takes ``linear`` when every trainable parameter belongs to an
    ``nn.Linear`` layer, because it skips Opacus's per-example gradients.

    Raises
    ------
    ValueError
        If ``mode`` is ``linear`` and ``model`` has other trainable layers,
        or ``mode`` is not one of ``CLIPPING_MODES``.
    """
    if mode not in CLIPPING_MODES:
        raise ValueError(
            f"Invalid setting privacy.per_example_clipping={mode!r}: it must be one of {CLIPPING_MODES}."
        )
    unsupported = unsupported_modules(model)
    if mode == "auto":
        return "opacus" if unsupported else "linear"
    if mode == "linear" and unsupported:
        raise ValueError(
            f"{type(model).__name__} has trainable parameters outside nn.Linear: {', '.join(unsupported)}. "
            "Linear per-example clipping cannot clip them; set privacy.per_example_clipping=opacus or auto."
        )
    return mode


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


def _poisson_batches(loader: DataLoader) -> Iterator[Any]:
    """Yield the batches of Opacus's Poisson ``loader``.

    For a dataset with ``__getitems__`` (which collates its own batches),
    the index lists come straight from the loader's batch sampler: the same
    draws from the same generator. This skips the DataLoader iterator's
    per-batch overhead, which took a quarter to a third of the loader's time
    on fraud batches of 256 rows (one measurement on this benchmark machine).
    """
    dataset = loader.dataset
    if not hasattr(dataset, "__getitems__"):
        yield from loader
        return
    for indices in loader.batch_sampler:
        yield dataset.__getitems__(indices)


def _collated(batch: Any) -> Any:
    # Datasets with ``__getitems__`` return an already collated batch.
    return batch


def _derived_seed(base: int, *parts: object) -> int:
    text = ":".join(str(part) for part in (base, *parts))
    return (
        int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1
    )


class PrivateTrainer:
    """One node's Opacus state in one process: wrapped model, DP optimizer and Poisson loader.

    Parameters
    ----------
    scenario : Scenario
        Supplies the model, the dataset of privacy units, the loss and the optimizer.
    data : NodeData
        The node's data; only ``data.train`` is used.
    settings : DPSGDSettings
        Clipping, noise and accounting settings.
    train : TrainSettings
        Local epochs, batch size (unless ``settings.batch_size``) and learning rate.
    partition_id : int
        The node, for seeds and messages.

    Attributes
    ----------
    sample_rate : float
        Poisson sampling rate of one step (``1 / steps_per_epoch``).
    steps_per_epoch : int
        Steps in one local epoch.
    delta : float
        The node's delta.
    noise_multiplier : float
        Given, or calibrated from ``settings.target_epsilon`` for ``settings.rounds`` rounds.
    """

    def __init__(
        self,
        scenario: Scenario,
        data: NodeData,
        settings: DPSGDSettings,
        train: TrainSettings,
        partition_id: int,
    ) -> None:
        self.scenario = scenario
        self.settings = settings
        self.partition_id = partition_id

        self.model = scenario.build_model()
        check_model(self.model)
        dataset = scenario.training_dataset(data)
        self.num_units = len(dataset)
        if self.num_units == 0:
            raise ValueError(
                f"node {partition_id} has no training examples; DP-SGD needs at least one"
            )

        self.noise_generator = torch.Generator()
        self.sampling_generator = torch.Generator()
        self.loss_generator = torch.Generator()
        batch_size = min(settings.batch_size or train.batch_size, self.num_units)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=_collated if hasattr(dataset, "__getitems__") else None,
            generator=self.sampling_generator,
        )
        self.delta = (
            settings.delta if settings.delta is not None else 1.0 / self.num_units
        )
        self.noise_multiplier = self._noise_multiplier(loader, train.epochs)

        self.engine = PrivacyEngine(accountant=settings.accountant)
        optimizer = scenario.optimizer(self.model.parameters(), train.lr)
        self.clipping = resolve_clipping(settings.per_example_clipping, self.model)
        self.clipper: LinearClipper | None = None
        if self.clipping == "linear":
            self._attach_linear(optimizer, loader)
        else:
            self._attach_opacus(optimizer, loader)
        self.steps_per_epoch = len(self.loader)
        self.sample_rate = self.loader.sample_rate
        logger.info(
            "Node %d: DP-SGD on %d units, expected batch %d, sampling rate %.5f, noise multiplier %.4f, "
            "clipping %.3g (%s), delta %.3g",
            partition_id,
            self.num_units,
            batch_size,
            self.sample_rate,
            self.noise_multiplier,
            settings.max_grad_norm,
            self.clipping,
            self.delta,
        )

    def _attach_opacus(
        self, optimizer: torch.optim.Optimizer, loader: DataLoader
    ) -> None:
        self.module, self.optimizer, self.loader = self.engine.make_private(
            module=self.model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=self.noise_generator,
        )

    def _attach_linear(
        self, optimizer: torch.optim.Optimizer, loader: DataLoader
    ) -> None:
        # The same Poisson loader, noise, averaging and accountant hook as
        # PrivacyEngine.make_private in Opacus 1.6, around LinearClipper in
        # place of the per-example gradient hooks.
        self.clipper = LinearClipper(self.model, self.settings.max_grad_norm)
        self.module = self.model
        self.loader = DPDataLoader.from_data_loader(loader)
        sample_rate = 1 / len(self.loader)
        self.optimizer = ClippedSumDPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=int(len(self.loader.dataset) * sample_rate),
            loss_reduction="mean",
            generator=self.noise_generator,
        )
        self.optimizer.attach_step_hook(
            self.engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate)
        )

    def _noise_multiplier(self, loader: DataLoader, epochs: int) -> float:
        if self.settings.noise_multiplier is not None:
            return float(self.settings.noise_multiplier)

        # Opacus's Poisson loader samples at rate 1 / len(loader) and takes int(1 / rate) steps per epoch.
        # Float rounding can make that one step fewer than len(loader), which only lowers the epsilon.
        steps_per_epoch = len(loader)
        steps = self.settings.rounds * epochs * steps_per_epoch
        return calibrate_noise_multiplier(
            self.settings.target_epsilon,
            self.delta,
            1.0 / steps_per_epoch,
            steps,
            self.settings.accountant,
        )

    def steps_for(self, epochs: int) -> int:
        """Return the number of DP-SGD steps of one round of ``epochs`` local epochs."""
        return epochs * self.steps_per_epoch

    def reseed(self, server_round: int) -> None:
        """Seed the noise and sampling generators for one round.

        Without ``noise_seed`` the seeds come from ``secrets``, so the server,
        which has the run seed, cannot predict the noise or the sampled examples.
        """
        for stream, generator in (
            ("noise", self.noise_generator),
            ("sampling", self.sampling_generator),
        ):
            if self.settings.noise_seed is None:
                generator.manual_seed(secrets.randbits(63))
            else:
                generator.manual_seed(
                    _derived_seed(
                        self.settings.noise_seed,
                        stream,
                        server_round,
                        self.partition_id,
                    )
                )

    def train_round(
        self, state: OrderedDict[str, torch.Tensor], epochs: int, loss_seed: int
    ) -> dict[str, float]:
        """Load ``state``, run ``epochs`` epochs of DP-SGD and return ``train_loss`` and ``dp_steps``.

        ``train_loss`` is the mean batch loss of the last epoch over non-empty batches.
        """
        self.model.load_state_dict(state, strict=True)
        # The non-private loops start each round with a fresh optimizer; so does this one.
        self.optimizer.state.clear()
        self.loss_generator.manual_seed(loss_seed)
        self.module.train()
        if self.clipper is not None:
            self.clipper.reset()

        steps = 0
        empty_batches = 0
        epoch_losses: list[float] = []
        with warnings.catch_warnings():
            # Opacus's full backward hooks warn whenever a layer's input needs no gradient (the first layer).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                epoch_losses = []
                for batch in _poisson_batches(self.loader):
                    self.optimizer.zero_grad(set_to_none=True)
                    batch_size = _batch_size(batch)
                    if batch_size == 0:
                        self._zero_gradients()
                        empty_batches += 1
                    else:
                        loss = self.scenario.loss(
                            self.module, batch, self.loss_generator
                        )
                        self._backward(loss, batch_size)
                        epoch_losses.append(float(loss.detach()))
                    # An empty Poisson batch still takes a noisy step: the accountant assumes every step adds noise.
                    self.optimizer.step()
                    steps += 1

        self.optimizer.zero_grad(set_to_none=True)
        if empty_batches:
            logger.debug(
                "Node %d: %d empty Poisson batches took a noise-only step",
                self.partition_id,
                empty_batches,
            )
        mean_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else math.nan
        return {
            "train_loss": mean_loss,
            "dp_steps_round": float(steps),
            "empty_batches": float(empty_batches),
        }

    def _backward(self, loss: torch.Tensor, batch_size: int) -> None:
        if self.clipper is not None:
            self.clipper.clipped_backward(loss, batch_size)
        else:
            loss.backward()

    def _zero_gradients(self) -> None:
        if self.clipper is not None:
            self.clipper.zero_grads()
            return
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                parameter.grad_sample = torch.zeros(
                    (0, *parameter.shape), dtype=parameter.dtype
                )

    def state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """Return a copy of the unwrapped model's weights (keys without Opacus's ``_module.`` prefix)."""
        return OrderedDict(
            (key, value.detach().clone())
            for key, value in self.model.state_dict().items()
        )


# (run key, partition id, task fingerprint) -> trainer. One process may serve
# several nodes (simulation workers), so the partition id is part of the key.
_TRAINERS: dict[tuple[str, int, str], PrivateTrainer] = {}


def clear_cache() -> None:
    """Forget every cached ``PrivateTrainer`` of this process (as a process restart would)."""
    _TRAINERS.clear()


def trainer_for(
    key: tuple[str, int, str],
    scenario: Scenario,
    data: NodeData,
    settings: DPSGDSettings,
    train: TrainSettings,
) -> PrivateTrainer:
    """Return the cached trainer of ``key``, building it (and attaching Opacus) on first use."""
    trainer = _TRAINERS.get(key)
    if trainer is None:
        # Trainers of an earlier run in this process are no longer needed.
        for stale in [cached for cached in _TRAINERS if cached[0] != key[0]]:
            del _TRAINERS[stale]
        with warnings.catch_warnings():
            # Opacus warns that secure_mode (torchcsprng) is off on every engine.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            trainer = PrivateTrainer(scenario, data, settings, train, key[1])
        _TRAINERS[key] = trainer
    return trainer


def node_state_dir(
    settings: DPSGDSettings, partition_id: int, node_state_dir: str | None = None
) -> Path:
    """Return the folder that contains a node's ledger.

    The node's own ``state-dir`` config wins; otherwise the run's
    ``settings.state_dir`` with one subfolder per partition.

    Raises
    ------
    ValueError
        If neither is set.
    """
    if node_state_dir:
        return Path(node_state_dir)
    if settings.state_dir:
        return Path(settings.state_dir) / str(partition_id)
    raise ValueError(
        "DP-SGD needs a folder for the node's privacy ledger; set the node config state-dir "
        "(flower-supernode --node-config 'state-dir=...') or run through fedseal-train, which sets privacy.state_dir"
    )


def train_private(
    privacy: dict[str, Any],
    scenario: Scenario,
    data: NodeData,
    partition_id: int,
    state: OrderedDict[str, torch.Tensor],
    train: TrainSettings,
    server_round: int,
    task_fingerprint: str = "",
    state_dir: str | None = None,
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
    """Train one round with DP-SGD after charging its steps to the node's ledger.

    Parameters
    ----------
    privacy : dict
        ``TaskSpec.privacy`` (``DPSGDSettings`` fields).
    scenario, data, partition_id
        The node's scenario, data and partition id.
    state : OrderedDict
        The global model of this round.
    train : TrainSettings
        Epochs, batch size, learning rate and the round's seed (for the loss's own sampling).
    server_round : int
        The round, recorded in the ledger.
    task_fingerprint : str
        Distinguishes cached trainers of different tasks with the same run key.
    state_dir : str, optional
        The node config's ``state-dir``.

    Returns
    -------
    tuple
        The new weights and the metrics to send: ``epsilon`` and ``delta``
        (spent so far, this round included), ``noise_multiplier``,
        ``dp_steps`` (steps so far) and ``dp_steps_round``. The training
        loss is only logged, because it is computed without noise.

    Raises
    ------
    PrivacyBudgetExhausted
        If this round would take the node's epsilon above its budget. Nothing is charged then.
    """
    settings = DPSGDSettings.from_dict(privacy)
    trainer = trainer_for(
        (settings.run_key, partition_id, task_fingerprint),
        scenario,
        data,
        settings,
        train,
    )
    ledger = PrivacyLedger(
        ledger_path(
            node_state_dir(settings, partition_id, state_dir), settings.run_key
        ),
        settings.accountant,
    )

    steps = trainer.steps_for(train.epochs)
    spent = ledger.epsilon(trainer.delta)
    projected = ledger.epsilon_after(
        trainer.noise_multiplier, trainer.sample_rate, steps, trainer.delta
    )
    if projected > settings.epsilon_budget * (1.0 + BUDGET_SLACK):
        raise PrivacyBudgetExhausted(
            partition_id, spent, projected, settings.epsilon_budget, trainer.delta
        )

    # Charge first: the privacy cost is spent once the data is used, even if this process dies mid-round.
    ledger.charge(server_round, trainer.noise_multiplier, trainer.sample_rate, steps)
    trainer.reseed(server_round)
    metrics = trainer.train_round(state, train.epochs, train.seed)
    if int(metrics["dp_steps_round"]) != steps:
        raise RuntimeError(
            f"node {partition_id} took {int(metrics['dp_steps_round'])} DP-SGD steps but charged {steps}"
        )

    # The loss and the empty-batch count are computed from private data without
    # noise, so they stay in the node's log and are not sent.
    logger.info(
        "Node %d round %d: train loss %.4f, %d empty batches; epsilon %.4f at delta %.3g after %d DP-SGD steps",
        partition_id,
        server_round,
        metrics["train_loss"],
        int(metrics["empty_batches"]),
        projected,
        trainer.delta,
        ledger.steps,
    )
    released = {
        "epsilon": projected,
        "delta": trainer.delta,
        "noise_multiplier": trainer.noise_multiplier,
        "dp_steps": float(ledger.steps),
        "dp_steps_round": float(steps),
    }
    return trainer.state_dict(), released

"""The outermost wrapper: model versions, per-round commits and resume.

``RunCheckpoint`` turns every global model the inner stack returns into a
version (file plus database row plus audit entry) and commits the run state
at the end of each round (``provenance.run_state``). A restarted run builds
the same stack with ``round_offset`` set to the last committed round, so
every layer below sees the true round numbers, and seeds derived from them
repeat exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.encrypted import state_hash
from provenance import run_state
from provenance.versions import VersionIndex, new_version
from server.model_store import write_batch
from strategies.dropouts import NO_REPLY_EVENT, find_dropouts
from strategies.he_fedavg import batch_digest

logger = logging.getLogger(__name__)


def stack_layers(strategy: Strategy) -> list[Strategy]:
    """Return the layers of a wrapper stack, outermost first."""
    layers = [strategy]
    while hasattr(layers[-1], "strategy"):
        layers.append(layers[-1].strategy)
    return layers


class RunCheckpoint(Strategy):
    """Version and commit the global model after each round; shift rounds on resume.

    Parameters
    ----------
    strategy : Strategy
        The rest of the stack.
    run_dir : Path
        The run folder (``state/`` and ``models/`` go inside).
    run_id : str
        Stable id of the run.
    versions : VersionIndex, optional
        Database index of model versions.
    audit : object, optional
        The run's audit log.
    round_offset : int
        Rounds already committed by an earlier process of this run.
    start_version : int
        Version number of the model this process starts from.
    """

    def __init__(
        self,
        strategy: Strategy,
        run_dir: Path,
        run_id: str,
        versions: VersionIndex | None = None,
        audit: Any = None,
        round_offset: int = 0,
        start_version: int = 0,
        start_hash: str = "",
    ) -> None:
        self.strategy = strategy
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.versions = versions
        self.audit = audit
        self.round_offset = round_offset
        self.version = start_version
        self.model_hash = start_hash
        self.model_file = ""
        # The messages of the current phase; the grid fills in their ids when it sends them.
        self._sent: dict[str, list[Message]] = {}
        (self.run_dir / "models").mkdir(parents=True, exist_ok=True)

    def summary(self) -> None:
        """Log the checkpoint settings, then the inner stack's."""
        logger.info("\t├──> RunCheckpoint: versions in %s, commit after every round, round offset %d", self.run_dir / "models", self.round_offset)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate with the true round number and audit which nodes were sampled."""
        true_round = server_round + self.round_offset
        messages = list(self.strategy.configure_train(true_round, arrays, config, grid))
        self._sent["train"] = messages
        if self.audit is not None:
            sampled = sorted(message.metadata.dst_node_id for message in messages)
            self.audit.append("round_start", round=true_round, sampled=sampled, base_version=self.version, base_hash=self.model_hash)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate, then store a promoted model as a new version."""
        true_round = server_round + self.round_offset
        replies = list(replies)
        self._record_dropouts("train", true_round, replies)
        arrays, metrics = self.strategy.aggregate_train(true_round, replies)
        encrypted = self._encrypted_layer()
        if encrypted is not None and encrypted.version_round == true_round:
            self._new_version(true_round, encrypted=True, batch=encrypted.drift)
        elif encrypted is None and arrays is not None:
            self._new_version(true_round, encrypted=False, state=arrays.to_torch_state_dict())
        elif self.audit is not None:
            self.audit.append("round_skipped", round=true_round, reason="no aggregate was promoted", version=self.version)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate with the true round number."""
        messages = list(self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        self._sent["evaluate"] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate, attach the metrics to the current version, then commit the round."""
        true_round = server_round + self.round_offset
        replies = list(replies)
        self._record_dropouts("evaluate", true_round, replies)
        metrics = self.strategy.aggregate_evaluate(true_round, replies)
        values = {key: float(value) for key, value in (metrics or {}).items()}
        if self.versions is not None and self.version > 0 and values:
            self.versions.set_metrics(self.run_id, self.version, values)
        if self.audit is not None:
            self.audit.append("evaluation", round=true_round, version=self.version, metrics={k: v for k, v in values.items() if v == v})
        self._commit(true_round)
        return metrics

    def _record_dropouts(self, phase: str, server_round: int, replies: list[Message]) -> None:
        """Log and audit each sampled node that sent no reply of its own in this phase."""
        for dropout in find_dropouts(self._sent.pop(phase, []), replies):
            logger.warning("Round %d %s: node %d did not reply (%s)", server_round, phase, dropout.node_id, dropout.reason)
            if self.audit is not None:
                self.audit.append(NO_REPLY_EVENT, round=server_round, phase=phase, node_id=dropout.node_id, reason=dropout.reason)

    # --- versions and commits -------------------------------------------------

    def _encrypted_layer(self) -> Any:
        for layer in stack_layers(self):
            if hasattr(layer, "drift") and hasattr(layer, "public_context"):
                return layer
        return None

    def _new_version(self, server_round: int, encrypted: bool, state: dict | None = None, batch: list[bytes] | None = None) -> None:
        parent = self.version
        self.version += 1
        if encrypted:
            path = self.run_dir / "models" / f"version_{self.version:04d}.ckks"
            write_batch(path, batch)
            self.model_hash = batch_digest(batch)
        else:
            path = self.run_dir / "models" / f"version_{self.version:04d}.pt"
            torch.save(state, path)
            self.model_hash = state_hash(state)
        self.model_file = path.name

        if self.versions is not None:
            self.versions.add(new_version(self.run_id, self.version, parent or None, server_round, self.model_hash, path, encrypted))
        if self.audit is not None:
            self.audit.append("version", round=server_round, version=self.version, parent=parent, model_hash=self.model_hash, file=f"models/{path.name}")
        logger.info("Round %d: global model version %d (%s)", server_round, self.version, self.model_hash[:16])

    def _commit(self, server_round: int) -> None:
        """Copy the current model into the state folder and commit the round atomically."""
        folder = run_state.state_dir(self.run_dir)
        source = self.run_dir / "models" / self.model_file if self.model_file else None
        target = f"global_{server_round:04d}{source.suffix if source else '.none'}"
        if source is not None:
            (folder / target).write_bytes(source.read_bytes())
        else:
            (folder / target).write_bytes(b"")

        if self.audit is not None and hasattr(self.audit, "sync"):
            self.audit.sync()
        state = run_state.RunState(
            run_id=self.run_id,
            server_round=server_round,
            version=self.version,
            model_hash=self.model_hash,
            model_file=target,
            strategy_state=self.collect_state(),
            random_state=run_state.capture_random_state(),
        )
        run_state.commit(self.run_dir, state)
        run_state.prune_models(self.run_dir, keep=target)

    def collect_state(self) -> dict[str, Any]:
        """Return ``state_dict()`` of every layer that has one, keyed by class name."""
        return {type(layer).__name__: layer.state_dict() for layer in stack_layers(self.strategy) if hasattr(layer, "state_dict")}

    def restore_state(self, saved: dict[str, Any]) -> None:
        """Give each layer back the state ``collect_state`` saved for it."""
        for layer in stack_layers(self.strategy):
            name = type(layer).__name__
            if name in saved and hasattr(layer, "load_state_dict"):
                layer.load_state_dict(saved[name])

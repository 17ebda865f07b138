"""FedAvg over CKKS-encrypted updates: the server sums what it cannot read.

The server holds only the public CKKS context (parameters, no keys). It keeps
the global model as the encrypted *drift* from the public initial model,
``Enc(global - initial)``, and adds each round's encrypted uploads to it. The
node side, including the exact weighting, is described in ``clients.encrypted``.

Rejected or missing updates count as zero: the round's step shrinks by their
weight share instead of being renormalized, because the server cannot divide
a ciphertext by a non-integer without key-switching material. With every
sampled update accepted, the result equals FedAvg's weighted mean.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from crypto import ckks

logger = logging.getLogger(__name__)

# Keys shared with the ClientApp (clients.app).
ENCRYPTION_KEY = "encryption"
DENOMINATOR_KEY = "he-denominator"
INITIAL_HASH_KEY = "he-initial-hash"
MODEL_RECORD = "he-model"
UPDATE_RECORD = "he-update"
BATCH_KEY = "batch"
SIZE_QUERY = f"{MessageType.QUERY}.size"


class AuditSink(Protocol):
    """Anything with ``append(event, **fields)``, such as ``provenance.audit.AuditLog``."""

    def append(self, event: str, **fields: object) -> object: ...


class VersionSink(Protocol):
    """Receives each new encrypted global model version."""

    def save(self, server_round: int, batch: list[bytes]) -> str: ...


def batch_digest(batch: list[bytes]) -> str:
    """Return the SHA-256 over a batch's elements, each prefixed with its length."""
    digest = hashlib.sha256()
    for part in batch:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


class EncryptedFedAvg(FedAvg):
    """FedAvg whose updates and global model stay CKKS ciphertexts on the server.

    Parameters
    ----------
    public_context : crypto.ckks.PublicContext
        The federation's public context. It cannot decrypt, by construction.
    num_parameters : int
        Length of the flattened model, which every batch must encrypt.
    initial_hash : str
        ``clients.encrypted.state_hash`` of the public initial model.
    task : ConfigRecord
        The records every node needs (the task spec), sent with each message.
    audit : AuditSink, optional
        Receives one entry per accepted or rejected update and per aggregate.
    versions : VersionSink, optional
        Stores each encrypted global version.
    **fedavg_kwargs
        Sampling settings passed to ``FedAvg``.
    """

    def __init__(
        self,
        public_context: ckks.PublicContext,
        num_parameters: int,
        initial_hash: str,
        task: ConfigRecord,
        audit: AuditSink | None = None,
        versions: VersionSink | None = None,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not isinstance(public_context, ckks.PublicContext):
            raise TypeError("EncryptedFedAvg takes a PublicContext; the server must never hold a secret key.")
        self.public_context = public_context
        self.num_parameters = num_parameters
        self.initial_hash = initial_hash
        self.task = task
        self.audit = audit
        self.versions = versions
        self.drift: list[bytes] | None = None
        self.version_round = 0
        self.node_sizes: dict[int, float] = {}

    def summary(self) -> None:
        """Log the encryption settings, then FedAvg's."""
        logger.info("\t├──> EncryptedFedAvg (CKKS):")
        logger.info("\t│\t├── preset: %s", self.public_context.preset.name)
        logger.info("\t│\t├── context fingerprint: %s", self.public_context.fingerprint)
        logger.info("\t│\t└── parameters per update: %d", self.num_parameters)
        super().summary()

    def state_dict(self) -> dict[str, int]:
        """Return the state to commit besides the drift (which is committed as the model file)."""
        return {"version_round": self.version_round}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what ``state_dict`` returned."""
        self.version_round = int(state["version_round"])

    def restore_drift(self, batch: list[bytes]) -> None:
        """Continue from a committed encrypted global model (after a restart), validating it first."""
        ckks.validate_batch(batch, self.public_context, self.num_parameters)
        self.drift = list(batch)

    # --- messages ------------------------------------------------------------

    def _model_content(self, config: ConfigRecord) -> RecordDict:
        config = ConfigRecord({**dict(self.task), **dict(config)})
        config[ENCRYPTION_KEY] = "ckks"
        config[INITIAL_HASH_KEY] = self.initial_hash
        content = RecordDict({self.configrecord_key: config})
        if self.drift is not None:
            content[MODEL_RECORD] = ConfigRecord({BATCH_KEY: list(self.drift), "round": self.version_round})
        return content

    def _messages(self, content: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
        return [Message(content=content, message_type=message_type, dst_node_id=node_id) for node_id in node_ids]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample nodes, learn their sizes, and send the encrypted global model with the weight denominator."""
        if self.fraction_train == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, connected = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        logger.info("configure_train: sampled %d nodes (out of %d)", len(node_ids), len(connected))

        self._learn_sizes(grid, node_ids)
        denominator = sum(self.node_sizes.get(node_id, 0.0) for node_id in node_ids)
        config["server-round"] = server_round
        config[DENOMINATOR_KEY] = float(denominator)

        logger.info("configure_train: weight denominator %.0f examples", denominator)
        return self._messages(self._model_content(config), node_ids, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the encrypted global model to the evaluating nodes."""
        if self.fraction_evaluate == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_evaluate)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_evaluate_nodes))
        config["server-round"] = server_round
        return self._messages(self._model_content(config), node_ids, MessageType.EVALUATE)

    def _learn_sizes(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes of unknown size for their training example count (once per node)."""
        unknown = [node_id for node_id in node_ids if node_id not in self.node_sizes]
        if not unknown:
            return
        content = RecordDict({self.configrecord_key: ConfigRecord(dict(self.task))})
        replies = grid.send_and_receive(self._messages(content, unknown, SIZE_QUERY), timeout=600)
        for reply in replies:
            if reply.has_error():
                logger.warning("size query: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            self.node_sizes[reply.metadata.src_node_id] = float(metrics["num-examples"])

    # --- aggregation ---------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and sum the encrypted uploads into the global drift; reject bad ones with a reason."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        candidates, batches = self._collect_batches(server_round, valid)
        if not batches:
            logger.warning("aggregate_train: round %d has no usable encrypted update; the global model stays", server_round)
            return None, None

        if self.drift is not None:
            batches = [list(self.drift), *batches]
        result = ckks.aggregate_batches(batches, self.public_context, self.num_parameters)
        offset = 0 if self.drift is None else 1
        if self.drift is not None and 0 in result.rejected:
            raise RuntimeError(f"The stored global model no longer validates: {result.rejected[0].reason}")

        accepted = []
        for position, message in enumerate(candidates):
            error = result.rejected.get(position + offset)
            self._record_update(server_round, message, batches[position + offset], error)
            if error is None:
                accepted.append(message)
        if not accepted:
            logger.warning("aggregate_train: every update of round %d was rejected; the global model stays", server_round)
            return None, None

        self.drift = result.batch
        self.version_round = server_round
        self._record_aggregate(server_round, len(accepted))
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        return ArrayRecord(), metrics

    def _collect_batches(self, server_round: int, replies: list[Message]) -> tuple[list[Message], list[list[bytes]]]:
        """Return replies that carry a batch and metrics, with their batches; reject the others."""
        candidates, batches = [], []
        for message in replies:
            content = message.content
            if UPDATE_RECORD not in content.config_records or not content.metric_records:
                self._reject(server_round, message, "reply has no encrypted update or no metrics")
                continue
            batch = content.config_records[UPDATE_RECORD].get(BATCH_KEY)
            if not isinstance(batch, list) or not batch or not all(isinstance(part, bytes) for part in batch):
                self._reject(server_round, message, "encrypted update is not a list of bytes")
                continue
            candidates.append(message)
            batches.append(batch)
        return candidates, batches

    def _record_update(self, server_round: int, message: Message, batch: list[bytes], error: ckks.CkksError | None) -> None:
        if error is not None:
            self._reject(server_round, message, f"{type(error).__name__}: {error.reason}", digest=batch_digest(batch))
            return
        if self.audit is not None:
            self.audit.append("update_accepted", round=server_round, node_id=message.metadata.src_node_id, partition=_partition(message), digest=batch_digest(batch))

    def _reject(self, server_round: int, message: Message, reason: str, digest: str | None = None) -> None:
        reject_update(self.audit, server_round, message, reason, digest)

    def _record_aggregate(self, server_round: int, accepted: int) -> None:
        record_aggregate(self.audit, self.versions, self.drift, server_round, accepted)


def reject_update(audit: AuditSink | None, server_round: int, message: Message, reason: str, digest: str | None = None, level: int = logging.WARNING) -> None:
    """Log and audit an encrypted update that the server leaves out of the sum."""
    node_id = message.metadata.src_node_id
    logger.log(level, "aggregate_train: rejected update of node %d (partition %s) in round %d: %s", node_id, _partition(message), server_round, reason)
    if audit is not None:
        audit.append("update_rejected", round=server_round, node_id=node_id, partition=_partition(message), reason=reason, digest=digest)


def record_aggregate(audit: AuditSink | None, versions: VersionSink | None, drift: list[bytes], server_round: int, accepted: int) -> None:
    """Store the new encrypted global model as a version, then log and audit it."""
    digest = batch_digest(drift)
    location = versions.save(server_round, drift) if versions is not None else None
    logger.info("aggregate_train: round %d summed %d encrypted updates, global version %s", server_round, accepted, digest[:16])
    if audit is not None:
        audit.append("aggregate", round=server_round, accepted=accepted, version=server_round, model_hash=digest, location=location)


def _partition(message: Message) -> int | None:
    records = message.content.config_records if message.has_content() else {}
    return int(records["node"]["partition-id"]) if "node" in records else None

"""Robust aggregation on CKKS-encrypted updates: score with a committee, sum what was scored.

The server has only the public scoring context (``crypto.ckks.scoring``).
Each round:

1. Training nodes reply with their unweighted update encrypted for scoring
   (``clients.robust``). Malformed, foreign-key, wrong-length and
   byte-identical duplicate uploads are rejected with a logged and audited
   reason. Two identical ciphertexts differ by exactly zero, which SEAL
   cannot represent, so their distance could not be computed.
2. The server computes the statistics the rule needs (squared norms always,
   pairwise squared distances for Krum and Multi-Krum, inner products with
   the validator's encrypted reference for trust) and a committee drawn from
   the round's training nodes decrypts them (``strategies.encrypted_scoring``).
3. The rule (``strategies.encrypted_rules``) turns the decrypted scalars into
   one plaintext weight per update. The server multiplies each scored
   ciphertext by its weight, sums and adds the result to the encrypted
   global drift (``crypto.ckks.scoring.aggregate``). What is scored is what
   is summed.

The trust rule requests the reference from the validator node. The validator
has the root rows and the scoring key, is never sampled for training,
and its reply is never aggregated. With signature checks on, the reply must
pass ``SignatureVerification.check_reference`` (``reference_verifier``)
before the server scores with it. A reply that fails it, or no reply at all,
skips the round: the global model stays and ``he_robust_round_skipped``
records why.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from clients import robust as node_keys
from crypto.ckks.errors import CkksError
from crypto.ckks.scoring import ScoringPublicContext, ScoringUpdate
from crypto.ckks.scoring.aggregate import EncryptedDrift, weighted_sum
from strategies import encrypted_rules
from strategies.encrypted_scoring import (
    CommitteeDecryptor,
    CommitteeError,
    build_round_requests,
    decrypt_scores,
    select_committee,
)
from strategies.he_fedavg import (
    BATCH_KEY,
    ENCRYPTION_KEY,
    INITIAL_HASH_KEY,
    MODEL_RECORD,
    SIZE_QUERY,
    UPDATE_RECORD,
    AuditSink,
    VersionSink,
    batch_digest,
    record_aggregate,
    reject_update,
)
from strategies.recording import partition_of
from strategies.reputation import ReputationBook
from strategies.updates import report_event

logger = logging.getLogger(__name__)

PHASE = "he_robust"


@dataclass(frozen=True)
class CommitteeSettings:
    """Settings of the committee that decrypts the round's statistics.

    Parameters
    ----------
    size : int, default 3
        Members drawn per round from the round's training nodes that replied.
    max_faulty : int, default 1
        f, the members that may lie or fail; needs ``size >= 2f + 1``.
    seed : int, default 0
        Seed of the per-round draw.
    timeout : float, default 600.0
        Seconds to wait for the members' replies.
    partitions : tuple of int, optional
        A fixed committee, by partition id, in place of the per-round draw
        (``size`` is then its length). Every member must train in each
        round, because a member decrypts only for rounds it has seen.
    """

    size: int = 3
    max_faulty: int = 1
    seed: int = 0
    timeout: float = 600.0
    partitions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_faulty < 0 or self.size < 2 * self.max_faulty + 1:
            raise ValueError(
                f"Invalid setting strategy.committee_size={self.size} with strategy.max_faulty={self.max_faulty}: "
                f"a median outvotes f faulty members only with at least 2f+1 = {2 * self.max_faulty + 1} members. "
                "Raise strategy.committee_size or lower strategy.max_faulty."
            )


@dataclass(frozen=True)
class RuleSettings:
    """Settings of the robust rule that turns the statistics into weights.

    Parameters
    ----------
    rule : str
        ``norm_bound``, ``krum``, ``multikrum`` or ``trust``.
    norm_multiple : float, default 3.0
        norm_bound: largest accepted norm as a multiple of the round's median.
    norm_mode : str, default "reject"
        norm_bound: ``reject`` or ``scale`` updates above the limit.
    num_malicious : int, default 0
        krum, multikrum: f.
    num_selected : int or None, default None
        multikrum: updates averaged per round; None selects n - f. Krum selects 1.
    """

    rule: str
    norm_multiple: float = 3.0
    norm_mode: str = "reject"
    num_malicious: int = 0
    num_selected: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in encrypted_rules.RULES:
            raise ValueError(f"Invalid setting strategy.rule={self.rule!r}: use one of {', '.join(encrypted_rules.RULES)}.")
        if self.norm_mode not in encrypted_rules.NORM_MODES:
            raise ValueError(f"Invalid setting strategy.norm_mode={self.norm_mode!r}: use one of {', '.join(encrypted_rules.NORM_MODES)}.")
        if not self.norm_multiple > 0:
            raise ValueError(f"Invalid setting strategy.norm_multiple={self.norm_multiple}: it must be > 0.")

    def to_select(self, num_updates: int) -> int:
        """Return how many updates Krum or Multi-Krum selects from `num_updates`."""
        if self.rule == "krum":
            return 1
        return min(num_updates, self.num_selected or max(1, num_updates - self.num_malicious))


class EncryptedRobust(FedAvg):
    """Robust aggregation (norm bound, Krum, Multi-Krum, FLTrust) over updates the server cannot read.

    Parameters
    ----------
    public_context : ScoringPublicContext
        The federation's public scoring context; it has no decryptor.
    num_parameters : int
        Length of the flattened model.
    initial_hash : str
        ``clients.encrypted.state_hash`` of the public initial model.
    task : ConfigRecord
        The task spec record sent with every message.
    rule : RuleSettings
        The robust rule and its settings.
    committee : CommitteeSettings, optional
        Committee size, tolerated faulty members, seed and timeout.
    reputation : ReputationBook, optional
        Trust rule: reputation and quarantine state (it may come from a checkpoint).
    audit : AuditSink, optional
        Receives accepted, rejected and aggregate entries, and every rule decision.
    versions : VersionSink, optional
        Stores each encrypted global version.
    reference_verifier : object, optional
        Trust rule: checks the validator's signed reply before it is used
        (``check_reference(server_round, request, reply)`` returning a verdict
        whose ``reason`` is None when accepted). None uses the reply unchecked,
        as when ``provenance.signatures`` is false.
    sink : object, optional
        The run log (``record_event``), for ``metrics.jsonl`` phase ``he_robust``.
    **fedavg_kwargs
        Sampling and metric settings passed to ``FedAvg``.
    """

    def __init__(
        self,
        public_context: ScoringPublicContext,
        num_parameters: int,
        initial_hash: str,
        task: ConfigRecord,
        rule: RuleSettings,
        committee: CommitteeSettings | None = None,
        reputation: ReputationBook | None = None,
        audit: AuditSink | None = None,
        versions: VersionSink | None = None,
        sink: Any = None,
        reference_verifier: Any = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not isinstance(public_context, ScoringPublicContext):
            raise TypeError(f"EncryptedRobust takes a ScoringPublicContext, got {type(public_context).__name__}; the server must never hold a secret key.")
        self.public_context = public_context
        self.num_parameters = num_parameters
        self.initial_hash = initial_hash
        self.task = task
        self.rule = rule
        self.committee = committee or CommitteeSettings()
        self.reputation = reputation
        if reputation is None and rule.rule == "trust":
            self.reputation = ReputationBook()
        self.audit = audit
        self.versions = versions
        self.sink = sink
        self.reference_verifier = reference_verifier
        self.drift: list[bytes] | None = None
        self.version_round = 0
        self.node_sizes: dict[int, float] = {}
        self.partitions: dict[int, int] = {}
        self.validators: set[int] = set()
        self._grid: Grid | None = None

    # --- settings and state ---------------------------------------------------

    def summary(self) -> None:
        """Log the rule, committee and key settings, then FedAvg's."""
        logger.info("\t├──> EncryptedRobust (CKKS scoring):")
        logger.info("\t│\t├── rule: %s", self.rule)
        logger.info("\t│\t├── committee: %s", self.committee)
        logger.info("\t│\t├── preset: %s, fingerprint %s", self.public_context.preset.name, self.public_context.fingerprint)
        logger.info("\t│\t└── parameters per update: %d", self.num_parameters)
        super().summary()

    @property
    def encryption_fields(self) -> dict[str, str]:
        """Config entries that tell a node how to decrypt the model (also used by canary queries)."""
        return {ENCRYPTION_KEY: "ckks", node_keys.SCHEME_KEY: node_keys.SCHEME_SCORING, INITIAL_HASH_KEY: self.initial_hash}

    @property
    def excluded_node_ids(self) -> set[int]:
        """Nodes that must not train, evaluate or act as canaries: the validators."""
        return set(self.validators)

    def state_dict(self) -> dict[str, Any]:
        """Return the state to commit besides the drift, which is committed as the model file."""
        return {"version_round": self.version_round, "reputation": self.reputation.state_dict() if self.reputation is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.version_round = int(state["version_round"])
        if self.reputation is not None and state.get("reputation") is not None:
            self.reputation.load_state_dict(state["reputation"])

    def restore_drift(self, batch: list[bytes]) -> None:
        """Continue from a committed encrypted global model after a restart, checking it first."""
        if len(batch) != 1:
            raise ValueError(f"A committed scoring drift is one serialized blob, got {len(batch)} parts.")
        EncryptedDrift.from_bytes(self.public_context, batch[0], self.num_parameters)
        self.drift = list(batch)

    # --- messages ---------------------------------------------------------------

    def _content(self, config: ConfigRecord) -> RecordDict:
        config = ConfigRecord({**dict(self.task), **dict(config), **self.encryption_fields})
        content = RecordDict({self.configrecord_key: config})
        if self.drift is not None:
            content[MODEL_RECORD] = ConfigRecord({BATCH_KEY: list(self.drift), "round": self.version_round})
        return content

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Learn the nodes' roles, release due quarantines, sample training nodes and send the encrypted drift."""
        self._grid = grid
        if self.fraction_train == 0.0:
            return []
        training = self._training_nodes(grid)
        if self.reputation is not None:
            for partition_id in self.reputation.release_due(server_round):
                logger.info("configure_train: round %d, partition %d released from quarantine, on probation", server_round, partition_id)
                self._report(server_round, "released", partition_id)
            quarantined = [n for n in training if self.reputation.is_quarantined(self.partitions.get(n, -1), server_round)]
            if quarantined:
                logger.info("configure_train: round %d, nodes %s are quarantined and not sampled", server_round, quarantined)
            training = [n for n in training if n not in quarantined]

        count = min(len(training), max(int(len(training) * self.fraction_train), self.min_train_nodes))
        node_ids = sorted(random.sample(training, count))
        logger.info("configure_train: round %d, sampled %d of %d training nodes", server_round, len(node_ids), len(training))
        config["server-round"] = server_round
        content = self._content(config)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id) for node_id in node_ids]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the encrypted drift to the evaluating training nodes (never the validator)."""
        if self.fraction_evaluate == 0.0:
            return []
        training = self._training_nodes(grid)
        count = min(len(training), max(int(len(training) * self.fraction_evaluate), self.min_evaluate_nodes))
        config["server-round"] = server_round
        content = self._content(config)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id) for node_id in sorted(random.sample(training, count))]

    def _training_nodes(self, grid: Grid) -> list[int]:
        """Wait for the federation, learn unknown nodes' roles and return the training node ids."""
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)
        unknown = [node_id for node_id in connected if node_id not in self.partitions]
        if unknown:
            content = RecordDict({self.configrecord_key: ConfigRecord(dict(self.task))})
            messages = [Message(content=content, message_type=SIZE_QUERY, dst_node_id=node_id) for node_id in unknown]
            for reply in grid.send_and_receive(messages, timeout=self.committee.timeout):
                node_id = reply.metadata.src_node_id
                if reply.has_error():
                    logger.warning("size query: node %d failed: %s", node_id, reply.error.reason)
                    continue
                metrics = next(iter(reply.content.metric_records.values()))
                self.node_sizes[node_id] = float(metrics["num-examples"])
                self.partitions[node_id] = int(metrics.get("partition-id", -1))
                if float(metrics.get(node_keys.VALIDATOR_METRIC, 0.0)) > 0:
                    self.validators.add(node_id)
                    logger.info("size query: node %d is the validator (partition %d)", node_id, self.partitions[node_id])
        return sorted(node_id for node_id in connected if node_id in self.partitions and node_id not in self.validators)

    # --- aggregation ----------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Load and check the uploads, score them through the committee, apply the rule and sum the selected ones."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        candidates, updates = self._load_updates(server_round, valid)
        if not updates:
            logger.warning("aggregate_train: round %d has no usable encrypted update; the global model stays", server_round)
            self._report(server_round, "round_skipped", None, reason="no usable encrypted update")
            return None, None

        examples = np.array([_examples(message, self.weighted_by_key) for message in candidates])
        try:
            decision = self._decide(server_round, candidates, updates, examples)
        except (CommitteeError, ValueError, CkksError) as error:
            logger.warning("aggregate_train: round %d could not be scored (%s); the global model stays", server_round, error)
            self._report(server_round, "round_skipped", None, reason=str(error))
            return None, None

        self._record_decision(server_round, candidates, decision)
        selected = decision.selected
        metrics = self.train_metrics_aggr_fn([candidates[i].content for i in selected] or [m.content for m in candidates], self.weighted_by_key)
        if not selected:
            logger.warning("aggregate_train: round %d, the rule selected no update; the global model stays", server_round)
            self._report(server_round, "round_skipped", None, reason=f"rule {self.rule.rule} selected no update")
            return None, metrics

        previous = EncryptedDrift.from_bytes(self.public_context, self.drift[0], self.num_parameters) if self.drift else None
        total = weighted_sum(self.public_context, [updates[i] for i in selected], [float(decision.weights[i]) for i in selected], previous)
        self.drift = [total.serialize()]
        self.version_round = server_round
        self._record_aggregate(server_round, len(selected))
        return ArrayRecord(), metrics

    def _load_updates(self, server_round: int, replies: list[Message]) -> tuple[list[Message], list[ScoringUpdate]]:
        """Return replies with a loadable, unique upload and the uploads; reject the others with a reason."""
        candidates, updates = [], []
        seen: dict[str, int] = {}
        for message in replies:
            node_id = message.metadata.src_node_id
            if node_id in self.validators:
                self._reject(server_round, message, "the validator's reply is never aggregated")
                continue
            content = message.content
            if UPDATE_RECORD not in content.config_records or not content.metric_records:
                self._reject(server_round, message, "reply has no encrypted update or no metrics")
                continue
            batch = content.config_records[UPDATE_RECORD].get(BATCH_KEY)
            if not isinstance(batch, list) or len(batch) != 1 or not isinstance(batch[0], bytes):
                self._reject(server_round, message, "encrypted update is not a list of exactly one bytes value")
                continue
            digest = hashlib.sha256(batch[0]).hexdigest()
            if digest in seen:
                self._reject(server_round, message, f"byte-identical duplicate of node {seen[digest]}'s upload", digest=batch_digest(batch))
                continue
            try:
                update = ScoringUpdate.from_bytes(self.public_context, batch[0], self.num_parameters)
            except CkksError as error:
                self._reject(server_round, message, f"{type(error).__name__}: {error}", digest=batch_digest(batch))
                continue
            seen[digest] = node_id
            candidates.append(message)
            updates.append(update)
        return candidates, updates

    def _committee(self, server_round: int, candidates: list[Message]) -> list[int]:
        """Return the Flower node ids of this round's committee: the fixed partitions, or a seeded draw.

        Raises
        ------
        CommitteeError
            If a fixed member sent no usable update this round, so it has not seen the round.
        """
        node_ids = [m.metadata.src_node_id for m in candidates]
        if self.committee.partitions is None:
            return select_committee(node_ids, min(self.committee.size, len(candidates)), server_round, seed=self.committee.seed)

        by_partition = {partition_of(m): m.metadata.src_node_id for m in candidates}
        missing = sorted(set(self.committee.partitions) - set(by_partition))
        if missing:
            raise CommitteeError(f"committee members {missing} (partition ids) sent no usable update in round {server_round}, so they cannot decrypt for it")
        return [by_partition[partition] for partition in self.committee.partitions]

    def _decide(self, server_round: int, candidates: list[Message], updates: list[ScoringUpdate], examples: np.ndarray) -> encrypted_rules.RuleDecision:
        """Compute, decrypt through the committee, and apply the rule."""
        rule = self.rule
        reference, reference_norm = self._reference(server_round, examples) if rule.rule == "trust" else (None, 0.0)
        requests = build_round_requests(self.public_context, updates, reference, distances=rule.rule in ("krum", "multikrum"))

        members = self._committee(server_round, candidates)
        decryptor = CommitteeDecryptor(self._grid, size=len(members), max_faulty=self.committee.max_faulty, timeout=self.committee.timeout, members=members, task=self.task)
        scores = decrypt_scores(decryptor, server_round, len(updates), requests)
        self._report(server_round, "committee", None, members=members, scalars=len(requests))

        if rule.rule == "norm_bound":
            return encrypted_rules.norm_bound_rule(scores.squared_norms, examples, rule.norm_multiple, rule.norm_mode)
        if rule.rule in ("krum", "multikrum"):
            if len(updates) <= 2 * rule.num_malicious + 2:
                logger.warning("aggregate_train: round %d, %d updates <= 2f+2 = %d; Krum's guarantee does not hold this round", server_round, len(updates), 2 * rule.num_malicious + 2)
            return encrypted_rules.krum_rule(scores.squared_distances, examples, rule.num_malicious, rule.to_select(len(updates)))

        decision = encrypted_rules.trust_rule(scores.inner_products, scores.squared_norms, reference_norm)
        self._record_reputation(server_round, candidates, decision)
        return decision

    def _reference(self, server_round: int, examples: np.ndarray) -> tuple[ScoringUpdate, float]:
        """Request this round's encrypted reference from the validator; return it with its reported norm.

        Raises
        ------
        ValueError
            If there is no validator, or its reply is an error or malformed.
        """
        if not self.validators or self._grid is None:
            raise ValueError("strategy.rule=trust needs a validator node (partition id = nodes), and none is connected")
        validator = min(self.validators)
        config = ConfigRecord({"server-round": server_round, node_keys.ROLE_KEY: node_keys.ROLE_VALIDATOR, node_keys.NODE_EXAMPLES_KEY: [float(e) for e in examples]})
        message = Message(content=self._content(config), message_type=MessageType.TRAIN, dst_node_id=validator)
        replies = list(self._grid.send_and_receive([message], timeout=self.committee.timeout))
        if not replies or replies[0].has_error():
            reason = replies[0].error.reason if replies else "no reply"
            raise ValueError(f"validator node {validator} did not send a reference: {reason}")

        self._verify_reference(server_round, validator, message, replies[0])
        content = replies[0].content
        try:
            # The norm comes from the signed upload, not from the unsigned metrics.
            data, norm = node_keys.parse_reference_batch(list(content.config_records[UPDATE_RECORD][BATCH_KEY]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"validator node {validator} sent a malformed reference reply: {error}") from error
        reference = ScoringUpdate.from_bytes(self.public_context, bytes(data), self.num_parameters)
        logger.info("aggregate_train: round %d, validator node %d sent a reference of norm %.6g", server_round, validator, norm)
        self._report(server_round, "reference", None, node_id=validator, reference_norm=norm, digest=hashlib.sha256(bytes(data)).hexdigest())
        return reference, norm

    def _verify_reference(self, server_round: int, validator: int, request: Message, reply: Message) -> None:
        """Raise ValueError unless the reply names the validator's partition and, with signatures on, its signature passes."""
        claimed = partition_of(reply)
        expected = self.partitions.get(validator)
        if claimed != expected:
            reason = f"its reply names partition {claimed}, but the node reported partition {expected}"
            logger.warning("aggregate_train: round %d, rejected the reference of validator node %d: %s", server_round, validator, reason)
            if self.audit is not None:
                self.audit.append("reference_rejected", round=server_round, node_id=validator, partition=claimed, reason=reason)
            raise ValueError(f"validator node {validator}'s reference was rejected: {reason}")
        if self.reference_verifier is None:
            return
        # The verifier logs and audits its verdict itself.
        verdict = self.reference_verifier.check_reference(server_round, request, reply)
        if verdict.reason is not None:
            raise ValueError(f"validator node {validator}'s reference was rejected: {verdict.reason}")

    # --- records ----------------------------------------------------------------

    def _record_reputation(self, server_round: int, candidates: list[Message], decision: encrypted_rules.RuleDecision) -> None:
        by_partition = {partition_of(m): decision.details[i]["trust"] for i, m in enumerate(candidates) if partition_of(m) is not None}
        for partition_id in self.reputation.record_round(by_partition, server_round):
            until = self.reputation.standings[partition_id].quarantined_until
            logger.warning("aggregate_train: round %d, partition %d quarantined through round %d", server_round, partition_id, until)
            self._report(server_round, "quarantined", partition_id, until_round=until, reputation=self.reputation.reputation(partition_id))

    def _record_decision(self, server_round: int, candidates: list[Message], decision: encrypted_rules.RuleDecision) -> None:
        """Log, report and audit each update's figures and whether the rule kept it."""
        for i, message in enumerate(candidates):
            node_id, partition_id = message.metadata.src_node_id, partition_of(message)
            details = dict(decision.details.get(i, {}))
            if self.reputation is not None and partition_id is not None:
                details["reputation"] = self.reputation.reputation(partition_id)
            weight = float(decision.weights[i])
            logger.info("aggregate_train: round %d, node %d (partition %s) %s, multiplier %.6g, %s", server_round, node_id, partition_id, self.rule.rule, weight, _format(details))
            self._report(server_round, "score", partition_id, node_id=node_id, rule=self.rule.rule, multiplier=weight, **details)

            digest = batch_digest(message.content.config_records[UPDATE_RECORD][BATCH_KEY])
            if i in decision.reasons or weight == 0.0:
                reason = decision.reasons.get(i, "weight 0")
                # Krum leaves out honest updates every round by design, so those lines are not warnings.
                level = logging.INFO if self.rule.rule in ("krum", "multikrum") else logging.WARNING
                self._reject(server_round, message, f"rejected by rule {self.rule.rule}: {reason}", digest=digest, level=level)
            elif self.audit is not None:
                self.audit.append("update_accepted", round=server_round, node_id=node_id, partition=partition_id, digest=digest, multiplier=weight)

    def _reject(self, server_round: int, message: Message, reason: str, digest: str | None = None, level: int = logging.WARNING) -> None:
        reject_update(self.audit, server_round, message, reason, digest, level)

    def _record_aggregate(self, server_round: int, accepted: int) -> None:
        record_aggregate(self.audit, self.versions, self.drift, server_round, accepted)

    def _report(self, server_round: int, event: str, partition_id: int | None, **fields: Any) -> None:
        report_event(self.sink, None, PHASE, server_round, event, node=partition_id, **fields)
        if self.audit is not None:
            self.audit.append(f"{PHASE}_{event}", round=server_round, node=partition_id, **fields)


def _examples(message: Message, key: str) -> float:
    return float(next(iter(message.content.metric_records.values()))[key])


def _format(details: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.6g}" for key, value in details.items())

"""Check every training reply's signature against the node registry before aggregation.

``SignatureVerification`` wraps the rest of the stack (encryption, validation)
so no other wrapper receives an update whose origin is unproven. For each reply it
recomputes the digest that the node must have signed, from the server's own
run id, round and base version hash and from the payload actually received
(see ``clients.signing``). When the run's grid is an ``ArrivalHashingGrid``,
the payload hash was computed as the reply arrived; otherwise it is
computed here. Then it checks the node's Ed25519 signature with
the key in the registry. A reply is rejected, the round going on without it, when:

- it carries no signature (or a malformed one),
- its node is unknown to the registry, revoked or quarantined,
- the signature does not verify with the node's registered key,
- it was signed for another run or round (a replay),
- it was computed from another base version than the server sent, or
- its payload changed after signing.

Audit entries (``provenance.audit``): ``node_key`` for every registered node
at run start, ``update_accepted`` and ``update_rejected`` per reply, each with
``check: "signature"``. The ``he_robust`` trust validator's reference reply
goes through the same checks in ``check_reference``, which also requires a
key registered with the organisation ``validator``, and is audited as
``reference_accepted`` or ``reference_rejected``. As in the other entries of the log, ``partition`` is
the node id of the registry and ``node_id`` Flower's transport id. Accepted
entries store everything needed to re-verify them from the log alone
(``verify_audit_signatures``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.signing import base_version_hash
from crypto import signing
from provenance.registry import ACTIVE, DEFAULT_FILENAME, VALIDATOR_ORGANISATION, NodeInfo, NodeRegistry, sqlite_url
from scenarios.spec import TaskSpec
from strategies.arrival_hashing import ArrivalHashingGrid, PayloadHash, hash_reply_payload, timed_payload_hashes
from strategies.recording import partition_of

logger = logging.getLogger(__name__)

CHECK = "signature"
# Phase of the run-log lines with the server-side seconds of these checks.
COST_PHASE = "provenance"
# Audit subjects: a training update, or the trust validator's encrypted reference.
UPDATE = "update"
REFERENCE = "reference"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one reply's signature check; ``reason`` is None when accepted."""

    partition: int | None
    reason: str | None
    digest: str | None = None
    payload_hash: str | None = None
    base_hash: str | None = None
    signature: str | None = None


class SignatureVerification(Strategy):
    """Wrap ``strategy``: aggregate only training replies with a valid signature.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy stack.
    registry : NodeRegistry
        Public keys and status of the nodes; re-read once per round, so a
        revocation takes effect from the next round's aggregation on.
    audit : object
        The run's audit log (``append(event, **fields)``).
    run_id : str
        This run's id, which nodes receive in the task and sign.
    sink : object, optional
        The run log (``record_event``); when given, each round's server-side
        seconds of hashing, signature checks, audit entries and registry
        access go to it as a ``provenance`` line.
    """

    def __init__(self, strategy: Strategy, registry: NodeRegistry, audit: Any, run_id: str, sink: Any = None) -> None:
        self.strategy = strategy
        self.registry = registry
        self.audit = audit
        self.run_id = run_id
        self.sink = sink
        self._configure_s = 0.0
        # The grid that hashes replies as they arrive, when the run uses one.
        self._arrivals: ArrivalHashingGrid | None = None
        # Flower node id -> hash of the model version sent to it this round.
        self._base_hashes: dict[int, str] = {}
        self._public_keys: dict[str, Ed25519PublicKey] = {}

    def __repr__(self) -> str:
        return f"SignatureVerification({self.strategy!r})"

    def summary(self) -> None:
        """Log this wrapper's settings, then the inner strategy's."""
        logger.info("\t├──> SignatureVerification: Ed25519 signatures checked against %s", self.registry.url)
        logger.info("\t│\t└── run id: %s", self.run_id)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate, then remember the hash of the model version each message carries."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        started = time.perf_counter()
        self._arrivals = grid if isinstance(grid, ArrivalHashingGrid) else None

        # Messages usually share one content object, so hash each content once.
        hashes: dict[int, str] = {}
        self._base_hashes = {}
        for message in messages:
            key = id(message.content)
            if key not in hashes:
                hashes[key] = base_version_hash(message.content)
            self._base_hashes[message.metadata.dst_node_id] = hashes[key]
        self._configure_s = time.perf_counter() - started
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop replies that fail the signature check, then aggregate the rest with the inner strategy.

        Error replies pass through untouched so the inner strategy reports them.
        """
        started = time.perf_counter()
        replies = list(replies)
        nodes = {node.node_id: node for node in self.registry.list_nodes()}
        hashing = time.perf_counter()
        payloads, hashes = self._payload_hashes(replies)
        hashes.update(wait_s=time.perf_counter() - hashing)
        forwarded: list[Message] = []
        accepted: list[int] = []
        rejected: list[int | None] = []

        for reply, payload in zip(replies, payloads):
            if reply.has_error():
                forwarded.append(reply)
                continue
            verdict = self.check_reply(server_round, reply, nodes, payload)
            self._record(server_round, reply, verdict)
            if verdict.reason is None:
                forwarded.append(reply)
                accepted.append(verdict.partition)
            else:
                rejected.append(verdict.partition)

        # Unknown ids have no row to count in.
        # NOTE: "accepted" counts passing this check only; a layer inside may still reject the update.
        self.registry.record_contributions(accepted, [node for node in rejected if node in nodes])
        logger.info("aggregate_train: round %d, %d replies passed the signature check, %d were rejected", server_round, len(accepted), len(rejected))
        self._report_cost(server_round, started, hashes)
        return self.strategy.aggregate_train(server_round, forwarded)

    def _payload_hashes(self, replies: list[Message]) -> tuple[list[PayloadHash], dict[str, float]]:
        """Return each reply's payload hash, taking those the grid started on arrival and computing the rest.

        The dict counts the update replies hashed on arrival (``prehashed``, error replies left out) and the
        hashing CPU seconds summed over all replies and threads (``busy_s``),
        including hashing that ran while the server still waited.
        """
        prehashed = [self._arrivals.take(reply) if self._arrivals is not None else None for reply in replies]
        missing = [reply for reply, result in zip(replies, prehashed) if result is None]
        computed = iter(timed_payload_hashes(missing))
        results = [result if result is not None else next(computed) for result in prehashed]
        arrived = sum(result is not None and not reply.has_error() for reply, result in zip(replies, prehashed))
        stats = {"prehashed": float(arrived), "busy_s": sum(seconds for _, seconds in results)}
        return [payload for payload, _ in results], stats

    def _report_cost(self, server_round: int, started: float, hashes: dict[str, float]) -> None:
        """Send this round's server-side seconds to the sink as one ``provenance`` line.

        ``server_s`` is what provenance adds to the round on the server: the
        base hashes of ``configure_train`` plus everything ``aggregate_train``
        does before the inner strategy. Of it, ``payload_hash_s`` is the wait
        for payload hashes (those still running, and those not hashed on
        arrival), and ``checks_s`` the signature checks, audit entries and
        registry access. ``payload_hash_busy_s`` is the CPU time of all payload
        hashing, including what overlapped the wait for replies.
        """
        if self.sink is None or not hasattr(self.sink, "record_event"):
            return
        finished = time.perf_counter()
        self.sink.record_event(
            COST_PHASE,
            server_round,
            "train",
            server_s=round(self._configure_s + finished - started, 5),
            base_hash_s=round(self._configure_s, 5),
            payload_hash_s=round(hashes["wait_s"], 5),
            checks_s=round(finished - started - hashes["wait_s"], 5),
            payload_hash_busy_s=round(hashes["busy_s"], 5),
            prehashed=int(hashes["prehashed"]),
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Pass through to the inner strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pass through to the inner strategy (evaluation replies carry no update)."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    # --- checks --------------------------------------------------------------

    def check_reply(self, server_round: int, reply: Message, nodes: dict[int, NodeInfo], payload: PayloadHash = None) -> Verdict:
        """Return whether ``reply`` carries a valid signature for this run and round, and why not.

        ``payload`` is the reply's ``payload_hash`` (or the ValueError it
        raised) when already computed; None computes it here.
        """
        try:
            partition = partition_of(reply)
        except (KeyError, TypeError, ValueError):
            partition = None
        if partition is None:
            return Verdict(None, "the reply names no node (no 'node' record with an integer partition id)")

        record = reply.content.config_records.get(signing.SIGNATURE_RECORD)
        if record is None:
            return Verdict(partition, "unsigned reply: it has no 'signature' record")
        signature = record.get(signing.SIGNATURE_KEY)
        claimed = record.get(signing.DIGEST_KEY)
        if not isinstance(signature, bytes) or len(signature) != signing.SIGNATURE_SIZE or not _is_sha256_hex(claimed):
            return Verdict(partition, "unsigned reply: the 'signature' record lacks a 64-byte signature or a 64-hex digest", digest=_text(claimed))

        node = nodes.get(partition)
        if node is None:
            return Verdict(partition, f"unknown node {partition}: it is not in the node registry", digest=claimed)
        if node.status != ACTIVE:
            return Verdict(partition, f"node {partition} is {node.status} in the node registry", digest=claimed)
        public_key = self._public_key(node.public_key)
        if public_key is None:
            return Verdict(partition, f"node {partition}'s registered key is not a valid Ed25519 public key; re-register the node", digest=claimed)
        if not signing.verify_digest(public_key, bytes.fromhex(claimed), signature):
            return Verdict(partition, f"bad signature: it does not verify with node {partition}'s registered key", digest=claimed)

        if payload is None:
            arrived = self._arrivals.take(reply) if self._arrivals is not None else None
            payload = arrived[0] if arrived is not None else hash_reply_payload(reply)
        return self._check_digest(server_round, reply, partition, claimed, record, signature, payload)

    def _check_digest(self, server_round: int, reply: Message, partition: int, claimed: str, record: ConfigRecord, signature: bytes, payload: str | ValueError) -> Verdict:
        """Compare the signed digest with the one recomputed from what the server sent and received."""
        base = self._base_hashes.get(reply.metadata.src_node_id)
        if base is None:
            return Verdict(partition, f"no train message was sent to Flower node {reply.metadata.src_node_id} in round {server_round}", digest=claimed)
        if isinstance(payload, ValueError):
            return Verdict(partition, f"unreadable payload: {payload}", digest=claimed)

        expected = signing.update_digest(self.run_id, server_round, partition, base, payload).hex()
        if expected == claimed:
            return Verdict(partition, None, digest=claimed, payload_hash=payload, base_hash=base, signature=signature.hex())
        reason = _mismatch_reason(record, claimed, self.run_id, server_round, partition, base, payload)
        return Verdict(partition, reason, digest=claimed, payload_hash=payload, base_hash=base)

    def check_reference(self, server_round: int, request: Message, reply: Message) -> Verdict:
        """Check the trust validator's reference reply as a training reply is checked; log, audit and return the verdict.

        ``request`` is the train message the validator received, whose model is
        the base version it signed. Besides ``check_reply``'s checks, the
        signing key must be registered with the organisation ``validator``, so
        a training site's key cannot sign a reference.
        """
        self._base_hashes[request.metadata.dst_node_id] = base_version_hash(request.content)
        nodes = {node.node_id: node for node in self.registry.list_nodes()}
        verdict = self.check_reply(server_round, reply, nodes)
        node = nodes.get(verdict.partition) if verdict.partition is not None else None
        if verdict.reason is None and node is not None and node.organisation != VALIDATOR_ORGANISATION:
            reason = f"node {verdict.partition} is registered for organisation {node.organisation!r}, not {VALIDATOR_ORGANISATION!r}, so it may not sign a reference"
            verdict = Verdict(verdict.partition, reason, digest=verdict.digest)

        self._record(server_round, reply, verdict, subject=REFERENCE)
        if node is not None and verdict.reason is None:
            self.registry.record_contributions(accepted=[verdict.partition])
        elif node is not None:
            self.registry.record_contributions(rejected=[verdict.partition])
        return verdict

    def _public_key(self, key_hex: str) -> Ed25519PublicKey | None:
        if key_hex not in self._public_keys:
            try:
                self._public_keys[key_hex] = signing.load_public_key(key_hex)
            except ValueError:
                return None
        return self._public_keys[key_hex]

    def _record(self, server_round: int, reply: Message, verdict: Verdict, subject: str = UPDATE) -> None:
        """Log and audit one verdict on an ``update`` or a ``reference``."""
        node_id = reply.metadata.src_node_id
        if verdict.reason is None:
            self.audit.append(
                f"{subject}_accepted",
                check=CHECK,
                round=server_round,
                run_id=self.run_id,
                node_id=node_id,
                partition=verdict.partition,
                digest=verdict.digest,
                payload_hash=verdict.payload_hash,
                base_hash=verdict.base_hash,
                signature=verdict.signature,
            )
            return

        logger.warning("aggregate_train: rejected %s of node %s (Flower node %d) in round %d: %s", subject, verdict.partition, node_id, server_round, verdict.reason)
        self.audit.append(f"{subject}_rejected", check=CHECK, round=server_round, run_id=self.run_id, node_id=node_id, partition=verdict.partition, reason=verdict.reason, digest=verdict.digest)


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(character in "0123456789abcdef" for character in value)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _mismatch_reason(record: ConfigRecord, claimed: str, run_id: str, server_round: int, partition: int, base: str, payload: str) -> str:
    """Name the field that makes a validly signed digest differ from the expected one.

    The fields a node sends beside its digest are trusted only after they
    reproduce the signed digest.
    """
    signed_run = record.get(signing.RUN_ID_KEY)
    signed_round = record.get(signing.ROUND_KEY)
    signed_base = record.get(signing.BASE_HASH_KEY)
    signed_payload = record.get(signing.PAYLOAD_HASH_KEY)
    try:
        explained = signing.update_digest(signed_run, signed_round, partition, signed_base, signed_payload).hex() == claimed
    except ValueError:
        explained = False
    if not explained:
        return "the signed digest does not match this run, round, node, base version and payload"

    if signed_run != run_id:
        return f"replay from another run: signed for run {signed_run}, this run is {run_id}"
    if signed_round != server_round:
        return f"replay from round {signed_round}: signed for round {signed_round}, this is round {server_round}"
    if signed_base != base:
        return f"computed from the wrong base version: signed for base {signed_base[:16]}..., the server sent {base[:16]}..."
    return f"payload altered after signing: the received payload hashes to {payload[:16]}..., the signed one to {signed_payload[:16]}..."


# --- run setup -----------------------------------------------------------------


def registry_url(provenance_cfg: Any, run_dir: Path) -> str:
    """Return the registry URL: ``registry_url``, else SQLite beside the keys, else in the run folder.

    ``fedseal keys init --out DIR --nodes N`` writes its default registry to
    ``DIR/registry.sqlite``, so ``keys_dir=DIR`` alone finds it.
    """
    if provenance_cfg.get("registry_url"):
        return str(provenance_cfg.registry_url)
    if provenance_cfg.get("keys_dir"):
        return sqlite_url(Path(str(provenance_cfg.keys_dir)) / DEFAULT_FILENAME)
    return sqlite_url(Path(run_dir) / DEFAULT_FILENAME)


def signatures_enabled(cfg: Any) -> bool:
    """Return the ``provenance.signatures`` setting (False when the block is absent)."""
    provenance_cfg = cfg.get("provenance") if hasattr(cfg, "get") else None
    return bool(provenance_cfg is not None and provenance_cfg.get("signatures", False))


def setup_signatures(cfg: Any, spec: TaskSpec, resources: Any, run_dir: Path) -> TaskSpec:
    """Open the node registry, log its keys, and return ``spec`` with the run's provenance settings.

    Does nothing and returns ``spec`` when ``provenance.signatures`` is false.
    Otherwise it takes the run id from ``resources.run_id`` (a new uuid4 hex
    when empty), appends one ``node_key`` audit entry per registered node,
    and puts ``registry`` and ``run_id`` into ``resources.extra`` for
    ``SignatureVerification``.

    Raises
    ------
    provenance.registry.RegistryError
        If the registry cannot be opened.
    ValueError
        If the registry has no active node, because every update would be rejected.
    """
    if not signatures_enabled(cfg):
        return spec

    url = registry_url(cfg.provenance, run_dir)
    registry = NodeRegistry(url)
    nodes = registry.list_nodes()
    if not any(node.status == ACTIVE for node in nodes):
        registry.close()
        raise ValueError(
            f"provenance.signatures is true but the node registry {registry.url} has no active node, so every update "
            "would be rejected. Run `fedseal keys init --out DIR --nodes N` and pass provenance.keys_dir=DIR "
            "(or provenance.registry_url=URL), or set provenance.signatures=false."
        )

    _check_validator_key(cfg, nodes, registry)

    # A resumed run keeps its id; its rounds keep counting, so replays stay detectable.
    run_id = getattr(resources, "run_id", "") or uuid.uuid4().hex
    for node in nodes:
        resources.audit.append("node_key", run_id=run_id, partition=node.node_id, public_key=node.public_key, status=node.status, organisation=node.organisation)
    resources.extra["registry"] = registry
    resources.extra["run_id"] = run_id
    logger.info("Signature checks on: run id %s, %d registered nodes in %s", run_id, len(nodes), registry.url)

    keys_dir = cfg.provenance.get("keys_dir")
    return replace(spec, provenance={"run_id": run_id, "keys_dir": str(keys_dir) if keys_dir else None})


def _check_validator_key(cfg: Any, nodes: list[NodeInfo], registry: NodeRegistry) -> None:
    """Reject a trust run whose registry has no validator key, since every reference would be rejected.

    Raises
    ------
    ValueError
        If ``strategy=he_robust strategy.rule=trust`` and node ``nodes`` is not
        registered with the organisation ``validator``.
    """
    from server.config import uses_validator

    if cfg.get("strategy") is None or not uses_validator(cfg):
        return
    validator_id = int(cfg.nodes)
    entry = next((node for node in nodes if node.node_id == validator_id), None)
    if entry is None or entry.organisation != VALIDATOR_ORGANISATION:
        registry.close()
        found = "is not registered" if entry is None else f"is registered for organisation {entry.organisation!r}"
        raise ValueError(
            f"strategy.rule=trust needs the validator's signing key as node {validator_id} in {registry.url}, but node {validator_id} {found}. "
            f"Run `fedseal keys init --out DIR --nodes {validator_id} --validator` and pass provenance.keys_dir=DIR, or set provenance.signatures=false."
        )


def wrap_with_signatures(strategy: Strategy, resources: Any, sink: Any = None) -> SignatureVerification:
    """Return ``strategy`` inside a ``SignatureVerification`` set up by ``setup_signatures``; ``sink`` receives its costs.

    Raises
    ------
    ValueError
        If ``resources`` contains no registry or run id.
    """
    extra = getattr(resources, "extra", None) or {}
    if "registry" not in extra or "run_id" not in extra:
        raise ValueError("provenance.signatures is true but no node registry was opened; call setup_signatures before build_strategy.")
    return SignatureVerification(strategy, extra["registry"], resources.audit, extra["run_id"], sink=sink)


# --- audit log re-verification ---------------------------------------------------


@dataclass(frozen=True)
class SignatureAuditResult:
    """Outcome of ``verify_audit_signatures``; ``bad_line`` is 1-based and None when ``ok``."""

    ok: bool
    checked: int
    bad_line: int | None = None
    reason: str | None = None


def verify_audit_signatures(path: Path) -> SignatureAuditResult:
    """Re-check every signed ``update_accepted`` and ``reference_accepted`` entry of an audit log against its ``node_key`` entries.

    Each entry's digest is recomputed from its run id, round, node, base hash
    and payload hash, and its signature verified with the public key of the
    latest preceding ``node_key`` entry for that node and run. Run
    ``provenance.audit.verify_chain`` first: this check trusts the lines'
    order and content.
    """
    keys: dict[tuple[str, int], dict[str, Any]] = {}
    checked = 0
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            return SignatureAuditResult(False, checked, number, f"not valid JSON ({error.msg})")

        if entry.get("event") == "node_key":
            keys[(str(entry.get("run_id")), entry.get("partition"))] = entry
        elif entry.get("event") in (f"{UPDATE}_accepted", f"{REFERENCE}_accepted") and entry.get("check") == CHECK:
            problem = _audit_entry_problem(entry, keys)
            if problem:
                return SignatureAuditResult(False, checked, number, problem)
            checked += 1
    return SignatureAuditResult(True, checked)


def _audit_entry_problem(entry: dict[str, Any], keys: dict[tuple[str, int], dict[str, Any]]) -> str | None:
    """Return why one accepted-update entry does not verify, or None."""
    node = entry.get("partition")
    key_entry = keys.get((str(entry.get("run_id")), node))
    if key_entry is None:
        return f"node {node} has no node_key entry for run {entry.get('run_id')} before this line"
    if key_entry.get("status") != ACTIVE:
        return f"node {node} was {key_entry.get('status')} at run start, but its update was accepted"

    try:
        digest = signing.update_digest(entry.get("run_id"), entry.get("round"), node, entry.get("base_hash"), entry.get("payload_hash"))
        signature = bytes.fromhex(str(entry.get("signature")))
        public_key = signing.load_public_key(str(key_entry.get("public_key")))
    except (TypeError, ValueError) as error:
        return f"the entry's signature fields are malformed ({error})"

    if digest.hex() != entry.get("digest"):
        return "the stored digest does not match the entry's run id, round, node, base hash and payload hash"
    if not signing.verify_digest(public_key, digest, signature):
        return f"the signature does not verify with node {node}'s public key"
    return None

"""The trust validator's signed reference: accepted with a valid validator signature, else the round is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from clients import robust as node_keys
from clients.signing import SIGNING_KEY_CONFIG, sign_train_reply
from crypto import signing
from crypto.ckks import scoring
from provenance.audit import AuditLog, verify_chain
from provenance.registry import VALIDATOR_ORGANISATION, NodeRegistry, sqlite_url
from server.keys import init_signing_keys
from strategies.he_fedavg import BATCH_KEY, UPDATE_RECORD
from strategies.he_robust import RuleSettings
from strategies.signatures import SignatureVerification, verify_audit_signatures
from tests.test_he_robust import (
    LENGTH,
    NODE_IDS,
    VALIDATOR,
    Audit,
    FederationGrid,
    _metadata,
    make_strategy,
    replies_for,
    run_round,
)

RUN_ID = "run-signed-reference"
VALIDATOR_PARTITION = len(NODE_IDS)


class ValidatorGrid(FederationGrid):
    """A grid whose validator signs its reference with the node-side ``sign_train_reply``.

    ``signing_key`` None sends an unsigned reply; ``partition`` is the
    partition id the reply names; ``replay`` resends the first reply in every
    later round.
    """

    def __init__(self, *args, signing_key: Path | None, partition: int = VALIDATOR_PARTITION, replay: bool = False, forged_norm: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.signing_key = signing_key
        self.partition = partition
        self.replay = replay
        self.forged_norm = forged_norm
        self.first_reply: Message | None = None

    def _deliver(self, message: Message) -> Message:
        if message.metadata.message_type != "train" or message.metadata.dst_node_id != VALIDATOR:
            return super()._deliver(message)
        incoming = make_message(metadata=_metadata(0, VALIDATOR, "train"), content=message.content)
        if self.replay and self.first_reply is not None:
            return Message(content=self.first_reply.content, reply_to=incoming)

        data = scoring.encrypt_for_scoring(self.secret, self.reference)
        content = RecordDict(
            {
                "metrics": MetricRecord({node_keys.REFERENCE_NORM_KEY: float(np.linalg.norm(self.reference))}),
                UPDATE_RECORD: ConfigRecord({BATCH_KEY: node_keys.reference_batch(data, float(np.linalg.norm(self.reference)))}),
                "node": ConfigRecord({"partition-id": self.partition}),
            }
        )
        if self.signing_key is not None:
            server_round = int(message.content["config"]["server-round"])
            sign_train_reply(content, message.content, {SIGNING_KEY_CONFIG: str(self.signing_key)}, {"run_id": RUN_ID}, self.partition, server_round)
        if self.forged_norm is not None:
            # Changed in transit, after the validator signed.
            content[UPDATE_RECORD][BATCH_KEY] = node_keys.reference_batch(data, self.forged_norm)
        reply = Message(content=content, reply_to=incoming)
        self.first_reply = self.first_reply or reply
        return reply


@pytest.fixture(scope="module")
def secret() -> scoring.ScoringSecretContext:
    return scoring.generate_scoring_context()


@pytest.fixture(scope="module")
def public(secret) -> scoring.ScoringPublicContext:
    return scoring.ScoringPublicContext.from_bytes(secret.public.serialize())


@pytest.fixture(scope="module")
def key_dir(secret, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scoring-keys")
    scoring.write_scoring_secret_context(secret, folder)
    return folder


@pytest.fixture(scope="module")
def updates() -> np.ndarray:
    rng = np.random.default_rng(8)
    direction = rng.normal(0.0, 0.02, LENGTH)
    return np.stack([direction + rng.normal(0.0, 0.01, LENGTH) for _ in NODE_IDS])


@pytest.fixture(scope="module")
def uploads(secret, updates) -> list[bytes]:
    return [scoring.encrypt_for_scoring(secret, row) for row in updates]


@pytest.fixture()
def registry(tmp_path: Path):
    """A registry with the training nodes and the validator, as `fedseal keys init --nodes 6 --validator` writes it."""
    init_signing_keys(tmp_path / "keys", len(NODE_IDS), sqlite_url(tmp_path / "registry.sqlite"), validator=True)
    opened = NodeRegistry(sqlite_url(tmp_path / "registry.sqlite"))
    yield opened
    opened.close()


def _key(tmp_path: Path, node_id: int) -> Path:
    return signing.node_key_dir(tmp_path / "keys" / signing.SIGNING_DIR, node_id) / signing.PRIVATE_KEY_FILENAME


def _setup(public, registry, audit):
    strategy = make_strategy(public, RuleSettings(rule="trust"), audit=audit)
    strategy.partitions[VALIDATOR] = VALIDATOR_PARTITION
    verifier = SignatureVerification(strategy, registry, audit, RUN_ID)
    strategy.reference_verifier = verifier
    return strategy


def _grid(key_dir, tmp_path, secret, updates, **kwargs) -> ValidatorGrid:
    return ValidatorGrid(key_dir, tmp_path / "node-state", secret, reference=updates.mean(axis=0), **kwargs)


def test_validator_key_registered_as_validator(registry) -> None:
    entry = registry.get(VALIDATOR_PARTITION)

    assert entry is not None
    assert entry.organisation == VALIDATOR_ORGANISATION
    assert registry.get(0).organisation == "site-0"


def test_signed_reference_is_used_and_reverifies(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    # Prepare
    audit = AuditLog(tmp_path / "audit.jsonl")
    for node in registry.list_nodes():
        audit.append("node_key", run_id=RUN_ID, partition=node.node_id, public_key=node.public_key, status=node.status, organisation=node.organisation)
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, VALIDATOR_PARTITION))

    # Execute
    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    # Assert
    assert arrays is not None
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    accepted = [entry for entry in entries if entry["event"] == "reference_accepted"]
    assert len(accepted) == 1
    assert accepted[0]["partition"] == VALIDATOR_PARTITION
    assert accepted[0]["check"] == "signature"
    assert any(entry["event"] == "he_robust_reference" for entry in entries)
    assert verify_chain(tmp_path / "audit.jsonl").ok
    result = verify_audit_signatures(tmp_path / "audit.jsonl")
    assert result.ok, result.reason
    assert result.checked == 1
    assert registry.get(VALIDATOR_PARTITION).accepted == 1


def _assert_round_skipped(strategy, audit: Audit, arrays, expected_reason: str) -> None:
    assert arrays is None
    assert strategy.drift is None
    rejected = audit.events("reference_rejected")
    assert len(rejected) == 1
    assert expected_reason in rejected[0]["reason"]
    skipped = audit.events("he_robust_round_skipped")
    assert len(skipped) == 1
    assert expected_reason in skipped[0]["reason"]
    assert not audit.events("he_robust_reference")


def test_unsigned_reference_skips_round(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    audit = Audit()
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=None)

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, "unsigned reply")
    assert registry.get(VALIDATOR_PARTITION).rejected == 1


def test_bad_signature_skips_round(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    audit = Audit()
    strategy = _setup(public, registry, audit)
    # Signed with training node 0's key while naming the validator's partition.
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, 0))

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, "bad signature")


def test_unknown_validator_skips_round(public, secret, key_dir, tmp_path, updates, uploads) -> None:
    # A registry made without --validator, and a reply signed with a key that no registry entry contains.
    init_signing_keys(tmp_path / "keys", len(NODE_IDS), sqlite_url(tmp_path / "registry.sqlite"))
    key = signing.generate_private_key()
    signing.save_key_pair(key, tmp_path / "stray")
    registry = NodeRegistry(sqlite_url(tmp_path / "registry.sqlite"))
    audit = Audit()
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=tmp_path / "stray" / signing.PRIVATE_KEY_FILENAME)

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, f"unknown node {VALIDATOR_PARTITION}")
    registry.close()


def test_revoked_validator_skips_round(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    registry.revoke(VALIDATOR_PARTITION)
    audit = Audit()
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, VALIDATOR_PARTITION))

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, f"node {VALIDATOR_PARTITION} is revoked")


def test_replayed_reference_skips_round(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    audit = Audit()
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, VALIDATOR_PARTITION), replay=True)
    first, _ = run_round(strategy, grid, 1, replies_for(uploads))
    drift_after_round_1 = list(strategy.drift)

    second, _ = run_round(strategy, grid, 2, replies_for(uploads))

    assert first is not None
    assert second is None
    assert strategy.drift == drift_after_round_1
    rejected = audit.events("reference_rejected")
    assert len(rejected) == 1
    assert rejected[0]["round"] == 2
    assert "replay from round 1" in rejected[0]["reason"]
    skipped = audit.events("he_robust_round_skipped")
    assert [entry["round"] for entry in skipped] == [2]


def test_training_site_key_cannot_sign_reference(public, secret, key_dir, tmp_path, updates, uploads) -> None:
    # Node 6 registered as an ordinary site, as `fedseal keys init --nodes 7` would do.
    init_signing_keys(tmp_path / "keys", len(NODE_IDS) + 1, sqlite_url(tmp_path / "registry.sqlite"))
    registry = NodeRegistry(sqlite_url(tmp_path / "registry.sqlite"))
    audit = Audit()
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, VALIDATOR_PARTITION))

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, f"not '{VALIDATOR_ORGANISATION}'")
    registry.close()


def test_reference_naming_other_partition_skips_round(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    audit = Audit()
    strategy = _setup(public, registry, audit)
    # A valid signature by node 0 does not make node 0's reply a reference.
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, 0), partition=0)

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, f"names partition 0, but the node reported partition {VALIDATOR_PARTITION}")


def _trust_cfg(tmp_path: Path):
    from omegaconf import OmegaConf

    registry_url = sqlite_url(tmp_path / "registry.sqlite")
    return OmegaConf.create({"nodes": len(NODE_IDS), "strategy": {"name": "he_robust", "rule": "trust"}, "provenance": {"signatures": True, "registry_url": registry_url, "keys_dir": None}})


def test_trust_run_needs_validator_key(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord as Config

    from scenarios.spec import TaskSpec
    from strategies.factory import RunResources
    from strategies.signatures import setup_signatures

    init_signing_keys(tmp_path / "keys", len(NODE_IDS), sqlite_url(tmp_path / "registry.sqlite"))
    resources = RunResources(task=Config({}), run_dir=tmp_path, audit=Audit())

    with pytest.raises(ValueError, match=f"node {VALIDATOR_PARTITION} is not registered.*--validator"):
        setup_signatures(_trust_cfg(tmp_path), TaskSpec(scenario="fraud"), resources, tmp_path)


def test_trust_run_accepts_validator_key(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord as Config

    from scenarios.spec import TaskSpec
    from strategies.factory import RunResources
    from strategies.signatures import setup_signatures

    init_signing_keys(tmp_path / "keys", len(NODE_IDS), sqlite_url(tmp_path / "registry.sqlite"), validator=True)
    audit = Audit()
    resources = RunResources(task=Config({}), run_dir=tmp_path, audit=audit)

    spec = setup_signatures(_trust_cfg(tmp_path), TaskSpec(scenario="fraud"), resources, tmp_path)

    assert spec.provenance["run_id"]
    organisations = {entry["partition"]: entry["organisation"] for entry in audit.events("node_key")}
    assert organisations[VALIDATOR_PARTITION] == VALIDATOR_ORGANISATION
    resources.extra["registry"].close()


def test_keys_init_validator_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from server.cli import main

    code = main(["keys", "init", "--out", str(tmp_path / "keys"), "--scoring", "--nodes", "2", "--validator", "--tls"])

    assert code == 0
    assert _key(tmp_path, 2).exists()
    assert (tmp_path / "keys" / "auth" / "node-2" / "auth.key").exists()
    registry = NodeRegistry(sqlite_url(tmp_path / "keys" / "registry.sqlite"))
    assert registry.get(2).organisation == VALIDATOR_ORGANISATION
    assert registry.get(3) is None
    registry.close()
    assert "node 2 is the he_robust trust validator" in capsys.readouterr().out


def test_keys_init_validator_needs_nodes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from server.cli import main

    code = main(["keys", "init", "--out", str(tmp_path / "keys"), "--validator"])

    assert code == 2
    assert "--validator needs --nodes N" in capsys.readouterr().err
    assert not (tmp_path / "keys").exists()


def test_norm_changed_after_signing_skips_round(public, secret, key_dir, tmp_path, updates, uploads, registry) -> None:
    audit = Audit()
    strategy = _setup(public, registry, audit)
    grid = _grid(key_dir, tmp_path, secret, updates, signing_key=_key(tmp_path, VALIDATOR_PARTITION), forged_norm=1e-3)

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    _assert_round_skipped(strategy, audit, arrays, "payload altered after signing")


@pytest.mark.parametrize(
    "batch, message",
    [
        ([b"ct"], "must be \\[encrypted reference, 8-byte norm\\]"),
        ([b"ct", b"1234"], "has 4 bytes, not 8"),
        ([b"ct", node_keys.reference_batch(b"", -1.0)[1]], "not a finite positive number"),
    ],
)
def test_malformed_reference_batch(batch, message) -> None:
    with pytest.raises(ValueError, match=message):
        node_keys.parse_reference_batch(batch)


def test_reference_batch_round_trip() -> None:
    assert node_keys.parse_reference_batch(node_keys.reference_batch(b"ct", 2.5)) == (b"ct", 2.5)


def test_keys_init_adds_validator_to_existing_folder(tmp_path: Path) -> None:
    from server.cli import main

    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out), "--scoring", "--nodes", "3"]) == 0
    site_key = (out / "signing" / "node-0" / "signing.key").read_bytes()
    scoring_key = (out / "node" / scoring.SCORING_SECRET_CONTEXT_FILENAME).read_bytes()

    assert main(["keys", "init", "--out", str(out), "--nodes", "3", "--validator"]) == 0

    assert (out / "signing" / "node-0" / "signing.key").read_bytes() == site_key
    assert (out / "node" / scoring.SCORING_SECRET_CONTEXT_FILENAME).read_bytes() == scoring_key
    registry = NodeRegistry(sqlite_url(out / "registry.sqlite"))
    try:
        labels = {node.node_id: node.organisation for node in registry.list_nodes()}
    finally:
        registry.close()
    assert labels == {0: "site-0", 1: "site-1", 2: "site-2", 3: "validator"}

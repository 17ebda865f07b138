"""he_robust on real scoring ciphertexts: rules against their plaintext twins, committee and rejections."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

from clients import app as client_app
from clients import committee
from clients import robust as node_keys
from crypto.ckks import scoring
from crypto.ckks.scoring.aggregate import EncryptedDrift, decrypt_drift
from strategies.encrypted_rules import krum_rule, norm_bound_rule, trust_rule
from strategies.encrypted_scoring import select_committee
from strategies.he_fedavg import BATCH_KEY, UPDATE_RECORD
from strategies.he_robust import CommitteeSettings, EncryptedRobust, RuleSettings
from strategies.robust import centred_squared_distances, multikrum_selection
from strategies.trust import trust_aggregate, trust_scores

LENGTH = 4500
NODE_IDS = [21, 22, 23, 24, 25, 26]
VALIDATOR = 99


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict]] = []

    def append(self, event: str, **fields) -> None:
        self.entries.append((event, fields))

    def events(self, name: str) -> list[dict]:
        return [fields for event, fields in self.entries if event == name]


class FederationGrid:
    """A Grid whose committee members run the real ClientApp scoring handler in this process.

    The validator replies to a train message with ``reference`` encrypted under
    the scoring key. ``decryptions`` counts every scalar decryption by the
    node that ran it; ``None`` would mean the server process decrypted.
    """

    def __init__(self, key_dir: Path, state_root: Path, secret, reference=None, liars=()) -> None:
        self.key_dir = key_dir
        self.state_root = state_root
        self.secret = secret
        self.reference = reference
        self.liars = set(liars)
        self.current_node: int | None = None
        self.decryptions: Counter = Counter()
        self.replies: dict[int, list[Message]] = {}

    def get_node_ids(self):
        return [*NODE_IDS, VALIDATOR]

    def node_config(self, node_id: int) -> dict:
        return {"state-dir": str(self.state_root / str(node_id)), "ckks-secret-dir": str(self.key_dir), "num-partitions": len(NODE_IDS)}

    def see_round(self, server_round: int) -> None:
        """Record the round as seen on every node, as their train handlers do."""
        for node_id in NODE_IDS:
            committee.record_seen_round(Path(self.node_config(node_id)["state-dir"]), 1, server_round)

    def send_and_receive(self, messages, timeout=None):
        return [self._deliver(message) for message in messages]

    def _deliver(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        incoming = make_message(metadata=_metadata(0, node_id, message.metadata.message_type), content=message.content)
        if message.metadata.message_type == "train" and node_id == VALIDATOR:
            data = scoring.encrypt_for_scoring(self.secret, self.reference)
            metrics = MetricRecord({node_keys.REFERENCE_NORM_KEY: float(np.linalg.norm(self.reference))})
            return Message(content=RecordDict({"metrics": metrics, UPDATE_RECORD: ConfigRecord({BATCH_KEY: node_keys.reference_batch(data, float(np.linalg.norm(self.reference)))})}), reply_to=incoming)

        context = Context(run_id=1, node_id=node_id, node_config=self.node_config(node_id), state=RecordDict(), run_config={})
        self.current_node = node_id
        try:
            reply = client_app.scoring(incoming, context)
        finally:
            self.current_node = None
        self.replies.setdefault(node_id, []).append(reply)
        if node_id in self.liars and not reply.has_error():
            record = reply.content[committee.RECORD_KEY]
            lies = ConfigRecord({"labels": list(record["labels"]), "values": [10 * v + 5 for v in record["values"]]})
            reply = Message(content=RecordDict({committee.RECORD_KEY: lies}), reply_to=incoming)
        return reply


def _metadata(src: int, dst: int, message_type: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m-{src}-{dst}-{time.monotonic_ns()}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )


def train_reply(node_id: int, partition: int, data: bytes, examples: float) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": examples, "train_loss": 0.1}),
            UPDATE_RECORD: ConfigRecord({BATCH_KEY: [data]}),
            "node": ConfigRecord({"partition-id": partition}),
        }
    )
    return make_message(metadata=_metadata(node_id, 0, "train"), content=content)


@pytest.fixture(scope="module")
def secret() -> scoring.ScoringSecretContext:
    return scoring.generate_scoring_context()


@pytest.fixture(scope="module")
def public(secret) -> scoring.ScoringPublicContext:
    return scoring.ScoringPublicContext.from_bytes(secret.public.serialize())


@pytest.fixture(scope="module")
def key_dir(secret, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    scoring.write_scoring_secret_context(secret, folder)
    return folder


@pytest.fixture(scope="module")
def updates() -> np.ndarray:
    rng = np.random.default_rng(3)
    direction = rng.normal(0.0, 0.02, LENGTH)
    rows = [direction + rng.normal(0.0, 0.01, LENGTH) for _ in NODE_IDS]
    rows[1] = -4.0 * direction  # sign flip
    rows[4] = 12.0 * rows[4]  # scaled
    return np.stack(rows)


@pytest.fixture(scope="module")
def uploads(secret, updates) -> list[bytes]:
    return [scoring.encrypt_for_scoring(secret, row) for row in updates]


EXAMPLES = np.array([100.0, 120.0, 80.0, 150.0, 90.0, 110.0])


def make_strategy(public, rule: RuleSettings, audit=None, size: int = 3, faulty: int = 1) -> EncryptedRobust:
    strategy = EncryptedRobust(
        public_context=public,
        num_parameters=LENGTH,
        initial_hash="0" * 64,
        task=ConfigRecord({}),
        rule=rule,
        committee=CommitteeSettings(size=size, max_faulty=faulty, seed=7),
        audit=audit,
        min_available_nodes=len(NODE_IDS),
    )
    strategy.partitions = {node_id: i for i, node_id in enumerate(NODE_IDS)}
    strategy.validators = {VALIDATOR}
    return strategy


def replies_for(uploads) -> list[Message]:
    return [train_reply(node_id, i, data, EXAMPLES[i]) for i, (node_id, data) in enumerate(zip(NODE_IDS, uploads))]


def run_round(strategy, grid, server_round, replies):
    strategy._grid = grid
    grid.see_round(server_round)
    return strategy.aggregate_train(server_round, replies)


def decrypted_drift(secret, strategy) -> np.ndarray:
    return decrypt_drift(secret, EncryptedDrift.from_bytes(secret, strategy.drift[0], LENGTH))


@pytest.mark.parametrize("rule, selected", [("krum", 1), ("multikrum", 3)])
def test_krum_selection_matches_plaintext(public, secret, key_dir, tmp_path, updates, uploads, rule, selected) -> None:
    # Prepare
    strategy = make_strategy(public, RuleSettings(rule=rule, num_malicious=1, num_selected=selected if rule == "multikrum" else None))
    grid = FederationGrid(key_dir, tmp_path, secret)

    # Execute
    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    # Assert
    expected = multikrum_selection(centred_squared_distances(updates), 1, selected)
    weights = EXAMPLES[expected] / EXAMPLES[expected].sum()
    assert arrays is not None
    assert np.max(np.abs(decrypted_drift(secret, strategy) - weights @ updates[expected])) <= 1e-6
    decision = krum_rule(centred_squared_distances(updates), EXAMPLES, 1, selected)
    assert sorted(decision.selected) == sorted(expected)
    assert 1 not in expected
    assert 4 not in expected


def test_trust_matches_plaintext(public, secret, key_dir, tmp_path, updates, uploads) -> None:
    rng = np.random.default_rng(5)
    reference = updates[0] * 0.5 + rng.normal(0.0, 0.01, LENGTH)
    audit = Audit()
    strategy = make_strategy(public, RuleSettings(rule="trust"), audit=audit)
    grid = FederationGrid(key_dir, tmp_path, secret, reference=reference)

    run_round(strategy, grid, 1, replies_for(uploads))

    scores = trust_scores(updates, reference)
    decision = trust_rule(updates @ reference, np.einsum("ij,ij->i", updates, updates), float(np.linalg.norm(reference)))
    assert np.max(np.abs(decision.details[0]["trust"] - scores[0])) <= 1e-12
    recorded = {fields["node"]: fields for fields in audit.events("he_robust_score")}
    for i in range(len(NODE_IDS)):
        assert abs(recorded[i]["trust"] - scores[i]) <= 1e-6
        assert abs(recorded[i]["weight"] - scores[i] / scores.sum()) <= 1e-6
    expected = trust_aggregate(updates, reference, scores)
    assert np.max(np.abs(decrypted_drift(secret, strategy) - expected)) <= 1e-5
    assert scores[1] == 0.0
    assert any("rejected by rule trust" in fields["reason"] for fields in audit.events("update_rejected"))


def test_norm_bound_rejects_scaled_update(public, secret, key_dir, tmp_path, updates, uploads) -> None:
    audit = Audit()
    strategy = make_strategy(public, RuleSettings(rule="norm_bound", norm_multiple=5.0), audit=audit)
    grid = FederationGrid(key_dir, tmp_path, secret)

    run_round(strategy, grid, 1, replies_for(uploads))

    rejected = audit.events("update_rejected")
    assert [fields["partition"] for fields in rejected] == [4]
    assert "exceeds 5 x the round's median norm" in rejected[0]["reason"]
    keep = [i for i in range(len(NODE_IDS)) if i != 4]
    expected = (EXAMPLES[keep] / EXAMPLES[keep].sum()) @ updates[keep]
    assert np.max(np.abs(decrypted_drift(secret, strategy) - expected)) <= 1e-6


def test_norm_bound_scale_mode() -> None:
    squared = np.array([1.0, 1.0, 1.0, 100.0])
    decision = norm_bound_rule(squared, np.ones(4), multiple=2.0, mode="scale")
    assert decision.selected == [0, 1, 2, 3]
    assert decision.weights[3] == pytest.approx(0.25 * 2.0 / 10.0)


def test_no_decryption_on_server(public, secret, key_dir, tmp_path, updates, uploads, monkeypatch) -> None:
    liar = select_committee(NODE_IDS, 3, 1, seed=7)[0]
    grid = FederationGrid(key_dir, tmp_path, secret, liars=[liar])
    original = committee.decrypt_scalar

    def counting(context, scalar, **kwargs):
        grid.decryptions[grid.current_node] += 1
        return original(context, scalar, **kwargs)

    monkeypatch.setattr(committee, "decrypt_scalar", counting)
    strategy = make_strategy(public, RuleSettings(rule="multikrum", num_malicious=1, num_selected=3), size=3)

    run_round(strategy, grid, 1, replies_for(uploads))
    members = sorted(node for node in grid.decryptions)

    # Only the server's public context exists on the server side.
    assert isinstance(strategy.public_context, scoring.ScoringPublicContext)
    assert not hasattr(strategy.public_context, "decryptor")
    assert None not in grid.decryptions
    # Every member decrypted exactly its budget: n norms and n(n-1)/2 distances.
    n = len(NODE_IDS)
    limits = committee.budget_limits(n)
    assert len(members) == 3
    assert set(members) <= set(NODE_IDS)
    for member in members:
        assert grid.decryptions[member] == limits["norm"] + limits["distance"]

    # The lying member is outvoted: the aggregate equals the plaintext Multi-Krum choice.
    chosen = multikrum_selection(centred_squared_distances(updates), 1, 3)
    weights = EXAMPLES[chosen] / EXAMPLES[chosen].sum()
    assert liar in members
    assert np.max(np.abs(decrypted_drift(secret, strategy) - weights @ updates[chosen])) <= 1e-6

    # A second request for the same round exceeds every member's budget and is refused.
    strategy.drift = None
    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))
    assert arrays is None
    for member in members:
        last = grid.replies[member][-1]
        assert last.has_error()
        assert "exceeds the round's budget" in last.error.reason


def test_duplicate_upload_rejected(public, secret, key_dir, tmp_path, uploads) -> None:
    audit = Audit()
    strategy = make_strategy(public, RuleSettings(rule="norm_bound"), audit=audit)
    grid = FederationGrid(key_dir, tmp_path, secret)
    copied = list(uploads)
    copied[3] = copied[0]

    run_round(strategy, grid, 1, replies_for(copied))

    rejected = audit.events("update_rejected")
    duplicate = [fields for fields in rejected if "duplicate" in fields["reason"]]
    assert len(duplicate) == 1
    assert duplicate[0]["node_id"] == NODE_IDS[3]
    assert f"node {NODE_IDS[0]}" in duplicate[0]["reason"]
    assert len(audit.events("aggregate")) == 1


def test_malformed_and_foreign_uploads_rejected(public, secret, key_dir, tmp_path, uploads) -> None:
    audit = Audit()
    other = scoring.generate_scoring_context()
    strategy = make_strategy(public, RuleSettings(rule="norm_bound"), audit=audit)
    grid = FederationGrid(key_dir, tmp_path, secret)
    broken = list(uploads)
    broken[0] = broken[0][:-10]
    broken[1] = scoring.encrypt_for_scoring(other, np.ones(LENGTH) * 0.01)
    broken[2] = scoring.encrypt_for_scoring(secret, np.ones(LENGTH - 1) * 0.01)

    run_round(strategy, grid, 1, replies_for(broken))

    reasons = {fields["partition"]: fields["reason"] for fields in audit.events("update_rejected")}
    assert "MalformedBatchError" in reasons[0]
    assert "FingerprintMismatchError" in reasons[1]
    assert "VectorLengthError" in reasons[2]


def test_budget_bound_to_seen_round(public, secret, key_dir, tmp_path, uploads) -> None:
    strategy = make_strategy(public, RuleSettings(rule="norm_bound"))
    grid = FederationGrid(key_dir, tmp_path, secret)
    grid.see_round(3)
    strategy._grid = grid

    # The server names round 4, which no node has seen in a train or evaluate message.
    arrays, _ = strategy.aggregate_train(4, replies_for(uploads))

    assert arrays is None
    errors = [reply.error.reason for replies in grid.replies.values() for reply in replies if reply.has_error()]
    assert len(errors) == 3
    assert all("last train or evaluate message this node saw in run 1 was for round 3" in reason for reason in errors)


def test_oversized_update_rejected_on_node(secret) -> None:
    big = np.full(LENGTH, 1.0)
    limit = node_keys.largest_norm_bound(secret.preset)

    with pytest.raises(node_keys.ScoringBoundError) as raised:
        node_keys.encrypt_vector(secret, big, norm_bound=10.0)

    message = str(raised.value)
    assert f"Update has L2 norm {np.linalg.norm(big):.6g}, above strategy.norm_bound=10; this node does not clip." in message
    assert f"(at most {limit:g} for scoring_8192)" in message
    assert "clip it to the bound" not in message


def test_state_round_trip(public, secret, key_dir, tmp_path, uploads) -> None:
    strategy = make_strategy(public, RuleSettings(rule="trust"))
    grid = FederationGrid(key_dir, tmp_path, secret, reference=np.full(LENGTH, 0.01))
    run_round(strategy, grid, 1, replies_for(uploads))

    restored = make_strategy(public, RuleSettings(rule="trust"))
    restored.load_state_dict(strategy.state_dict())
    restored.restore_drift(list(strategy.drift))

    assert restored.version_round == 1
    assert restored.reputation.state_dict() == strategy.reputation.state_dict()
    with pytest.raises(Exception, match="CRC-32"):
        corrupted = bytearray(strategy.drift[0])
        corrupted[-5] ^= 0xFF
        restored.restore_drift([bytes(corrupted)])
    assert isinstance(ArrayRecord(), ArrayRecord)


def test_encrypted_sign_flip_caught_by_krum(public, secret, key_dir, tmp_path, updates, uploads) -> None:
    from strategies.attack_simulation import AttackSettings
    from strategies.encrypted_attack_simulation import EncryptedAttackSimulation

    audit = Audit()
    inner = make_strategy(public, RuleSettings(rule="krum", num_malicious=1), audit=audit)
    attack = EncryptedAttackSimulation(inner, AttackSettings(name="sign_flip", fraction=0.2, scale=4.0), [0], key_dir)
    grid = FederationGrid(key_dir, tmp_path, secret)
    replies = replies_for(uploads)
    before = replies[0].content.config_records[UPDATE_RECORD][BATCH_KEY][0]

    inner._grid = grid
    grid.see_round(1)
    arrays, _ = attack.aggregate_train(1, replies)

    after = replies[0].content.config_records[UPDATE_RECORD][BATCH_KEY][0]
    assert after != before
    crafted = attack._decrypt_upload(replies[0])
    assert np.max(np.abs(crafted + 4.0 * updates[0])) <= 1e-6
    assert arrays is not None
    rejected = {fields["partition"] for fields in audit.events("update_rejected")}
    assert 0 in rejected


def test_fixed_committee_by_partition(public, secret, key_dir, tmp_path, updates, uploads, monkeypatch) -> None:
    grid = FederationGrid(key_dir, tmp_path, secret)
    original = committee.decrypt_scalar

    def counting(context, scalar, **kwargs):
        grid.decryptions[grid.current_node] += 1
        return original(context, scalar, **kwargs)

    monkeypatch.setattr(committee, "decrypt_scalar", counting)
    strategy = make_strategy(public, RuleSettings(rule="norm_bound"))
    strategy.committee = CommitteeSettings(size=3, max_faulty=1, seed=7, partitions=(0, 2, 4))

    arrays, _ = run_round(strategy, grid, 1, replies_for(uploads))

    assert arrays is not None
    assert sorted(grid.decryptions) == sorted(NODE_IDS[i] for i in (0, 2, 4))


def test_fixed_member_without_update_skips_round(public, secret, key_dir, tmp_path, uploads) -> None:
    audit = Audit()
    grid = FederationGrid(key_dir, tmp_path, secret)
    strategy = make_strategy(public, RuleSettings(rule="norm_bound"), audit=audit)
    strategy.committee = CommitteeSettings(size=3, max_faulty=1, seed=7, partitions=(0, 2, 4))
    replies = [reply for reply in replies_for(uploads) if reply.metadata.src_node_id != NODE_IDS[4]]

    arrays, _ = run_round(strategy, grid, 1, replies)

    assert arrays is None
    assert strategy.drift is None
    assert grid.decryptions == Counter()
    skipped = audit.events("he_robust_round_skipped")
    assert len(skipped) == 1
    assert "committee members [4] (partition ids) sent no usable update in round 1" in skipped[0]["reason"]


def test_krum_left_out_updates_log_at_info(public, secret, key_dir, tmp_path, uploads, caplog) -> None:
    strategy = make_strategy(public, RuleSettings(rule="multikrum", num_malicious=1, num_selected=3))
    grid = FederationGrid(key_dir, tmp_path, secret)

    with caplog.at_level("INFO"):
        run_round(strategy, grid, 1, replies_for(uploads))

    left_out = [record for record in caplog.records if "rejected by rule multikrum" in record.getMessage()]
    assert len(left_out) == len(NODE_IDS) - 3
    assert {record.levelname for record in left_out} == {"INFO"}

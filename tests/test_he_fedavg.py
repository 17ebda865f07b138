"""EncryptedFedAvg on real CKKS ciphertexts in replies built by hand."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from clients.encrypted import UpdateBoundError, encrypt_delta, flatten, global_state, state_hash, unflatten
from conftest import make_reply
from crypto import ckks
from provenance.audit import AuditLog, verify_chain
from strategies.he_fedavg import BATCH_KEY, UPDATE_RECORD, EncryptedFedAvg

LENGTH = 5_000  # more than one ciphertext (4,096 values in the compact preset)


@pytest.fixture(scope="module")
def secret() -> ckks.SecretContext:
    return ckks.generate_context("compact")


@pytest.fixture(scope="module")
def other_secret() -> ckks.SecretContext:
    return ckks.generate_context("compact")


def _strategy(secret: ckks.SecretContext, tmp_path: Path) -> tuple[EncryptedFedAvg, AuditLog]:
    audit = AuditLog(tmp_path / "audit.jsonl")
    strategy = EncryptedFedAvg(secret.public, LENGTH, "initial-hash", ConfigRecord({"fedseal-task": "{}"}), audit=audit)
    return strategy, audit


def _upload(node_id: int, partition: int, batch: list[bytes], examples: float = 10.0):
    reply = make_reply(node_id, metrics={"num-examples": examples, "train_loss": 0.1}, partition_id=partition)
    reply.content[UPDATE_RECORD] = ConfigRecord({BATCH_KEY: batch})
    return reply


def _updates(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.05, 0.05, LENGTH) for _ in range(count)]


def _audit_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sum_equals_weighted_mean(secret, tmp_path) -> None:
    strategy, _ = _strategy(secret, tmp_path)
    updates = _updates(3)
    weights = [0.2, 0.3, 0.5]
    replies = [_upload(10 + i, i, ckks.encrypt_update(secret, u, w)) for i, (u, w) in enumerate(zip(updates, weights))]

    strategy.aggregate_train(1, replies)

    expected = sum(w * u for u, w in zip(updates, weights))
    decrypted = ckks.decrypt_sum(secret, strategy.drift, LENGTH)
    np.testing.assert_allclose(decrypted, expected, atol=1e-7)


def test_drift_accumulates_over_rounds(secret, tmp_path) -> None:
    strategy, _ = _strategy(secret, tmp_path)
    first, second = _updates(2)

    strategy.aggregate_train(1, [_upload(10, 0, ckks.encrypt_update(secret, first, 1.0))])
    strategy.aggregate_train(2, [_upload(10, 0, ckks.encrypt_update(secret, second, 1.0))])

    decrypted = ckks.decrypt_sum(secret, strategy.drift, LENGTH)
    np.testing.assert_allclose(decrypted, first + second, atol=1e-7)
    assert strategy.version_round == 2


def test_foreign_context_rejected_round_continues(secret, other_secret, tmp_path) -> None:
    strategy, audit = _strategy(secret, tmp_path)
    good, foreign = _updates(2)
    replies = [_upload(10, 0, ckks.encrypt_update(secret, good, 0.5)), _upload(11, 1, ckks.encrypt_update(other_secret, foreign, 0.5))]

    strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(ckks.decrypt_sum(secret, strategy.drift, LENGTH), 0.5 * good, atol=1e-7)
    events = _audit_events(audit.path)
    rejected = [e for e in events if e["event"] == "update_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["node_id"] == 11
    assert rejected[0]["partition"] == 1
    assert "FingerprintMismatchError" in rejected[0]["reason"]
    assert [e["event"] for e in events].count("update_accepted") == 1
    assert verify_chain(audit.path).ok


def test_truncated_bytes_rejected(secret, tmp_path) -> None:
    strategy, audit = _strategy(secret, tmp_path)
    good, damaged = _updates(2)
    batch = ckks.encrypt_update(secret, damaged, 0.5)
    batch[1] = batch[1][: len(batch[1]) // 2]
    replies = [_upload(10, 0, ckks.encrypt_update(secret, good, 0.5)), _upload(11, 1, batch)]

    strategy.aggregate_train(1, replies)

    rejected = [e for e in _audit_events(audit.path) if e["event"] == "update_rejected"]
    assert [e["node_id"] for e in rejected] == [11]
    assert "MalformedBatchError" in rejected[0]["reason"]
    np.testing.assert_allclose(ckks.decrypt_sum(secret, strategy.drift, LENGTH), 0.5 * good, atol=1e-7)


def test_wrong_chunk_count_rejected(secret, tmp_path) -> None:
    strategy, audit = _strategy(secret, tmp_path)
    good = _updates(1)[0]
    batch = ckks.encrypt_update(secret, good, 0.5)
    replies = [_upload(10, 0, ckks.encrypt_update(secret, good, 0.5)), _upload(11, 1, batch[:-1])]

    strategy.aggregate_train(1, replies)

    rejected = [e for e in _audit_events(audit.path) if e["event"] == "update_rejected"]
    assert [e["node_id"] for e in rejected] == [11]
    assert "ChunkCount" in rejected[0]["reason"]


def test_all_rejected_keeps_model(secret, other_secret, tmp_path) -> None:
    strategy, _ = _strategy(secret, tmp_path)
    first = _updates(1)[0]
    strategy.aggregate_train(1, [_upload(10, 0, ckks.encrypt_update(secret, first, 1.0))])
    kept = list(strategy.drift)

    arrays, metrics = strategy.aggregate_train(2, [_upload(10, 0, ckks.encrypt_update(other_secret, first, 1.0))])

    assert arrays is None
    assert metrics is None
    assert strategy.drift == kept
    assert strategy.version_round == 1


def test_reply_without_update_rejected(secret, tmp_path) -> None:
    strategy, audit = _strategy(secret, tmp_path)
    plain = make_reply(12, metrics={"num-examples": 1.0}, partition_id=2)

    arrays, _ = strategy.aggregate_train(1, [plain])

    assert arrays is None
    rejected = [e for e in _audit_events(audit.path) if e["event"] == "update_rejected"]
    assert rejected[0]["reason"] == "reply has no encrypted update or no metrics"


def test_server_context_cannot_decrypt(secret, tmp_path) -> None:
    strategy, _ = _strategy(secret, tmp_path)
    strategy.aggregate_train(1, [_upload(10, 0, ckks.encrypt_update(secret, _updates(1)[0], 1.0))])

    with pytest.raises(ckks.SecretKeyRequiredError):
        ckks.decrypt_sum(strategy.public_context, strategy.drift, LENGTH)
    with pytest.raises(TypeError, match="never hold a secret key"):
        EncryptedFedAvg(secret, LENGTH, "h", ConfigRecord())


def test_flatten_round_trip() -> None:
    state = OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.tensor([0.5], dtype=torch.float32))

    again = unflatten(flatten(state), state)

    assert list(again) == ["w", "b"]
    assert torch.equal(again["w"], state["w"])
    assert again["b"].dtype == torch.float32
    with pytest.raises(TypeError, match="'steps' is torch.int64"):
        flatten(OrderedDict(steps=torch.tensor([3])))


def test_node_round_trip_and_bound(secret) -> None:
    initial = OrderedDict(w=torch.zeros(LENGTH, dtype=torch.float32))
    trained = OrderedDict(w=torch.full((LENGTH,), 0.01, dtype=torch.float32))

    batch = encrypt_delta(secret, trained, initial, 1.0, update_bound=0.25)
    result = ckks.aggregate_batches([batch], secret.public, LENGTH)
    recovered = global_state(secret, initial, result.batch)

    np.testing.assert_allclose(recovered["w"].numpy(), 0.01, atol=1e-6)
    with pytest.raises(UpdateBoundError, match="exceeds security.update_bound=0.001"):
        encrypt_delta(secret, trained, initial, 1.0, update_bound=0.001)
    assert state_hash(initial) != state_hash(trained)


def test_drift_near_limit_stops_training(secret) -> None:
    from clients.encrypted import drift_limit

    initial = OrderedDict(w=torch.zeros(LENGTH, dtype=torch.float32))
    limit = drift_limit(secret.preset)
    drift = np.full(LENGTH, 0.9 * limit)
    batch = ckks.aggregate_batches([ckks.encrypt_update(secret, drift, 1.0)], secret.public, LENGTH).batch

    assert global_state(secret, initial, batch, update_bound=0.05)["w"][0] == pytest.approx(0.9 * limit, rel=1e-5)
    with pytest.raises(UpdateBoundError, match="could exceed the compact preset's limit") as caught:
        global_state(secret, initial, batch, update_bound=0.5)
    assert "(security=compact_wide, security=tenseal_default)" in str(caught.value)

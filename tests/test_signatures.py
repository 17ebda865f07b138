"""Signature checks before aggregation, on hand-built replies with real Ed25519 keys.

Replies come from ``tests/conftest.py::make_reply``; the registry is a real
SQLite file and the audit log a real hash chain. The last two tests run the
whole product on Ray with signatures on.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from omegaconf import OmegaConf

from clients.encrypted import state_hash
from clients.signing import base_version_hash, sign_train_reply, sign_update
from conftest import ScriptedGrid, make_reply
from crypto import ckks, signing
from provenance.audit import AuditLog, canonical, entry_hash, head_path, verify_chain
from provenance.registry import NodeRegistry, sqlite_url
from server.cli import main as cli_main
from strategies import arrival_hashing
from strategies.arrival_hashing import ArrivalHashingGrid
from strategies.factory import RunResources
from strategies.he_fedavg import BATCH_KEY, UPDATE_RECORD, EncryptedFedAvg, batch_digest
from strategies.signatures import SignatureVerification, setup_signatures, verify_audit_signatures, wrap_with_signatures
from scenarios.spec import TaskSpec

RUN_ID = "run-1"
# Partition id (registry node id) -> Flower node id.
FLOWER_IDS = {0: 10, 1: 11, 2: 12}
LENGTH = 300


class FakeGrid:
    """The part of Flower's Grid that FedAvg's sampling uses."""

    def get_node_ids(self) -> list[int]:
        return list(FLOWER_IDS.values())


@dataclass
class Federation:
    """One signature-checked strategy with its registry, audit log and node keys."""

    strategy: SignatureVerification
    registry: NodeRegistry
    audit: AuditLog
    keys: dict[int, Ed25519PrivateKey]


def _state(seed: int) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(weight=torch.randn(3, 2, generator=generator), bias=torch.randn(3, generator=generator))


def _federation(tmp_path: Path, inner) -> Federation:
    registry_url = sqlite_url(tmp_path / "registry.sqlite")
    registry = NodeRegistry(registry_url)
    keys = {node: signing.generate_private_key() for node in FLOWER_IDS}
    for node, key in keys.items():
        registry.register(node, signing.public_key_hex(key), f"site-{node}")

    audit = AuditLog(tmp_path / "audit.jsonl")
    cfg = OmegaConf.create({"provenance": {"signatures": True, "registry_url": registry_url, "keys_dir": None}})
    resources = RunResources(task=ConfigRecord({"fedseal-task": "{}"}), run_dir=tmp_path, audit=audit, run_id=RUN_ID)
    spec = setup_signatures(cfg, TaskSpec(scenario="fraud"), resources, tmp_path)
    assert spec.provenance == {"run_id": RUN_ID, "keys_dir": None}
    return Federation(wrap_with_signatures(inner, resources), registry, audit, keys)


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    return _federation(tmp_path, FedAvg(min_available_nodes=3, min_train_nodes=3))


def _configure(federation: Federation, server_round: int, state: OrderedDict) -> dict[int, Message]:
    messages = federation.strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord({}), FakeGrid())
    return {message.metadata.dst_node_id: message for message in messages}


def _reply(node: int, state: OrderedDict, flower_id: int | None = None) -> Message:
    return make_reply(FLOWER_IDS.get(node, 99) if flower_id is None else flower_id, arrays=ArrayRecord(state), metrics={"num-examples": 10.0}, partition_id=node)


def _signed(federation: Federation, sent: dict[int, Message], node: int, state: OrderedDict, server_round: int, **overrides) -> Message:
    """A reply from ``node``, signed as an honest node would unless ``overrides`` change a field."""
    reply = _reply(node, state)
    key = overrides.get("key", federation.keys.get(node))
    base = overrides.get("base", base_version_hash(sent[FLOWER_IDS[node]].content))
    sign_update(reply.content, key, overrides.get("run_id", RUN_ID), overrides.get("server_round", server_round), node, base)
    return reply


def _events(path: Path, event: str) -> list[dict]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [entry for entry in entries if entry["event"] == event]


def _mean(*states: OrderedDict) -> OrderedDict:
    return OrderedDict((name, sum(state[name] for state in states) / len(states)) for name in states[0])


def _assert_model(arrays: ArrayRecord, expected: OrderedDict) -> None:
    result = arrays.to_torch_state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(result[name], tensor)


def test_valid_replies_aggregated(federation: Federation) -> None:
    sent = _configure(federation, 1, _state(0))
    updates = {node: _state(node + 1) for node in FLOWER_IDS}
    replies = [_signed(federation, sent, node, updates[node], 1) for node in FLOWER_IDS]
    replies.append(make_reply(13, error="node crashed"))

    arrays, _ = federation.strategy.aggregate_train(1, replies)

    _assert_model(arrays, _mean(*updates.values()))
    accepted = _events(federation.audit.path, "update_accepted")
    assert [entry["partition"] for entry in accepted] == [0, 1, 2]
    assert [entry["node_id"] for entry in accepted] == [10, 11, 12]
    assert accepted[0]["check"] == "signature"
    assert accepted[0]["round"] == 1
    assert accepted[0]["run_id"] == RUN_ID
    assert accepted[0]["base_hash"] == state_hash(_state(0))
    assert accepted[0]["payload_hash"] == state_hash(updates[0])
    assert accepted[0]["digest"] == signing.update_digest(RUN_ID, 1, 0, state_hash(_state(0)), state_hash(updates[0])).hex()
    assert len(bytes.fromhex(accepted[0]["signature"])) == 64
    assert _events(federation.audit.path, "update_rejected") == []
    assert [node.accepted for node in federation.registry.list_nodes()] == [1, 1, 1]
    assert verify_audit_signatures(federation.audit.path).checked == 3


def test_node_keys_logged_at_start(federation: Federation) -> None:
    entries = _events(federation.audit.path, "node_key")

    assert [entry["partition"] for entry in entries] == [0, 1, 2]
    assert entries[1]["public_key"] == signing.public_key_hex(federation.keys[1])
    assert entries[1]["status"] == "active"
    assert entries[1]["run_id"] == RUN_ID


def _unsigned(federation, sent, state):
    return _reply(2, state)


def _malformed(federation, sent, state):
    reply = _reply(2, state)
    reply.content[signing.SIGNATURE_RECORD] = ConfigRecord({signing.SIGNATURE_KEY: b"short", signing.DIGEST_KEY: "00" * 32})
    return reply


def _foreign_key(federation, sent, state):
    return _signed(federation, sent, 2, state, 1, key=signing.generate_private_key())


def _unknown_node(federation, sent, state):
    reply = _reply(7, state, flower_id=12)
    sign_update(reply.content, signing.generate_private_key(), RUN_ID, 1, 7, base_version_hash(sent[12].content))
    return reply


def _revoked(federation, sent, state):
    federation.registry.revoke(2)
    return _signed(federation, sent, 2, state, 1)


def _quarantined(federation, sent, state):
    federation.registry.set_status(2, "quarantined")
    return _signed(federation, sent, 2, state, 1)


def _other_run(federation, sent, state):
    return _signed(federation, sent, 2, state, 1, run_id="run-0")


def _altered_payload(federation, sent, state):
    reply = _signed(federation, sent, 2, state, 1)
    reply.content["arrays"] = ArrayRecord(_state(99))
    return reply


def _wrong_base(federation, sent, state):
    return _signed(federation, sent, 2, state, 1, base=state_hash(_state(50)))


def _swapped_digest(federation, sent, state):
    reply = _signed(federation, sent, 2, state, 1)
    other = signing.update_digest(RUN_ID, 1, 2, base_version_hash(sent[12].content), state_hash(_state(99)))
    reply.content[signing.SIGNATURE_RECORD][signing.DIGEST_KEY] = other.hex()
    reply.content["arrays"] = ArrayRecord(_state(99))
    return reply


REJECTIONS: list[tuple[str, Callable, str]] = [
    ("unsigned", _unsigned, "unsigned reply: it has no 'signature' record"),
    ("malformed", _malformed, "unsigned reply: the 'signature' record lacks a 64-byte signature"),
    ("foreign key", _foreign_key, "bad signature: it does not verify with node 2's registered key"),
    ("unknown node", _unknown_node, "unknown node 7: it is not in the node registry"),
    ("revoked", _revoked, "node 2 is revoked in the node registry"),
    ("quarantined", _quarantined, "node 2 is quarantined in the node registry"),
    ("other run", _other_run, "replay from another run: signed for run run-0, this run is run-1"),
    ("altered payload", _altered_payload, "payload altered after signing"),
    ("wrong base", _wrong_base, "computed from the wrong base version"),
    ("swapped digest", _swapped_digest, "bad signature"),
]


@pytest.mark.parametrize(("case", "make_bad_reply", "reason"), REJECTIONS, ids=[case for case, _, _ in REJECTIONS])
def test_bad_reply_rejected_round_continues(federation: Federation, case: str, make_bad_reply: Callable, reason: str) -> None:
    sent = _configure(federation, 1, _state(0))
    good = [_signed(federation, sent, node, _state(node + 1), 1) for node in (0, 1)]
    bad = make_bad_reply(federation, sent, _state(3))

    arrays, _ = federation.strategy.aggregate_train(1, [*good, bad])

    _assert_model(arrays, _mean(_state(1), _state(2)))
    rejected = _events(federation.audit.path, "update_rejected")
    assert len(rejected) == 1
    assert rejected[0]["reason"].startswith(reason)
    assert rejected[0]["check"] == "signature"
    assert rejected[0]["round"] == 1
    assert rejected[0]["node_id"] == 12
    assert rejected[0]["partition"] == (7 if case == "unknown node" else 2)
    assert [entry["partition"] for entry in _events(federation.audit.path, "update_accepted")] == [0, 1]
    counts = {node.node_id: (node.accepted, node.rejected) for node in federation.registry.list_nodes()}
    assert counts[0] == (1, 0)
    assert counts[2] == ((0, 0) if case == "unknown node" else (0, 1))
    assert verify_chain(federation.audit.path).ok


def test_bad_reply_digest_logged(federation: Federation) -> None:
    sent = _configure(federation, 1, _state(0))
    bad = _altered_payload(federation, sent, _state(3))
    claimed = bad.content[signing.SIGNATURE_RECORD][signing.DIGEST_KEY]

    federation.strategy.aggregate_train(1, [bad])

    assert _events(federation.audit.path, "update_rejected")[0]["digest"] == claimed


def test_reply_without_node_rejected(federation: Federation) -> None:
    sent = _configure(federation, 1, _state(0))
    anonymous = make_reply(12, arrays=ArrayRecord(_state(3)), metrics={"num-examples": 10.0})
    sign_update(anonymous.content, federation.keys[2], RUN_ID, 1, 2, base_version_hash(sent[12].content))

    arrays, _ = federation.strategy.aggregate_train(1, [_signed(federation, sent, 0, _state(1), 1), anonymous])

    _assert_model(arrays, _state(1))
    rejected = _events(federation.audit.path, "update_rejected")
    assert [entry["partition"] for entry in rejected] == [None]
    assert rejected[0]["reason"] == "the reply names no node (no 'node' record with an integer partition id)"


def test_replay_from_earlier_round(federation: Federation) -> None:
    first = _configure(federation, 1, _state(0))
    round_one = {node: _signed(federation, first, node, _state(node + 1), 1) for node in FLOWER_IDS}
    arrays, _ = federation.strategy.aggregate_train(1, list(round_one.values()))

    second = _configure(federation, 2, arrays.to_torch_state_dict())
    fresh = [_signed(federation, second, node, _state(node + 10), 2) for node in (0, 1)]
    arrays, _ = federation.strategy.aggregate_train(2, [*fresh, round_one[2]])

    _assert_model(arrays, _mean(_state(10), _state(11)))
    rejected = _events(federation.audit.path, "update_rejected")
    assert [entry["partition"] for entry in rejected] == [2]
    assert rejected[0]["round"] == 2
    assert rejected[0]["reason"] == "replay from round 1: signed for round 1, this is round 2"


def test_all_rejected_keeps_model(federation: Federation) -> None:
    sent = _configure(federation, 1, _state(0))

    arrays, metrics = federation.strategy.aggregate_train(1, [_unsigned(federation, sent, _state(3))])

    assert arrays is None
    assert metrics is None


def test_evaluate_passes_through(federation: Federation) -> None:
    messages = list(federation.strategy.configure_evaluate(1, ArrayRecord(_state(0)), ConfigRecord({}), FakeGrid()))
    replies = [make_reply(FLOWER_IDS[node], metrics={"num-examples": 5.0, "roc_auc": 0.5 + node / 10}, partition_id=node, message_type="evaluate") for node in FLOWER_IDS]

    metrics = federation.strategy.aggregate_evaluate(1, replies)

    assert len(messages) == 3
    assert metrics["roc_auc"] == pytest.approx(0.6)


def test_signatures_need_setup(tmp_path: Path) -> None:
    resources = RunResources(task=ConfigRecord({}), run_dir=tmp_path)

    with pytest.raises(ValueError, match="call setup_signatures before build_strategy"):
        wrap_with_signatures(FedAvg(), resources)


def test_empty_registry_fails_at_start(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"provenance": {"signatures": True, "registry_url": None, "keys_dir": None}})
    resources = RunResources(task=ConfigRecord({}), run_dir=tmp_path, audit=AuditLog(tmp_path / "audit.jsonl"))

    with pytest.raises(ValueError, match="has no active node.*provenance.signatures=false"):
        setup_signatures(cfg, TaskSpec(scenario="fraud"), resources, tmp_path)


# --- encrypted updates --------------------------------------------------------------


def _encrypted_federation(tmp_path: Path, secret: ckks.SecretContext) -> Federation:
    inner = EncryptedFedAvg(secret.public, LENGTH, "f" * 64, ConfigRecord({"fedseal-task": "{}"}), min_available_nodes=3, min_train_nodes=3)
    # Known sizes keep configure_train from querying the (fake) grid.
    inner.node_sizes = {flower_id: 10.0 for flower_id in FLOWER_IDS.values()}
    return _federation(tmp_path, inner)


def _encrypted_reply(federation: Federation, sent: dict[int, Message], node: int, batch: list[bytes], server_round: int, base: str | None = None) -> Message:
    reply = make_reply(FLOWER_IDS[node], metrics={"num-examples": 10.0}, partition_id=node)
    reply.content[UPDATE_RECORD] = ConfigRecord({BATCH_KEY: batch})
    sign_update(reply.content, federation.keys[node], RUN_ID, server_round, node, base or base_version_hash(sent[FLOWER_IDS[node]].content))
    return reply


def test_encrypted_updates_checked(tmp_path: Path) -> None:
    secret = ckks.generate_context("compact")
    federation = _encrypted_federation(tmp_path, secret)
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-0.01, 0.01, LENGTH) for _ in range(3)]

    sent = _configure(federation, 1, _state(0))
    good = [_encrypted_reply(federation, sent, node, ckks.encrypt_update(secret, updates[node], 0.5), 1) for node in (0, 1)]
    altered = _encrypted_reply(federation, sent, 2, ckks.encrypt_update(secret, updates[2], 0.5), 1)
    altered.content[UPDATE_RECORD] = ConfigRecord({BATCH_KEY: ckks.encrypt_update(secret, -updates[2], 0.5)})
    federation.strategy.aggregate_train(1, [*good, altered])

    drift = federation.strategy.strategy.drift
    np.testing.assert_allclose(ckks.decrypt_sum(secret, drift, LENGTH), 0.5 * (updates[0] + updates[1]), atol=1e-7)
    assert base_version_hash(sent[10].content) == "f" * 64

    second = _configure(federation, 2, _state(0))
    assert base_version_hash(second[10].content) == batch_digest(drift)
    stale = _encrypted_reply(federation, second, 0, ckks.encrypt_update(secret, updates[0], 0.5), 2, base="f" * 64)
    fresh = _encrypted_reply(federation, second, 1, ckks.encrypt_update(secret, updates[1], 0.5), 2)
    federation.strategy.aggregate_train(2, [stale, fresh])

    rejected = [entry for entry in _events(federation.audit.path, "update_rejected") if entry.get("check") == "signature"]
    assert [(entry["round"], entry["partition"]) for entry in rejected] == [(1, 2), (2, 0)]
    assert rejected[0]["reason"].startswith("payload altered after signing")
    assert rejected[1]["reason"].startswith("computed from the wrong base version")
    np.testing.assert_allclose(ckks.decrypt_sum(secret, federation.strategy.strategy.drift, LENGTH), 0.5 * (updates[0] + 2 * updates[1]), atol=1e-6)
    assert verify_audit_signatures(federation.audit.path).checked == 3


# --- audit log re-verification ------------------------------------------------------


def _rewrite(path: Path, line_number: int, change: Callable[[dict], None]) -> None:
    """Edit one entry and re-chain every later line and the head file, as a forger with write access would."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    change(entries[line_number - 1])
    previous = entries[0]["prev"]
    for entry in entries:
        entry["prev"] = previous
        entry["hash"] = entry_hash(entry)
        previous = entry["hash"]
    path.write_bytes(b"".join(canonical(entry) + b"\n" for entry in entries))
    head_path(path).write_text(json.dumps({"entries": len(entries), "last_hash": previous}) + "\n")


def _signed_round_log(federation: Federation) -> tuple[Path, int]:
    sent = _configure(federation, 1, _state(0))
    federation.strategy.aggregate_train(1, [_signed(federation, sent, node, _state(node + 1), 1) for node in FLOWER_IDS])
    lines = federation.audit.path.read_text().splitlines()
    second_accepted = [number for number, line in enumerate(lines, start=1) if '"update_accepted"' in line][1]
    return federation.audit.path, second_accepted


def test_audit_verify_accepts_signed_log(federation: Federation, capsys: pytest.CaptureFixture) -> None:
    path, _ = _signed_round_log(federation)

    assert cli_main(["audit", "verify", str(path)]) == 0
    assert "3 update signatures" in capsys.readouterr().out


def test_audit_verify_catches_forged_signature(federation: Federation, capsys: pytest.CaptureFixture) -> None:
    path, line = _signed_round_log(federation)
    forger = signing.generate_private_key()

    def forge(entry: dict) -> None:
        entry["payload_hash"] = "0" * 64
        digest = signing.update_digest(entry["run_id"], entry["round"], entry["partition"], entry["base_hash"], entry["payload_hash"])
        entry["digest"] = digest.hex()
        entry["signature"] = signing.sign_digest(forger, digest).hex()

    _rewrite(path, line, forge)

    assert verify_chain(path).ok
    assert cli_main(["audit", "verify", str(path)]) == 1
    assert f"BAD SIGNATURE at line {line}: the signature does not verify with node 1's public key" in capsys.readouterr().out


def test_audit_verify_catches_edited_fields(federation: Federation, capsys: pytest.CaptureFixture) -> None:
    path, line = _signed_round_log(federation)

    _rewrite(path, line, lambda entry: entry.update(round=7))

    assert cli_main(["audit", "verify", str(path)]) == 1
    assert f"BAD SIGNATURE at line {line}: the stored digest does not match" in capsys.readouterr().out


def test_audit_verify_catches_revoked_node(federation: Federation) -> None:
    path, _ = _signed_round_log(federation)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    key_line = next(number for number, entry in enumerate(lines, start=1) if entry["event"] == "node_key" and entry["partition"] == 1)

    _rewrite(path, key_line, lambda entry: entry.update(status="revoked"))

    result = verify_audit_signatures(path)
    assert not result.ok
    assert result.reason == "node 1 was revoked at run start, but its update was accepted"


# --- end to end -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["fedavg", "he_fedavg"])
def test_simulation_audit_verifies(strategy: str, tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    from server.config import compose_config
    from server.simulation import run_in_simulation

    overrides = ["nodes=2", "rounds=2", "baselines=false", f"data.root={data_root}", f"output_dir={tmp_path}", f"strategy={strategy}"]
    if strategy == "he_fedavg":
        # Fraud's default SGD step (lr 0.3) moves some weights by about 3 in round 1,
        # beyond the compact preset's update bound of 0.5.
        overrides += ["evaluate.server_side=false", "security=tenseal_default", "security.update_bound=5"]
    run_in_simulation(compose_config(overrides), tmp_path)

    assert cli_main(["audit", "verify", str(tmp_path)]) == 0
    signed = [entry for entry in _events(tmp_path / "audit.jsonl", "update_accepted") if entry.get("check") == "signature"]
    assert f"{len(signed)} update signatures" in capsys.readouterr().out
    # A node whose training fails sends an error reply, which carries no signature to check.
    assert {entry["round"] for entry in signed} == {1, 2}
    assert [entry for entry in _events(tmp_path / "audit.jsonl", "update_rejected") if entry.get("check") == "signature"] == []
    registry = NodeRegistry(sqlite_url(tmp_path / "keys" / "registry.sqlite"))
    counts = {node.node_id: (node.accepted, node.rejected) for node in registry.list_nodes()}
    registry.close()
    assert counts == {node: (sum(entry["partition"] == node for entry in signed), 0) for node in (0, 1)}
    # Every reply was hashed as it arrived through the simulation's grid.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    prehashed = {line["round"]: line["prehashed"] for line in lines if line.get("phase") == "provenance"}
    assert prehashed == {server_round: sum(entry["round"] == server_round for entry in signed) for server_round in (1, 2)}


class CostSink:
    """Collects ``record_event`` lines as the run log would write them."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def record_event(self, phase: str, server_round: int, event: str, node: int | None = None, **fields) -> None:
        self.lines.append({"phase": phase, "round": server_round, "event": event, **fields})


def test_round_cost_reported_to_sink(federation: Federation) -> None:
    sink = CostSink()
    federation.strategy.sink = sink
    sent = _configure(federation, 1, _state(0))
    replies = [_signed(federation, sent, node, _state(node + 1), 1) for node in FLOWER_IDS]

    federation.strategy.aggregate_train(1, replies)

    assert len(sink.lines) == 1
    line = sink.lines[0]
    assert (line["phase"], line["round"], line["event"]) == ("provenance", 1, "train")
    parts = line["base_hash_s"] + line["payload_hash_s"] + line["checks_s"]
    assert line["server_s"] == pytest.approx(parts, abs=1e-4)
    assert line["payload_hash_s"] > 0
    assert line["checks_s"] > 0


def test_signed_reply_reports_sign_seconds(federation: Federation, tmp_path: Path) -> None:
    sent = _configure(federation, 1, _state(0))
    signing.save_key_pair(federation.keys[0], tmp_path / "node-0")
    reply = make_reply(FLOWER_IDS[0], arrays=ArrayRecord(_state(1)), metrics={"num-examples": 10.0}, partition_id=0)
    node_config = {"signing-key": str(tmp_path / "node-0" / signing.PRIVATE_KEY_FILENAME)}

    sign_train_reply(reply.content, sent[FLOWER_IDS[0]].content, node_config, {"run_id": RUN_ID, "keys_dir": None}, 0, 1)

    seconds = reply.content.metric_records["metrics"]["sign_seconds"]
    assert 0 < seconds < 5
    arrays, _ = federation.strategy.aggregate_train(1, [reply])
    assert arrays is not None


@dataclass
class ArrivalRound:
    """Round 1 configured through an ``ArrivalHashingGrid``, with the run log's cost lines collected."""

    grid: ArrivalHashingGrid
    scripted: ScriptedGrid
    messages: list[Message]
    sent: dict[int, Message]
    sink: "CostSink"


def _arrival_round(federation: Federation) -> ArrivalRound:
    sink = CostSink()
    federation.strategy.sink = sink
    scripted = ScriptedGrid(FLOWER_IDS.values(), [])
    grid = ArrivalHashingGrid(scripted)
    messages = list(federation.strategy.configure_train(1, ArrayRecord(_state(0)), ConfigRecord({}), grid))
    sent = {message.metadata.dst_node_id: message for message in messages}
    return ArrivalRound(grid, scripted, messages, sent, sink)


def test_checks_use_hashes_from_arrival(federation: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Message] = []
    real_hash = arrival_hashing.payload_hash
    monkeypatch.setattr(arrival_hashing, "payload_hash", lambda content: hashed.append(content) or real_hash(content))
    setup = _arrival_round(federation)
    good = [_signed(federation, setup.sent, node, _state(node + 1), 1) for node in (0, 1)]
    setup.scripted.batches = [[good[0]], [good[1], _altered_payload(federation, setup.sent, _state(3))]]

    replies = list(setup.grid.send_and_receive(setup.messages, timeout=None))
    arrays, _ = federation.strategy.aggregate_train(1, replies)

    _assert_model(arrays, _mean(_state(1), _state(2)))
    assert len(hashed) == 3
    rejected = _events(federation.audit.path, "update_rejected")
    assert [entry["partition"] for entry in rejected] == [2]
    assert rejected[0]["reason"].startswith("payload altered after signing")
    accepted = _events(federation.audit.path, "update_accepted")
    assert [entry["payload_hash"] for entry in accepted] == [state_hash(_state(1)), state_hash(_state(2))]
    line = setup.sink.lines[0]
    assert line["prehashed"] == 3
    assert line["payload_hash_busy_s"] > 0
    setup.grid.close()


def test_replies_from_other_grid_hashed_on_request(federation: Federation) -> None:
    setup = _arrival_round(federation)
    replies = [_signed(federation, setup.sent, node, _state(node + 1), 1) for node in FLOWER_IDS]

    arrays, _ = federation.strategy.aggregate_train(1, replies)

    _assert_model(arrays, _mean(_state(1), _state(2), _state(3)))
    assert setup.sink.lines[0]["prehashed"] == 0
    assert len(_events(federation.audit.path, "update_accepted")) == 3
    setup.grid.close()


def test_prehashed_counts_updates_only(federation: Federation) -> None:
    setup = _arrival_round(federation)
    crashed = make_reply(FLOWER_IDS[1], error="node crashed")
    setup.scripted.batches = [[_signed(federation, setup.sent, 0, _state(1), 1), crashed, _signed(federation, setup.sent, 2, _state(3), 1)]]

    replies = list(setup.grid.send_and_receive(setup.messages, timeout=None))
    arrays, _ = federation.strategy.aggregate_train(1, replies)

    _assert_model(arrays, _mean(_state(1), _state(3)))
    assert setup.sink.lines[0]["prehashed"] == 2
    setup.grid.close()

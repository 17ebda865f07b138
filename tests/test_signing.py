"""Ed25519 keys, the update digest, and the node side of signed replies."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from clients import signing as node_signing
from clients.encrypted import state_hash
from crypto import ckks, signing
from strategies.he_fedavg import BATCH_KEY, ENCRYPTION_KEY, INITIAL_HASH_KEY, MODEL_RECORD, UPDATE_RECORD, batch_digest

BASE = "a" * 64
PAYLOAD = "b" * 64


def _state(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(weight=torch.randn(4, 3, generator=generator), bias=torch.randn(4, generator=generator))


def test_digest_matches_canonical_json() -> None:
    digest = signing.update_digest("run-a", 2, 3, BASE, PAYLOAD)

    canonical = f'{{"base":"{BASE}","format":"fedseal-update-v1","node":3,"payload":"{PAYLOAD}","round":2,"run":"run-a"}}'
    assert digest == hashlib.sha256(canonical.encode()).digest()
    assert digest.hex() == "0ac0ced4b07e9d5ee2a2febf9fc6f8597793d5b22364d8481863114843691465"


@pytest.mark.parametrize(
    "changed",
    [
        ("run-b", 2, 3, BASE, PAYLOAD),
        ("run-a", 1, 3, BASE, PAYLOAD),
        ("run-a", 2, 4, BASE, PAYLOAD),
        ("run-a", 2, 3, "c" * 64, PAYLOAD),
        ("run-a", 2, 3, BASE, "c" * 64),
    ],
)
def test_digest_binds_every_field(changed: tuple) -> None:
    assert signing.update_digest(*changed) != signing.update_digest("run-a", 2, 3, BASE, PAYLOAD)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("", 1, 0, BASE, PAYLOAD), "run_id must be a non-empty string"),
        (("run", -1, 0, BASE, PAYLOAD), "server_round must be an integer >= 0"),
        (("run", True, 0, BASE, PAYLOAD), "server_round must be an integer >= 0"),
        (("run", 1, "0", BASE, PAYLOAD), "node_id must be an integer >= 0"),
        (("run", 1, 0, BASE.upper(), PAYLOAD), "base_version_hash must be a SHA-256"),
        (("run", 1, 0, BASE, PAYLOAD[:-1]), "payload_sha256 must be a SHA-256"),
    ],
)
def test_digest_rejects_bad_fields(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        signing.update_digest(*arguments)


def test_sign_then_verify() -> None:
    key = signing.generate_private_key()
    digest = signing.update_digest("run", 1, 0, BASE, PAYLOAD)

    signature = signing.sign_digest(key, digest)

    assert len(signature) == signing.SIGNATURE_SIZE
    assert signing.verify_digest(key.public_key(), digest, signature)
    assert not signing.verify_digest(signing.generate_private_key().public_key(), digest, signature)
    assert not signing.verify_digest(key.public_key(), signing.update_digest("run", 2, 0, BASE, PAYLOAD), signature)
    assert not signing.verify_digest(key.public_key(), digest, signature[:-1])


def test_key_files_modes_and_round_trip(tmp_path: Path) -> None:
    key = signing.generate_private_key()
    folder = tmp_path / "signing" / "node-0"

    private_path, public_path = signing.save_key_pair(key, folder)

    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = signing.load_private_key(private_path)
    assert signing.public_key_hex(loaded) == signing.public_key_hex(key)
    from_pem = signing.load_public_key(public_path.read_text())
    from_hex = signing.load_public_key(signing.public_key_hex(key))
    assert signing.public_key_hex(from_pem) == signing.public_key_hex(key)
    assert signing.public_key_hex(from_hex) == signing.public_key_hex(key)


def test_save_refuses_overwrite(tmp_path: Path) -> None:
    first = signing.generate_private_key()
    signing.save_key_pair(first, tmp_path)

    with pytest.raises(FileExistsError, match="--overwrite"):
        signing.save_key_pair(signing.generate_private_key(), tmp_path)

    second = signing.generate_private_key()
    signing.save_key_pair(second, tmp_path, overwrite=True)
    assert signing.public_key_hex(signing.load_private_key(tmp_path / "signing.key")) == signing.public_key_hex(second)


def test_load_rejects_other_key_types(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)

    with pytest.raises(signing.KeyFileError, match="Ed25519"):
        signing.load_private_key(path)
    with pytest.raises(signing.KeyFileError, match="not an unencrypted PEM private key"):
        signing.load_private_key(garbage)
    with pytest.raises(FileNotFoundError, match="fedseal keys init"):
        signing.load_private_key(tmp_path / "missing.key")
    with pytest.raises(signing.KeyFileError, match="neither 64 hex characters nor PEM"):
        signing.load_public_key("12ab")


def test_readable_key_logs_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private_path, _ = signing.save_key_pair(signing.generate_private_key(), tmp_path)
    private_path.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="crypto.signing"):
        signing.load_private_key(private_path)

    assert "chmod 600" in caplog.text


def test_record_hash_equals_state_hash() -> None:
    state = OrderedDict(
        weight=torch.randn(5, 4),
        double=torch.randn(3, dtype=torch.float64),
        counter=torch.tensor(7),
        mask=torch.tensor([True, False, True]),
        empty=torch.zeros(0, 2),
    )
    record = ArrayRecord(state)

    assert node_signing.record_hash(record) == state_hash(record.to_torch_state_dict())
    assert node_signing.record_hash(record) == state_hash(state)


def test_record_hash_fortran_order_fallback() -> None:
    matrix = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    record = ArrayRecord(OrderedDict(matrix=Array.from_numpy_ndarray(matrix)))

    assert node_signing.record_hash(record) == state_hash(record.to_torch_state_dict())
    assert node_signing.record_hash(record) == state_hash(OrderedDict(matrix=torch.from_numpy(np.ascontiguousarray(matrix))))


def test_record_hash_parses_headers_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parallel ast calls can crash CPython 3.11, and NumPy's header reader uses ast.
    original = node_signing.npy_format.read_array_header_1_0
    active, max_active = [0], [0]
    guard = threading.Lock()

    def slow_reader(buffer):
        with guard:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        time.sleep(0.002)
        try:
            return original(buffer)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(node_signing.npy_format, "read_array_header_1_0", slow_reader)
    records = [ArrayRecord(_state(seed)) for seed in range(16)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = list(pool.map(node_signing.record_hash, records))

    assert max_active[0] == 1
    assert hashes == [state_hash(_state(seed)) for seed in range(16)]


def test_base_hash_plaintext_message() -> None:
    state = _state()
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})

    assert node_signing.base_version_hash(content) == state_hash(state)


def test_base_hash_encrypted_messages() -> None:
    first_round = RecordDict({"config": ConfigRecord({ENCRYPTION_KEY: "ckks", INITIAL_HASH_KEY: BASE})})
    drift = [b"header", b"ciphertext"]
    later_round = RecordDict({"config": ConfigRecord({ENCRYPTION_KEY: "ckks", INITIAL_HASH_KEY: BASE}), MODEL_RECORD: ConfigRecord({BATCH_KEY: drift, "round": 1})})

    assert node_signing.base_version_hash(first_round) == BASE
    assert node_signing.base_version_hash(later_round) == batch_digest(drift)
    with pytest.raises(ValueError, match="carries no model"):
        node_signing.base_version_hash(RecordDict({"config": ConfigRecord({"server-round": 1})}))


def test_payload_hash_both_kinds() -> None:
    state = _state(1)
    secret = ckks.generate_context("compact")
    batch = ckks.encrypt_update(secret, np.linspace(-0.01, 0.01, 50), 0.5)

    plaintext = RecordDict({"arrays": ArrayRecord(state)})
    encrypted = RecordDict({UPDATE_RECORD: ConfigRecord({BATCH_KEY: batch})})

    assert node_signing.payload_hash(plaintext) == state_hash(state)
    assert node_signing.payload_hash(encrypted) == batch_digest(batch)
    with pytest.raises(ValueError, match="no update"):
        node_signing.payload_hash(RecordDict({"config": ConfigRecord({"x": 1})}))
    with pytest.raises(ValueError, match="not a list of bytes"):
        node_signing.payload_hash(RecordDict({UPDATE_RECORD: ConfigRecord({BATCH_KEY: "text"})}))


def test_key_path_precedence(tmp_path: Path) -> None:
    provenance = {"run_id": "run", "keys_dir": str(tmp_path)}

    from_task = node_signing.signing_key_path({}, provenance, 3)
    from_node = node_signing.signing_key_path({"signing-key": "/etc/fedseal/signing.key"}, provenance, 3)

    assert from_task == tmp_path / "signing" / "node-3" / "signing.key"
    assert from_node == Path("/etc/fedseal/signing.key")
    with pytest.raises(FileNotFoundError, match="--node-config 'signing-key="):
        node_signing.signing_key_path({}, {"run_id": "run", "keys_dir": None}, 3)


def test_signed_reply_verifies(tmp_path: Path) -> None:
    key = signing.generate_private_key()
    signing.save_key_pair(key, tmp_path / "signing" / "node-2")
    received = _state(0)
    message = RecordDict({"arrays": ArrayRecord(received), "config": ConfigRecord({"server-round": 4})})
    reply = RecordDict({"arrays": ArrayRecord(_state(5))})

    node_signing.sign_train_reply(reply, message, {}, {"run_id": "run-x", "keys_dir": str(tmp_path)}, 2, 4)

    record = reply.config_records[signing.SIGNATURE_RECORD]
    expected = signing.update_digest("run-x", 4, 2, state_hash(received), state_hash(_state(5)))
    assert record[signing.DIGEST_KEY] == expected.hex()
    assert record[signing.BASE_HASH_KEY] == state_hash(received)
    assert record[signing.PAYLOAD_HASH_KEY] == state_hash(_state(5))
    assert record[signing.RUN_ID_KEY] == "run-x"
    assert record[signing.ROUND_KEY] == 4
    assert signing.verify_digest(key.public_key(), expected, record[signing.SIGNATURE_KEY])


def test_no_provenance_no_signature() -> None:
    reply = RecordDict({"arrays": ArrayRecord(_state())})
    message = RecordDict({"arrays": ArrayRecord(_state())})

    node_signing.sign_train_reply(reply, message, {}, None, 0, 1)

    assert signing.SIGNATURE_RECORD not in reply.config_records

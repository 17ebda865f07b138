"""Committee decryption of scoring scalars: decrypted values, per-round budget on disk, rejections."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from tenseal import sealapi

from clients import committee
from crypto.ckks import scoring

LENGTH = 5000  # two ciphertexts
RUN_ID = 7
NUM_UPDATES = 3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def secret() -> scoring.ScoringSecretContext:
    return scoring.generate_scoring_context()


@pytest.fixture(scope="module")
def key_dir(secret, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    scoring.write_scoring_secret_context(secret, folder)
    return folder


@pytest.fixture(scope="module")
def round_data(secret) -> dict:
    """Three plaintext updates and a reference, with their encrypted statistics."""
    rng = np.random.default_rng(3)
    plain = [rng.normal(0.0, 0.01, LENGTH) for _ in range(NUM_UPDATES)]
    reference = rng.normal(0.0, 0.01, LENGTH)
    public = secret.public
    load = lambda values: scoring.ScoringUpdate.from_bytes(
        public, scoring.encrypt_for_scoring(secret, values), LENGTH
    )
    encrypted = [load(values) for values in plain]
    encrypted_reference = load(reference)

    kinds, labels, scalars, expected = [], [], [], []
    for i in range(NUM_UPDATES):
        kinds.append("norm")
        labels.append(f"norm/{i}")
        scalars.append(scoring.squared_norm(public, encrypted[i]).serialize())
        expected.append(float(plain[i] @ plain[i]))
    for i in range(NUM_UPDATES):
        for j in range(i + 1, NUM_UPDATES):
            kinds.append("distance")
            labels.append(f"distance/{i}/{j}")
            scalars.append(
                scoring.squared_distance(public, encrypted[i], encrypted[j]).serialize()
            )
            expected.append(float((plain[i] - plain[j]) @ (plain[i] - plain[j])))
    for i in range(NUM_UPDATES):
        kinds.append("inner")
        labels.append(f"inner/{i}")
        scalars.append(
            scoring.inner_product(public, encrypted[i], encrypted_reference).serialize()
        )
        expected.append(float(plain[i] @ reference))
    return {
        "kinds": kinds,
        "labels": labels,
        "scalars": scalars,
        "expected": expected,
        "encrypted": encrypted,
    }


def request(
    server_round: int, kinds, labels, scalars, num_updates: int = NUM_UPDATES
) -> ConfigRecord:
    return ConfigRecord(
        {
            "server-round": server_round,
            "num-updates": num_updates,
            "kinds": list(kinds),
            "labels": list(labels),
            "scalars": list(scalars),
        }
    )


def query(record: ConfigRecord, node_config: dict, node_id: int = 11, seen: bool = True):
    # A committee member decrypts only for the round it last saw in a train or evaluate message.
    if seen and "state-dir" in node_config:
        committee.record_seen_round(Path(node_config["state-dir"]), RUN_ID, int(record["server-round"]))
    metadata = Metadata(
        run_id=RUN_ID,
        message_id="q1",
        src_node_id=1,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="query.scoring",
    )
    message = make_message(
        metadata=metadata, content=RecordDict({committee.RECORD_KEY: record})
    )
    context = Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config={},
    )
    return committee.handle_scoring_query(message, context)


@pytest.fixture
def node_config(key_dir, tmp_path) -> dict:
    return {
        "ckks-secret-dir": str(key_dir),
        "state-dir": str(tmp_path / "state"),
        "num-partitions": 5,
    }


def test_full_budget_values_correct(round_data, node_config) -> None:
    data = round_data
    reply = query(
        request(1, data["kinds"], data["labels"], data["scalars"]), node_config
    )

    assert not reply.has_error()
    record = reply.content[committee.RECORD_KEY]
    assert list(record["labels"]) == data["labels"]
    for label, value, expected in zip(
        record["labels"], record["values"], data["expected"], strict=True
    ):
        # Rounding to 6 decimals bounds the error at 5e-7; CKKS adds about 1e-9.
        # Rounding to 6 decimals (5e-7), CKKS noise (1e-9) and 6 standard deviations of the noise flooding (3e-7).
        assert abs(value - expected) <= 8e-7, label
        assert value == round(value, 6), label


def test_over_budget_rejected_and_logged(round_data, node_config, caplog) -> None:
    data = round_data
    norms = [index for index, kind in enumerate(data["kinds"]) if kind == "norm"]
    pick = lambda idx: [
        [data[key][i] for i in idx] for key in ("kinds", "labels", "scalars")
    ]

    first = query(request(2, *pick(norms)), node_config)
    assert not first.has_error()

    with caplog.at_level(logging.WARNING, logger="clients.committee"):
        second = query(request(2, *pick(norms[:1])), node_config, node_id=11)

    assert second.has_error()
    assert second.error.code == committee.SCORING_REJECTED_ERROR_CODE
    assert "norm 4 > 3" in second.error.reason
    assert "node 11 rejected" in caplog.text
    assert "round 2" in caplog.text
    assert "norm 4 > 3" in caplog.text


def test_rejected_request_uses_no_budget(round_data, node_config) -> None:
    data = round_data
    # 3 norms, 3 distances, 3 inner products, then all 9 again: the second is rejected whole.
    assert not query(
        request(3, data["kinds"], data["labels"], data["scalars"]), node_config
    ).has_error()
    assert query(
        request(3, data["kinds"], data["labels"], data["scalars"]), node_config
    ).has_error()

    used = committee.ScoringBudget(Path(node_config["state-dir"]), RUN_ID, 3).used()
    assert used["num_updates"] == NUM_UPDATES
    assert used["used"] == {"norm": 3, "distance": 3, "inner": 3}


def test_update_count_fixed_per_round(round_data, node_config) -> None:
    data = round_data
    one = [data["kinds"][:1], data["labels"][:1], data["scalars"][:1]]
    assert not query(request(4, *one), node_config).has_error()

    larger = query(request(4, *one, num_updates=4), node_config)
    assert larger.has_error()
    assert "fixed 3" in larger.error.reason

    too_many = query(request(5, *one, num_updates=6), node_config)
    assert too_many.has_error()
    assert "outside 1..5" in too_many.error.reason


def test_new_round_has_fresh_budget(round_data, node_config) -> None:
    data = round_data
    for server_round in (6, 7):
        reply = query(
            request(server_round, data["kinds"], data["labels"], data["scalars"]),
            node_config,
        )
        assert not reply.has_error(), server_round


def test_budget_survives_new_process(round_data, node_config) -> None:
    data = round_data
    state_dir = node_config["state-dir"]
    assert not query(
        request(8, data["kinds"][:2], data["labels"][:2], data["scalars"][:2]),
        node_config,
    ).has_error()

    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from clients.committee import ScoringBudget, ScoringRequestRejected\n"
        f"budget = ScoringBudget(Path({state_dir!r}), {RUN_ID}, 8)\n"
        "before = budget.used()\n"
        "try:\n"
        "    budget.charge(3, {'norm': 2})\n"
        "    outcome = 'charged'\n"
        "except ScoringRequestRejected as error:\n"
        "    outcome = str(error)\n"
        "print(json.dumps({'before': before, 'outcome': outcome}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    assert result["before"]["used"]["norm"] == 2
    assert "norm 4 > 3" in result["outcome"]


def test_raw_update_not_decrypted(secret, round_data, node_config) -> None:
    # A server could drop a level from a raw update chunk to make it look like a scalar.
    chunk = sealapi.Ciphertext()
    secret.public.evaluator.mod_switch_to_next(
        round_data["encrypted"][0].chunks[0], chunk
    )
    forged = scoring.ScalarCiphertext(
        fingerprint=secret.fingerprint, ciphertext=chunk
    ).serialize()

    reply = query(request(9, ["norm"], ["norm/0"], [forged]), node_config)

    assert reply.has_error()
    assert "slots spread" in reply.error.reason


def test_missing_state_dir_rejected(round_data, key_dir) -> None:
    data = round_data
    reply = query(
        request(1, data["kinds"][:1], data["labels"][:1], data["scalars"][:1]),
        {"ckks-secret-dir": str(key_dir)},
    )
    assert reply.has_error()
    assert "no state-dir" in reply.error.reason


def test_foreign_scalar_rejected(round_data, node_config) -> None:
    other = scoring.generate_scoring_context()
    update = scoring.ScoringUpdate.from_bytes(
        other.public, scoring.encrypt_for_scoring(other, np.ones(10)), 10
    )
    foreign = scoring.squared_norm(other.public, update).serialize()

    reply = query(request(10, ["norm"], ["norm/0"], [foreign]), node_config)

    assert reply.has_error()
    assert "different scoring keys" in reply.error.reason
    used = committee.ScoringBudget(Path(node_config["state-dir"]), RUN_ID, 10).used()
    assert used["num_updates"] is None


def test_unreadable_budget_fails_closed(round_data, node_config) -> None:
    data = round_data
    budget = committee.ScoringBudget(Path(node_config["state-dir"]), RUN_ID, 11)
    budget.path.write_text("{not json", encoding="utf-8")

    reply = query(
        request(11, data["kinds"][:1], data["labels"][:1], data["scalars"][:1]),
        node_config,
    )

    assert reply.has_error()
    assert "is unreadable" in reply.error.reason


def test_malformed_request_rejected(round_data, node_config) -> None:
    data = round_data
    record = request(12, data["kinds"][:1], data["labels"][:1], data["scalars"][:1])
    record["num-updates"] = "three"

    reply = query(record, node_config)

    assert reply.has_error()
    assert "wrong type" in reply.error.reason

"""Server-side scoring through a committee of real ClientApp handlers, one of them lying."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from tenseal import sealapi

from clients import app as client_app
from clients.committee import RECORD_KEY, record_seen_round
from crypto.ckks import scoring
from crypto.ckks.scoring.pool import ScoringWorkerPool
from strategies import encrypted_scoring
from strategies.encrypted_scoring import (
    CommitteeDecryptor,
    CommitteeError,
    build_round_requests_parallel,
    decrypt_scores,
    round_statistics,
    score_round,
    select_committee,
)

LENGTH = 5000
NUM_UPDATES = 3
NODE_IDS = (11, 12, 13, 14)
LIAR = 12
FAILING = 13
# The committee rounds to 6 decimals (error at most 5e-7); CKKS adds about 1e-9 and
# noise flooding a Gaussian of standard deviation 5e-8 (6 standard deviations: 3e-7).
TOLERANCE = 8e-7


class CommitteeGrid:
    """A Grid whose nodes run the ClientApp's scoring handler in this process.

    ``liars`` replace their reply by ``lie(labels, values)`` (default: every
    value times 3 plus 1), and ``failing`` nodes reply with an error. ``inside_node`` is true while a node handler runs.
    """

    def __init__(
        self, key_dir: Path, state_root: Path, liars=(), failing=(), lie=None
    ) -> None:
        self.key_dir = key_dir
        self.state_root = state_root
        self.liars = set(liars)
        self.failing = set(failing)
        self.lie = lie or (lambda labels, values: (labels, [3 * v + 1 for v in values]))
        self.inside_node = False
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(NODE_IDS)

    def send_and_receive(self, messages, timeout=None):
        return [self._deliver(message) for message in messages]

    def _deliver(self, message: Message) -> Message:
        self.sent.append(message)
        node_id = message.metadata.dst_node_id
        metadata = Metadata(
            run_id=1,
            message_id=f"m{len(self.sent)}",
            src_node_id=0,
            dst_node_id=node_id,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=600.0,
            message_type=message.metadata.message_type,
        )
        incoming = make_message(metadata=metadata, content=message.content)
        # A failing node has no key folder configured, so its real handler rejects the request.
        node_config = {
            "state-dir": str(self.state_root / str(node_id)),
            "num-partitions": len(NODE_IDS),
        }
        # Every member took part in the round, so its budget is bound to it.
        record = message.content[RECORD_KEY]
        record_seen_round(Path(node_config["state-dir"]), 1, int(record["server-round"]))
        if node_id not in self.failing:
            node_config["ckks-secret-dir"] = str(self.key_dir)
        context = Context(
            run_id=1,
            node_id=node_id,
            node_config=node_config,
            state=RecordDict(),
            run_config={},
        )

        self.inside_node = True
        try:
            reply = client_app.scoring(incoming, context)
        finally:
            self.inside_node = False
        if node_id in self.liars and not reply.has_error():
            record = reply.content[RECORD_KEY]
            labels, values = self.lie(list(record["labels"]), list(record["values"]))
            lies = ConfigRecord({"labels": labels, "values": values})
            reply = Message(content=RecordDict({RECORD_KEY: lies}), reply_to=incoming)
        return reply


@pytest.fixture(scope="module")
def secret() -> scoring.ScoringSecretContext:
    return scoring.generate_scoring_context()


@pytest.fixture(scope="module")
def key_dir(secret, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    scoring.write_scoring_secret_context(secret, folder)
    return folder


@pytest.fixture(scope="module")
def server_public(secret) -> scoring.ScoringPublicContext:
    # The server gets only the public bytes.
    return scoring.ScoringPublicContext.from_bytes(secret.public.serialize())


@pytest.fixture(scope="module")
def round_inputs(secret, server_public) -> dict:
    rng = np.random.default_rng(11)
    plain = [rng.normal(0.0, 0.01, LENGTH) for _ in range(NUM_UPDATES)]
    plain[2] = plain[2] * 4.0  # one update far from the others
    reference = rng.normal(0.0, 0.01, LENGTH)
    uploads = [
        scoring.encrypt_for_scoring(secret, values) for values in [*plain, reference]
    ]
    loaded = [
        scoring.ScoringUpdate.from_bytes(server_public, data, LENGTH)
        for data in uploads
    ]
    return {
        "plain": plain,
        "reference": reference,
        "uploads": uploads[:-1],
        "reference_upload": uploads[-1],
        "updates": loaded[:-1],
        "encrypted_reference": loaded[-1],
    }


class DecryptionSpy:
    """Records, for every SEAL decryption in this process, whether a node handler was running."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.grid: CommitteeGrid | None = None


@pytest.fixture
def decrypt_calls(monkeypatch) -> DecryptionSpy:
    spy = DecryptionSpy()
    original = sealapi.Decryptor.decrypt

    def recording_decrypt(self, *args):
        spy.calls.append(spy.grid is not None and spy.grid.inside_node)
        return original(self, *args)

    monkeypatch.setattr(sealapi.Decryptor, "decrypt", recording_decrypt)
    return spy


def test_median_outvotes_one_liar(
    server_public, round_inputs, key_dir, tmp_path, decrypt_calls, caplog
) -> None:
    grid = CommitteeGrid(key_dir, tmp_path, liars=[LIAR])
    decrypt_calls.grid = grid
    decryptor = CommitteeDecryptor(grid, members=[11, 12, 14], max_faulty=1)

    with caplog.at_level(logging.WARNING, logger="strategies.encrypted_scoring"):
        scores = score_round(
            server_public,
            round_inputs["updates"],
            decryptor,
            1,
            reference=round_inputs["encrypted_reference"],
        )

    plain, reference = round_inputs["plain"], round_inputs["reference"]
    for i in range(NUM_UPDATES):
        assert abs(scores.squared_norms[i] - plain[i] @ plain[i]) <= TOLERANCE
        assert abs(scores.inner_products[i] - plain[i] @ reference) <= TOLERANCE
        for j in range(NUM_UPDATES):
            expected = (plain[i] - plain[j]) @ (plain[i] - plain[j])
            assert abs(scores.squared_distances[i, j] - expected) <= TOLERANCE
    assert f"committee nodes [{LIAR}] returned values off the median" in caplog.text
    assert len(grid.sent) == 3


def test_server_never_decrypts(
    server_public, round_inputs, key_dir, tmp_path, decrypt_calls
) -> None:
    grid = CommitteeGrid(key_dir, tmp_path)
    decrypt_calls.grid = grid
    decryptor = CommitteeDecryptor(grid, size=3)

    score_round(
        server_public,
        round_inputs["updates"],
        decryptor,
        2,
        reference=round_inputs["encrypted_reference"],
    )

    # 3 norms, 3 distances and 3 inner products, once on each of 3 members.
    assert len(decrypt_calls.calls) == 27
    assert all(decrypt_calls.calls)
    assert isinstance(server_public, scoring.ScoringPublicContext)
    assert not hasattr(server_public, "decryptor")
    assert not hasattr(encrypted_scoring, "decrypt_scalar")
    assert not hasattr(encrypted_scoring, "ScoringSecretContext")


def test_liar_and_failure_raise(
    server_public, round_inputs, key_dir, tmp_path, caplog
) -> None:
    grid = CommitteeGrid(key_dir, tmp_path, liars=[LIAR], failing=[FAILING])
    decryptor = CommitteeDecryptor(grid, members=[11, 12, 13], max_faulty=1)

    expected_error = pytest.raises(
        CommitteeError, match="got 2 committee values, 3 needed"
    )
    with caplog.at_level(logging.WARNING), expected_error:
        score_round(
            server_public, round_inputs["updates"], decryptor, 3, distances=False
        )
    assert f"committee node {FAILING} returned an error" in caplog.text
    assert f"node {FAILING} rejected the scoring request" in caplog.text


def test_committee_budget_blocks_repeat(
    server_public, round_inputs, key_dir, tmp_path
) -> None:
    grid = CommitteeGrid(key_dir, tmp_path)
    decryptor = CommitteeDecryptor(grid, members=[11, 13, 14])
    score_round(server_public, round_inputs["updates"], decryptor, 4)

    with pytest.raises(CommitteeError, match="got 0 committee values"):
        score_round(server_public, round_inputs["updates"], decryptor, 4)


def test_select_committee_draw() -> None:
    first = select_committee(NODE_IDS, 3, server_round=5, seed=1)
    again = select_committee(reversed(NODE_IDS), 3, server_round=5, seed=1)

    assert first == again
    assert len(set(first)) == 3
    assert set(first) <= set(NODE_IDS)
    with pytest.raises(ValueError, match="between 1 and 4"):
        select_committee(NODE_IDS, 5, server_round=5)
    with pytest.raises(ValueError, match=r"\[99\] are not connected"):
        select_committee(NODE_IDS, 3, server_round=5, members=[11, 99])
    with pytest.raises(ValueError, match="cannot outvote 1 faulty"):
        CommitteeDecryptor(grid=None, size=2, max_faulty=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "lie",
    [
        lambda labels, values: (labels, [float("nan")] * len(values)),
        lambda labels, values: (labels, values[:-1]),
        lambda labels, values: (labels[:1], [-1e9]),
    ],
    ids=["nan", "short", "partial"],
)
def test_malformed_liar_outvoted(
    server_public, round_inputs, key_dir, tmp_path, lie
) -> None:
    grid = CommitteeGrid(key_dir, tmp_path, liars=[LIAR], lie=lie)
    decryptor = CommitteeDecryptor(grid, members=[11, 12, 13, 14], max_faulty=1)

    scores = score_round(
        server_public, round_inputs["updates"], decryptor, 1, distances=False
    )

    plain = round_inputs["plain"]
    for i in range(NUM_UPDATES):
        assert abs(scores.squared_norms[i] - plain[i] @ plain[i]) <= TOLERANCE


def test_parallel_requests_match(
    server_public, round_inputs, key_dir, tmp_path
) -> None:
    grid = CommitteeGrid(key_dir, tmp_path)
    decryptor = CommitteeDecryptor(grid, members=[11, 13, 14])

    with ScoringWorkerPool(server_public, workers=2) as pool:
        requests = build_round_requests_parallel(
            pool, round_inputs["uploads"], LENGTH, round_inputs["reference_upload"]
        )
    scores = decrypt_scores(decryptor, 6, NUM_UPDATES, requests)

    plain, reference = round_inputs["plain"], round_inputs["reference"]
    assert [request.label for request in requests][:4] == [
        "norm/0",
        "norm/1",
        "norm/2",
        "distance/0/1",
    ]
    for i in range(NUM_UPDATES):
        assert abs(scores.squared_norms[i] - plain[i] @ plain[i]) <= TOLERANCE
        assert abs(scores.inner_products[i] - plain[i] @ reference) <= TOLERANCE
        for j in range(NUM_UPDATES):
            expected = (plain[i] - plain[j]) @ (plain[i] - plain[j])
            assert abs(scores.squared_distances[i, j] - expected) <= TOLERANCE


def test_round_statistics_counts() -> None:
    listed = round_statistics(4, reference=True)
    kinds = [kind for kind, _, _, _ in listed]

    assert kinds.count("norm") == 4
    assert kinds.count("distance") == 6
    assert kinds.count("inner") == 4
    assert listed[-1] == ("inner", "inner/3", 3, 4)
    assert len(round_statistics(4, distances=False)) == 4

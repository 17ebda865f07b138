"""Payload hashes started as replies arrive, on a grid whose replies arrive over several pulls."""

from __future__ import annotations

import time
from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from clients.encrypted import state_hash
from clients.signing import payload_hash
from conftest import ScriptedGrid, make_reply
from strategies.arrival_hashing import DEPLOYMENT_PULL_INTERVAL_S, ArrivalHashingGrid, hash_reply_payload, timed_payload_hashes

NODES = (10, 11, 12)


def _state(seed: int) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(weight=torch.randn(4, 3, generator=generator), bias=torch.randn(4, generator=generator))


def _train_reply(node: int) -> Message:
    return make_reply(node, arrays=ArrayRecord(_state(node)), metrics={"num-examples": 10.0}, partition_id=node - 10)


def _train_messages() -> list[Message]:
    return [Message(RecordDict(), node, "train") for node in NODES]


def test_replies_hashed_on_arrival() -> None:
    replies = {node: _train_reply(node) for node in NODES}
    inner = ScriptedGrid(NODES, [[replies[11]], [], [replies[10], replies[12]]])
    grid = ArrivalHashingGrid(inner)

    received = list(grid.send_and_receive(_train_messages(), timeout=None))

    assert received == [replies[11], replies[10], replies[12]]
    assert len(inner.pulls) == 3
    assert inner.pulls[1] == {"instruction-10", "instruction-12"}
    for node, reply in replies.items():
        result, seconds = grid.take(reply)
        assert result == state_hash(_state(node))
        assert seconds >= 0
    grid.close()


def test_take_once_per_reply() -> None:
    reply = _train_reply(10)
    grid = ArrivalHashingGrid(ScriptedGrid(NODES, [[reply]]))
    grid.send_and_receive(_train_messages()[:1], timeout=None)

    assert grid.take(reply)[0] == payload_hash(reply.content)
    assert grid.take(reply) is None
    assert grid.take(_train_reply(10)) is None
    grid.close()


def test_timeout_returns_arrived_replies() -> None:
    replies = [_train_reply(10), _train_reply(11)]
    inner = ScriptedGrid(NODES, [replies], pull_interval=0.02)
    grid = ArrivalHashingGrid(inner)

    started = time.monotonic()
    received = list(grid.send_and_receive(_train_messages(), timeout=0.15))
    waited = time.monotonic() - started

    assert received == replies
    assert 0.15 <= waited < 2.0
    assert inner.pulls[-1] == {"instruction-12"}
    assert grid.take(replies[1])[0] == state_hash(_state(11))
    grid.close()


def test_pull_interval_follows_wrapped_grid() -> None:
    assert ArrivalHashingGrid(ScriptedGrid(NODES, [], pull_interval=0.25)).pull_interval == 0.25
    assert ArrivalHashingGrid(ScriptedGrid(NODES, [], pull_interval=None)).pull_interval == DEPLOYMENT_PULL_INTERVAL_S
    assert ArrivalHashingGrid(ScriptedGrid(NODES, [], pull_interval=0.25), pull_interval=0.5).pull_interval == 0.5


def test_polls_wait_pull_interval() -> None:
    inner = ScriptedGrid(NODES, [[], [], [_train_reply(10)]], pull_interval=0.05)
    grid = ArrivalHashingGrid(inner)

    grid.send_and_receive(_train_messages()[:1], timeout=None)

    gaps = [later - earlier for earlier, later in zip(inner.pull_times, inner.pull_times[1:])]
    assert len(gaps) == 2
    assert min(gaps) >= 0.05
    grid.close()


def test_other_message_types_pass_through() -> None:
    reply = make_reply(10, metrics={"num-examples": 5.0}, partition_id=0, message_type="evaluate")
    inner = ScriptedGrid(NODES, [[reply]])
    grid = ArrivalHashingGrid(inner)

    received = list(grid.send_and_receive([Message(RecordDict(), 10, "evaluate")], timeout=5))

    assert received == [reply]
    assert inner.send_and_receive_calls == 1
    assert inner.pulls == []
    assert grid.take(reply) is None
    grid.close()


def test_error_and_empty_replies() -> None:
    crashed = make_reply(10, error="node crashed")
    empty = make_reply(11, metrics={"num-examples": 5.0}, partition_id=1)
    grid = ArrivalHashingGrid(ScriptedGrid(NODES, [[crashed, empty]]))

    grid.send_and_receive(_train_messages()[:2], timeout=None)

    assert grid.take(crashed)[0] is None
    error = grid.take(empty)[0]
    assert isinstance(error, ValueError)
    assert str(error) == "the reply carries no update ('arrays' or an encrypted batch)"
    grid.close()


def test_unclaimed_hashes_dropped_next_round() -> None:
    first, second = _train_reply(10), _train_reply(10)
    inner = ScriptedGrid(NODES, [[first], [second]])
    grid = ArrivalHashingGrid(inner)

    grid.send_and_receive(_train_messages()[:1], timeout=None)
    grid.send_and_receive(_train_messages()[:1], timeout=None)

    assert grid.take(first) is None
    assert grid.take(second)[0] == state_hash(_state(10))
    grid.close()


def test_other_calls_delegate() -> None:
    inner = ScriptedGrid(NODES, [])
    grid = ArrivalHashingGrid(inner)
    messages = _train_messages()

    assert list(grid.get_node_ids()) == list(NODES)
    assert list(grid.push_messages(messages)) == ["instruction-10", "instruction-11", "instruction-12"]
    assert inner.pushed == messages
    assert grid.create_message(RecordDict(), "query.size", 11, "2").metadata.dst_node_id == 11
    grid.close()


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        ArrivalHashingGrid(ScriptedGrid(NODES, []), threads=0)
    with pytest.raises(ValueError, match="pull_interval must be > 0 seconds, got 0.0"):
        ArrivalHashingGrid(ScriptedGrid(NODES, []), pull_interval=0)


def test_timed_hashes_match_serial() -> None:
    replies = [_train_reply(node) for node in NODES] + [make_reply(13, error="lost")]

    results = timed_payload_hashes(replies, threads=3)

    assert [result for result, _ in results] == [hash_reply_payload(reply) for reply in replies]
    assert [result for result, _ in results][:3] == [state_hash(_state(node)) for node in NODES]
    assert all(seconds >= 0 for _, seconds in results)

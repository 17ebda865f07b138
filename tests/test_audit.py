"""Hash-chained audit log: appends, continuation and every kind of tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provenance.audit import AuditChainError, AuditLog, GENESIS, head_path, verify_chain


def _log_with(path: Path, count: int) -> AuditLog:
    log = AuditLog(path)
    for index in range(count):
        log.append("update_accepted", node=index, digest=f"{index:064x}")
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_chain_links_entries(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 3)

    entries = [json.loads(line) for line in _lines(path)]

    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == entries[0]["hash"]
    assert entries[2]["prev"] == entries[1]["hash"]
    result = verify_chain(path)
    assert result.ok
    assert result.entries == 3


def test_reopen_continues_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = _log_with(path, 2)

    second = AuditLog(path)
    entry = second.append("run_resume", round=2)

    assert entry["seq"] == 3
    assert entry["prev"] == first.last_hash
    assert verify_chain(path).ok


def test_reserved_field_rejected(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")

    with pytest.raises(ValueError, match="reserved"):
        log.append("x", seq=5)


def test_edit_detected_at_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 4)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"node":1', b'"node":7')
    path.write_bytes(b"".join(lines))

    result = verify_chain(path)

    assert not result.ok
    assert result.bad_line == 2
    assert "edited" in result.reason


def test_delete_detected_at_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 4)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))

    result = verify_chain(path)

    assert not result.ok
    assert result.bad_line == 3


def test_reorder_detected_at_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 4)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))

    result = verify_chain(path)

    assert not result.ok
    assert result.bad_line == 2


def test_truncate_mid_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 3)
    path.write_bytes(path.read_bytes()[:-10])

    result = verify_chain(path)

    assert not result.ok
    assert result.bad_line == 3
    assert "truncated" in result.reason


def test_truncate_whole_lines_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 4)
    path.write_bytes(b"".join(_lines(path)[:2]))

    result = verify_chain(path)

    assert not result.ok
    assert result.bad_line == 3
    assert "truncated" in result.reason


def test_broken_log_not_extended(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 2)
    path.write_bytes(path.read_bytes().replace(b'"node":0', b'"node":9'))

    with pytest.raises(AuditChainError, match="line 1"):
        AuditLog(path)


def test_head_file_tracks_end(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log_with(path, 2)

    head = json.loads(head_path(path).read_text())

    assert head == {"entries": 2, "last_hash": log.last_hash}


def test_recover_sets_aside_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 3)
    full = path.read_bytes()
    path.write_bytes(full + b'{"seq":4,"event":"upd')

    log = AuditLog(path, recover=True)
    entry = log.append("run_resume", round=2)

    assert entry["seq"] == 4
    assert verify_chain(path).ok
    assert (tmp_path / "audit.jsonl.torn").read_bytes() == b'{"seq":4,"event":"upd\n'


def test_recover_keeps_edit_detection(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, 3)
    path.write_bytes(path.read_bytes().replace(b'"node":1', b'"node":5'))

    with pytest.raises(AuditChainError, match="line 2"):
        AuditLog(path, recover=True)


def test_recover_resyncs_stale_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log_with(path, 2)
    stale = head_path(path).read_text()
    log.append("update_accepted", node=9)
    head_path(path).write_text(stale)

    AuditLog(path, recover=True)

    assert verify_chain(path).ok

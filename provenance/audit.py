"""An append-only, hash-chained audit log in JSON Lines.

Each line is one self-contained JSON object (so a SIEM can ingest it line by
line) with these fields besides the event's own:

``seq``
    Line number, starting at 1.
``time``
    Unix time in seconds.
``event``
    What happened, e.g. ``run_start``, ``update_rejected``.
``prev``
    The previous entry's ``hash``; 64 zeros on the first line.
``hash``
    SHA-256 (hex) of the entry's canonical JSON without ``hash`` itself
    (sorted keys, no spaces, UTF-8).

A head file beside the log (``audit.jsonl.head``) records the entry count and
last hash after every append, so cutting whole lines off the end is detected
too. Editing, deleting, reordering or truncating lines is reported at the
first affected line by ``verify_chain``. The chain proves integrity relative
to its first line; anchor the last hash elsewhere to detect a wholesale
rewrite of both files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
RESERVED_FIELDS = ("seq", "time", "event", "prev", "hash")


def canonical(entry: dict[str, Any]) -> bytes:
    """Return the canonical JSON bytes of ``entry`` (sorted keys, no spaces)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """Return the SHA-256 hex of ``entry`` without its ``hash`` field."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def head_path(path: Path) -> Path:
    """Return the head file that belongs to the log at ``path``."""
    return path.with_name(path.name + ".head")


class AuditChainError(RuntimeError):
    """An audit log does not verify."""


class AuditLog:
    """Appends chained entries to ``path``; continues an existing chain.

    Parameters
    ----------
    path : Path
        The JSONL file. Created with its folder when missing. When it exists,
        its chain is verified first and new entries extend it.

    fsync_each : bool
        Force every entry to disk before ``append`` returns. Off by default:
        entries are flushed to the operating system at once (a killed
        process loses none) and forced to disk by ``sync``, which the server
        calls before it commits each round.
    recover : bool
        After a crash, set aside a torn last line (written partly when the
        process died) into ``audit.jsonl.torn`` and resynchronise the head
        file with the complete lines. Edited or reordered lines still fail.

    Raises
    ------
    AuditChainError
        If an existing file does not verify, so that nothing is appended to a
        broken chain.
    """

    def __init__(self, path: Path, recover: bool = False, fsync_each: bool = False) -> None:
        self.path = Path(path)
        self.fsync_each = fsync_each
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

        if recover and self.path.exists():
            _recover_after_crash(self.path)
        result = verify_chain(self.path) if self.path.exists() else VerifyResult(True, 0, GENESIS, None, None)
        if not result.ok:
            raise AuditChainError(
                f"Audit log {self.path} is broken at line {result.bad_line}: {result.reason}. "
                "Move it aside before starting a new run there."
            )
        self._seq = result.entries
        self._prev = result.last_hash

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry and return it.

        ``fields`` must be JSON-serializable (no NaN) and must not use the
        reserved names ``seq``, ``time``, ``event``, ``prev`` or ``hash``.
        """
        clash = [name for name in RESERVED_FIELDS if name in fields]
        if clash:
            raise ValueError(f"Audit fields {clash} are reserved; rename them.")

        with self._lock:
            entry = {"seq": self._seq + 1, "time": round(time.time(), 6), "event": event, "prev": self._prev, **fields}
            entry["hash"] = entry_hash(entry)
            with self.path.open("ab") as handle:
                handle.write(canonical(entry) + b"\n")
                handle.flush()
                if self.fsync_each:
                    os.fsync(handle.fileno())
            self._seq += 1
            self._prev = entry["hash"]
            _write_head(self.path, self._seq, self._prev)
        return entry

    def sync(self) -> None:
        """Force the log and its head file to disk (call before committing a round)."""
        with self._lock:
            for target in (self.path, head_path(self.path)):
                if target.exists():
                    with target.open("rb") as handle:
                        os.fsync(handle.fileno())

    @property
    def last_hash(self) -> str:
        """The last entry's hash (the value to anchor elsewhere)."""
        return self._prev


def _recover_after_crash(path: Path) -> None:
    """Set aside a torn final line and rewrite the head file to match the complete lines.

    A crash can interrupt the write of the last line, or come between the
    log write and the head write. Both leave a valid prefix, which this
    keeps. The torn bytes are preserved beside the log, not deleted.
    """
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        torn = path.with_name(path.name + ".torn")
        with torn.open("ab") as handle:
            handle.write(data[cut:] + b"\n")
        with path.open("r+b") as handle:
            handle.truncate(cut)
        logger.warning("Audit log %s ended in a torn line of %d bytes; moved it to %s", path, len(data) - cut, torn)

    entries, last_hash = 0, GENESIS
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if _check_line(line, number, last_hash):
            return  # A real break: leave it for verify_chain to report.
        entries, last_hash = number, json.loads(line)["hash"]
    recorded = json.loads(head_path(path).read_text(encoding="utf-8")) if head_path(path).exists() else None
    if recorded != {"entries": entries, "last_hash": last_hash} and (recorded is None or recorded["entries"] <= entries):
        logger.warning("Audit head file of %s was behind the log (crash between writes); rewriting it", path)
        _write_head(path, entries, last_hash)


def _write_head(path: Path, entries: int, last_hash: str) -> None:
    head = head_path(path)
    temporary = head.with_name(head.name + ".tmp")
    temporary.write_text(json.dumps({"entries": entries, "last_hash": last_hash}) + "\n", encoding="utf-8")
    os.replace(temporary, head)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify_chain``; ``bad_line`` is 1-based and None when ``ok``."""

    ok: bool
    entries: int
    last_hash: str
    bad_line: int | None
    reason: str | None


def verify_chain(path: Path) -> VerifyResult:
    """Re-check every line of an audit log, then compare its end with the head file."""
    path = Path(path)
    data = path.read_bytes()
    prev = GENESIS
    count = 0

    if data and not data.endswith(b"\n"):
        last = data.count(b"\n") + 1
        return VerifyResult(False, count, prev, last, "the line is incomplete (no newline): the file was truncated")

    for number, line in enumerate(data.splitlines(), start=1):
        problem = _check_line(line, number, prev)
        if problem:
            return VerifyResult(False, count, prev, number, problem)
        prev = json.loads(line)["hash"]
        count = number

    return _check_head(path, count, prev)


def _check_line(line: bytes, number: int, prev: str) -> str | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg})"
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("seq") != number:
        return f"sequence number is {entry.get('seq')!r}, expected {number} (a line was removed, inserted or moved)"
    if entry.get("hash") != entry_hash(entry):
        return "its content does not match its hash (the line was edited)"
    if entry.get("prev") != prev:
        return "its 'prev' does not match the previous entry's hash (lines were reordered or rewritten)"
    return None


def _check_head(path: Path, count: int, last_hash: str) -> VerifyResult:
    head = head_path(path)
    if not head.exists():
        # Without a head file only the lines present can be checked.
        logger.warning("No head file %s; truncation at a line boundary cannot be detected", head)
        return VerifyResult(True, count, last_hash, None, None)

    recorded = json.loads(head.read_text(encoding="utf-8"))
    if recorded["entries"] > count:
        return VerifyResult(False, count, last_hash, count + 1, f"missing: the head file records {recorded['entries']} entries but the log ends after {count} (the log was truncated)")
    if recorded["entries"] < count or recorded["last_hash"] != last_hash:
        bad = recorded["entries"] + 1 if recorded["entries"] < count else count
        return VerifyResult(False, count, last_hash, bad, "the log does not end where the head file says (entries were appended without the log writer, or the head file was replaced)")
    return VerifyResult(True, count, last_hash, None, None)

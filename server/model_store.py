"""Encrypted global model versions on disk: one file per round plus an index.

A version file holds a CKKS batch (``list[bytes]``) as: element count (u32),
then each element as its length (u64) and bytes, little-endian. The index,
``index.jsonl``, has one line per version with its round, file and SHA-256
(the same digest the audit log records).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from strategies.he_fedavg import batch_digest

_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def write_batch(path: Path, batch: list[bytes]) -> None:
    """Write ``batch`` to ``path`` atomically (temporary file, then rename)."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(_COUNT.pack(len(batch)))
        for part in batch:
            handle.write(_LENGTH.pack(len(part)))
            handle.write(part)
    os.replace(temporary, path)


def read_batch(path: Path) -> list[bytes]:
    """Read a batch written by ``write_batch``.

    Raises
    ------
    ValueError
        If the file is truncated or has trailing bytes.
    """
    data = Path(path).read_bytes()
    if len(data) < _COUNT.size:
        raise ValueError(f"{path} is too short to be a model version file.")
    (count,) = _COUNT.unpack_from(data, 0)
    offset = _COUNT.size
    batch = []
    for index in range(count):
        if offset + _LENGTH.size > len(data):
            raise ValueError(f"{path} is truncated in element {index}.")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise ValueError(f"{path} is truncated in element {index}.")
        batch.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ValueError(f"{path} has {len(data) - offset} unexpected trailing bytes.")
    return batch


class EncryptedVersionStore:
    """Stores each encrypted global model version under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, server_round: int, batch: list[bytes]) -> str:
        """Write the version of ``server_round`` and index it; return its file name."""
        name = f"round_{server_round:04d}.ckks"
        write_batch(self.directory / name, batch)
        entry = {"round": server_round, "file": name, "sha256": batch_digest(batch), "bytes": sum(len(p) for p in batch)}
        with (self.directory / "index.jsonl").open("a", encoding="utf-8") as index:
            index.write(json.dumps(entry, sort_keys=True) + "\n")
        return name

    def latest(self) -> tuple[int, list[bytes]] | None:
        """Return (round, batch) of the newest indexed version, checking its hash; None if there is none."""
        index = self.directory / "index.jsonl"
        if not index.exists():
            return None
        entries = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not entries:
            return None
        entry = entries[-1]
        batch = read_batch(self.directory / entry["file"])
        if batch_digest(batch) != entry["sha256"]:
            raise ValueError(f"Model version {entry['file']} does not match its recorded SHA-256.")
        return int(entry["round"]), batch

"""A site's files across ClientApp processes: key paths, state folder and model cache."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from clients.node_state import CACHE_DIR, ModelCache, check_node_files, state_dir


def test_cache_returns_matching_version(tmp_path: Path) -> None:
    cache = ModelCache.for_node({"state-dir": str(tmp_path / "state")})
    state = OrderedDict(weight=torch.arange(4, dtype=torch.float32))

    cache.put("a" * 64, state, server_round=3)

    # A new object, as in the next ClientApp process.
    cached = ModelCache(tmp_path / "state" / CACHE_DIR).get("a" * 64)
    assert cached is not None
    assert torch.equal(cached["weight"], state["weight"])
    assert ModelCache(tmp_path / "state" / CACHE_DIR).get("b" * 64) is None


def test_cache_keeps_latest_only(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    cache.put("a" * 64, OrderedDict(weight=torch.zeros(2)), server_round=1)
    cache.put("b" * 64, OrderedDict(weight=torch.ones(2)), server_round=2)

    assert cache.get("a" * 64) is None
    assert torch.equal(cache.get("b" * 64)["weight"], torch.ones(2))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["global-latest.json", "global-latest.pt"]


def test_cache_ignores_corrupt_index(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    (tmp_path / "global-latest.json").write_text("{not json")

    assert cache.get("a" * 64) is None


def test_no_state_dir_no_cache() -> None:
    assert ModelCache.for_node({"partition-id": 0}) is None
    assert state_dir({}) is None


def test_state_dir_created(tmp_path: Path) -> None:
    folder = state_dir({"state-dir": str(tmp_path / "a" / "b")})

    assert folder == tmp_path / "a" / "b"
    assert folder.is_dir()


def test_missing_key_path_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ckks-secret-dir=.*/nowhere does not exist"):
        check_node_files({"signing-key": str(tmp_path), "ckks-secret-dir": str(tmp_path / "nowhere")})
    check_node_files({"signing-key": str(tmp_path)})

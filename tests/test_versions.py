"""Model versions: the index in SQLite and PostgreSQL, and `fedseal models list` and `export` on real model files."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from sqlalchemy.exc import IntegrityError

from clients.encrypted import state_hash
from provenance.versions import ModelVersion, ModelVersionRow, VersionIndex, new_version
from server.cli import main as cli_main
from server.model_store import write_batch
from strategies.he_fedavg import batch_digest

POSTGRES_ENV = "FEDSEAL_TEST_POSTGRES_URL"


def _state(seed: int) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(weight=torch.randn(5, 3, generator=generator), bias=torch.randn(5, generator=generator))


def _version(run_id: str, number: int, path: Path, model_hash: str = "a" * 64, encrypted: bool = False) -> ModelVersion:
    return new_version(run_id, number, number - 1 or None, number, model_hash, path, encrypted)


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VersionIndex]:
    """An empty version index: an SQLite file, or the test PostgreSQL database with the table dropped."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    else:
        url = os.environ.get(POSTGRES_ENV)
        if not url:
            pytest.skip(f"{POSTGRES_ENV} is not set; .ci/run starts a PostgreSQL server and sets it")
    index = VersionIndex(url)
    ModelVersionRow.__table__.drop(index._engine, checkfirst=True)
    index = VersionIndex(url)
    yield index
    ModelVersionRow.__table__.drop(index._engine, checkfirst=True)
    index.close()


# --- the index ------------------------------------------------------------------


def test_index_lists_by_run_and_version(index: VersionIndex, tmp_path: Path) -> None:
    for run_id, number in (("run-b", 1), ("run-a", 2), ("run-a", 1)):
        index.add(_version(run_id, number, tmp_path / f"{run_id}-{number}.pt"))

    listed = index.list()

    assert [(v.run_id, v.version) for v in listed] == [("run-a", 1), ("run-a", 2), ("run-b", 1)]
    assert [v.parent for v in listed] == [None, 1, None]
    assert [(v.run_id, v.version) for v in index.list("run-a")] == [("run-a", 1), ("run-a", 2)]
    assert listed[0].path == str(tmp_path / "run-a-1.pt")
    assert listed[0].created_at.tzinfo is not None
    assert abs(datetime.now(timezone.utc) - listed[0].created_at) < timedelta(minutes=5)


def test_index_get_needs_run_when_ambiguous(index: VersionIndex, tmp_path: Path) -> None:
    index.add(_version("run-a", 1, tmp_path / "a.pt"))
    index.add(_version("run-b", 1, tmp_path / "b.pt"))

    assert index.get(1, "run-b").path == str(tmp_path / "b.pt")
    with pytest.raises(KeyError, match=r"Version 1 exists in several runs \(run-a, run-b\); pass --run."):
        index.get(1)
    with pytest.raises(KeyError, match="No model version 3 in run run-a; see `fedseal models list`."):
        index.get(3, "run-a")


def test_index_stores_metrics_nan_as_null(index: VersionIndex, tmp_path: Path) -> None:
    index.add(_version("run-a", 1, tmp_path / "a.pt"))

    index.set_metrics("run-a", 1, {"roc_auc": 0.9375, "pr_auc": math.nan})

    assert index.get(1).metrics == {"roc_auc": 0.9375, "pr_auc": None}


def test_index_discards_uncommitted_versions(index: VersionIndex, tmp_path: Path) -> None:
    for number in (1, 2, 3):
        index.add(_version("run-a", number, tmp_path / f"{number}.pt"))
    index.add(_version("run-b", 3, tmp_path / "b3.pt"))

    dropped = index.discard_after("run-a", 1)

    assert dropped == 2
    assert [(v.run_id, v.version) for v in index.list()] == [("run-a", 1), ("run-b", 3)]


def test_index_rejects_duplicate_version(index: VersionIndex, tmp_path: Path) -> None:
    index.add(_version("run-a", 1, tmp_path / "a.pt"))

    with pytest.raises(IntegrityError, match="uq_run_version|UNIQUE constraint failed"):
        index.add(_version("run-a", 1, tmp_path / "again.pt"))
    assert len(index.list()) == 1


def test_index_bad_url_names_fix() -> None:
    with pytest.raises(RuntimeError, match="Cannot open the model version database nosuchdriver://") as raised:
        VersionIndex("nosuchdriver://user:secret-pw@host/db")

    assert "secret-pw" not in str(raised.value)


# --- the command line -----------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with two plaintext versions and one encrypted version, indexed in its registry.sqlite."""
    folder = tmp_path / "run"
    (folder / "models").mkdir(parents=True)
    index = VersionIndex(f"sqlite:///{folder / 'registry.sqlite'}")
    for number in (1, 2):
        path = folder / "models" / f"version_{number:04d}.pt"
        torch.save(_state(number), path)
        index.add(_version("run-a", number, path, state_hash(_state(number))))
    index.set_metrics("run-a", 2, {"roc_auc": 0.91234567})

    batch = [b"ciphertext-0", b"ciphertext-1"]
    encrypted = folder / "models" / "version_0001.ckks"
    write_batch(encrypted, batch)
    index.add(ModelVersion("run-e", 1, None, 1, batch_digest(batch), str(encrypted), True, {}, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)))
    index.close()
    return folder


def test_list_json_has_full_values(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["models", "list", "--db", str(run_dir), "--format", "json"])

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [(r["run_id"], r["version"]) for r in records] == [("run-a", 1), ("run-a", 2), ("run-e", 1)]
    assert records[0]["model_hash"] == state_hash(_state(1))
    assert records[1]["parent"] == 1
    assert records[1]["metrics"] == {"roc_auc": 0.91234567}
    assert records[2]["encrypted"] is True
    assert records[2]["created"] == "2026-01-02T03:04:05+00:00"


def test_list_table_not_cropped_in_pipe(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["models", "list", "--db", str(run_dir), "--run", "run-a"])

    output = capsys.readouterr().out
    assert code == 0
    assert state_hash(_state(2))[:16] in output
    assert "roc_auc=0.9123" in output
    assert "encrypted" in output
    assert "run-e" not in output


def test_list_missing_run_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["models", "list", "--db", str(tmp_path / "missing")])

    assert code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'} not found; pass a run directory or a SQLAlchemy URL with --db.\n"


def test_export_copies_checked_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new" / "folder" / "model_v2.pt"

    code = cli_main(["models", "export", "2", "--db", str(run_dir), "--run", "run-a", "--out", str(out)])

    assert code == 0
    assert out.read_bytes() == (run_dir / "models" / "version_0002.pt").read_bytes()
    assert state_hash(torch.load(out)) == state_hash(_state(2))
    assert f"Version 2 (round 2, plaintext) exported to {out}" in capsys.readouterr().out


def test_export_encrypted_version(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "v1.ckks"

    code = cli_main(["models", "export", "1", "--db", str(run_dir), "--run", "run-e", "--out", str(out)])

    assert code == 0
    assert out.read_bytes() == (run_dir / "models" / "version_0001.ckks").read_bytes()


def test_export_rejects_changed_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(_state(99), run_dir / "models" / "version_0001.pt")
    out = tmp_path / "m.pt"

    code = cli_main(["models", "export", "1", "--db", str(run_dir), "--run", "run-a", "--out", str(out)])

    assert code == 1
    assert f"does not match its recorded hash {state_hash(_state(1))}; the file was changed." in capsys.readouterr().err
    assert not out.exists()


def test_export_rejects_truncated_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = run_dir / "models" / "version_0001.pt"
    path.write_bytes(path.read_bytes()[:40])

    code = cli_main(["models", "export", "1", "--db", str(run_dir), "--run", "run-a", "--out", str(tmp_path / "m.pt")])

    assert code == 1
    assert "cannot be read as a model file" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_export_missing_file_named(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (run_dir / "models" / "version_0002.pt").unlink()

    code = cli_main(["models", "export", "2", "--db", str(run_dir), "--run", "run-a", "--out", str(tmp_path / "m.pt")])

    assert code == 1
    assert capsys.readouterr().err == f"error: version 2's file {run_dir / 'models' / 'version_0002.pt'} not found; it was moved or deleted after the run.\n"


def test_export_ambiguous_version_needs_run(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["models", "export", "1", "--db", str(run_dir), "--out", str(tmp_path / "m.pt")])

    assert code == 1
    assert capsys.readouterr().err == "error: Version 1 exists in several runs (run-a, run-e); pass --run.\n"

"""`fedseal models decrypt` on a he_robust run: a scoring drift that EncryptedRobust itself wrote."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.encrypted import flatten
from crypto.ckks import scoring
from server.cli import main
from server.federation import _save_encrypted_checkpoint
from server.keys import (
    NODE_DIR,
    init_ckks_keys,
    init_scoring_keys,
    load_server_scoring_context,
)
from server.model_store import EncryptedVersionStore, read_batch
from strategies.he_robust import RuleSettings
from tests.test_he_robust import (
    EXAMPLES,
    LENGTH,
    NODE_IDS,
    FederationGrid,
    make_strategy,
    replies_for,
    run_round,
)


def _initial() -> OrderedDict[str, torch.Tensor]:
    # 4500 parameters, the length the strategy helper of tests/test_he_robust.py scores.
    return OrderedDict(weight=torch.linspace(-1.0, 1.0, 4400).reshape(44, 100), bias=torch.zeros(100))


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """Run two norm_bound rounds of EncryptedRobust and save the run's files as the ServerApp does.

    Returns the run folder, the keys folder and the expected final parameters.
    """
    from flwr.supercore.task_identity import TaskIdentity

    # The autouse fixture that sets these runs per test, after a module fixture.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    keys = tmp_path_factory.mktemp("keys")
    init_ckks_keys(keys, "compact")
    init_scoring_keys(keys)
    secret = scoring.read_scoring_secret_context(keys / NODE_DIR)
    public = load_server_scoring_context(keys)

    rng = np.random.default_rng(11)
    direction = rng.normal(0.0, 0.02, LENGTH)
    updates = np.stack([direction + rng.normal(0.0, 0.01, LENGTH) for _ in NODE_IDS])
    uploads = [scoring.encrypt_for_scoring(secret, row) for row in updates]

    run_dir = tmp_path_factory.mktemp("run")
    strategy = make_strategy(public, RuleSettings(rule="norm_bound", norm_multiple=3.0))
    strategy.versions = EncryptedVersionStore(run_dir / "models")
    grid = FederationGrid(keys / NODE_DIR, tmp_path_factory.mktemp("node-state"), secret)
    for server_round in (1, 2):
        arrays, _ = run_round(strategy, grid, server_round, replies_for(uploads))
        assert arrays is not None
    initial = _initial()
    _save_encrypted_checkpoint(run_dir, strategy, initial)

    weights = EXAMPLES / EXAMPLES.sum()
    expected = flatten(initial) + 2.0 * (weights @ updates)
    return run_dir, keys, expected


def _decrypt(run_dir: Path, secret_dir: Path, out: Path) -> int:
    return main(["models", "decrypt", str(run_dir), "--secret-dir", str(secret_dir), "--out", str(out)])


def test_final_drift_matches_weighted_updates(robust_run, tmp_path: Path) -> None:
    run_dir, keys, expected = robust_run

    code = _decrypt(run_dir, keys / NODE_DIR, tmp_path / "model.pt")

    assert code == 0
    decrypted = torch.load(tmp_path / "model.pt")
    assert list(decrypted) == ["weight", "bias"]
    assert decrypted["weight"].shape == (44, 100)
    assert float(np.max(np.abs(flatten(decrypted) - expected))) <= 1e-6


def test_final_file_is_last_version(robust_run) -> None:
    run_dir, _, _ = robust_run

    latest = EncryptedVersionStore(run_dir / "models").latest()

    assert latest is not None
    assert latest[0] == 2
    assert read_batch(run_dir / "model_final.ckks") == latest[1]


def test_missing_scoring_secret_names_flag(robust_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, _, _ = robust_run
    # A he_fedavg key folder: the aggregation secret is there, the scoring one is not.
    init_ckks_keys(tmp_path / "fedavg-keys", "compact")

    code = _decrypt(run_dir, tmp_path / "fedavg-keys" / NODE_DIR, tmp_path / "m.pt")

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert scoring.SCORING_SECRET_CONTEXT_FILENAME in error
    assert "`fedseal keys init --scoring`" in error
    assert not (tmp_path / "m.pt").exists()


def test_missing_folder_exits_2(robust_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, _, _ = robust_run

    code = _decrypt(run_dir, tmp_path / "none", tmp_path / "m.pt")

    assert code == 2
    assert "no scoring secret context" in capsys.readouterr().err


def test_other_federation_key_rejected(robust_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, keys, _ = robust_run
    init_scoring_keys(tmp_path / "other")

    code = _decrypt(run_dir, tmp_path / "other" / NODE_DIR, tmp_path / "m.pt")

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert "does not match the key the model" in error
    assert f"(fingerprint {scoring.read_scoring_secret_context(tmp_path / 'other' / NODE_DIR).fingerprint[:16]})" in error
    assert f"(fingerprint {scoring.read_scoring_secret_context(keys / NODE_DIR).fingerprint[:16]})" in error
    assert not (tmp_path / "m.pt").exists()


def test_corrupted_drift_exits_1(robust_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, keys, _ = robust_run
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "model_initial.pt").write_bytes((run_dir / "model_initial.pt").read_bytes())
    data = bytearray((run_dir / "model_final.ckks").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model_final.ckks").write_bytes(bytes(data))

    code = _decrypt(copy, keys / NODE_DIR, tmp_path / "m.pt")

    assert code == 1
    assert "CRC-32" in capsys.readouterr().err


def test_decrypt_creates_output_folder(robust_run, tmp_path: Path) -> None:
    run_dir, keys, expected = robust_run
    out = tmp_path / "exports" / "site-0" / "model.pt"

    code = _decrypt(run_dir, keys / NODE_DIR, out)

    assert code == 0
    assert float(np.max(np.abs(flatten(torch.load(out)) - expected))) <= 1e-6

"""`fedseal models decrypt`: the final encrypted model, and errors that name the fix."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from clients.encrypted import flatten
from crypto import ckks
from server.cli import main
from server.model_store import write_batch


@pytest.fixture(scope="module")
def secret() -> ckks.SecretContext:
    return ckks.generate_context("compact")


def _encrypted_run(folder: Path, secret: ckks.SecretContext) -> OrderedDict[str, torch.Tensor]:
    initial = OrderedDict(weight=torch.zeros(3, 2), bias=torch.ones(3))
    drift = torch.linspace(-0.5, 0.5, 9).numpy()
    folder.mkdir(parents=True)
    torch.save(initial, folder / "model_initial.pt")
    batch = ckks.aggregate_batches([ckks.encrypt_update(secret, drift, 1.0)], secret.public, 9).batch
    write_batch(folder / "model_final.ckks", batch)
    return OrderedDict(weight=torch.tensor(drift[:6]).reshape(3, 2), bias=1.0 + torch.tensor(drift[6:]))


def test_decrypts_final_model(secret, tmp_path: Path) -> None:
    expected = _encrypted_run(tmp_path / "run", secret)
    ckks.write_secret_context(secret, tmp_path / "node")

    code = main(["models", "decrypt", str(tmp_path / "run"), "--secret-dir", str(tmp_path / "node"), "--out", str(tmp_path / "model.pt")])

    assert code == 0
    decrypted = torch.load(tmp_path / "model.pt")
    assert float(abs(flatten(decrypted) - flatten(expected)).max()) < 1e-6


def test_plaintext_run_names_its_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    torch.save(OrderedDict(weight=torch.zeros(1)), tmp_path / "run" / "model_final.pt")

    code = main(["models", "decrypt", str(tmp_path / "run"), "--secret-dir", str(tmp_path), "--out", str(tmp_path / "m.pt")])

    assert code == 2
    assert "the run was not encrypted, so load that file instead" in capsys.readouterr().err


def test_missing_secret_names_folders(secret, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _encrypted_run(tmp_path / "run", secret)

    code = main(["models", "decrypt", str(tmp_path / "run"), "--secret-dir", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt")])

    assert code == 2
    assert "pass --secret-dir the node/ folder written by `fedseal keys init`" in capsys.readouterr().err


def test_other_key_is_named(secret, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _encrypted_run(tmp_path / "run", secret)
    ckks.write_secret_context(ckks.generate_context("compact"), tmp_path / "other")

    code = main(["models", "decrypt", str(tmp_path / "run"), "--secret-dir", str(tmp_path / "other"), "--out", str(tmp_path / "m.pt")])

    error = capsys.readouterr().err
    assert code == 2
    assert "does not match the key the model" in error
    assert f"(fingerprint {ckks.read_secret_context(tmp_path / 'other').fingerprint[:16]})" in error
    assert f"(fingerprint {secret.fingerprint[:16]})" in error
    assert not (tmp_path / "m.pt").exists()

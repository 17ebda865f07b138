"""`fedseal-train` reports a wrong setting or data folder in one line, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _train(tmp_path: Path, data_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSEAL_DATA_DIR": data_dir, "FEDSEAL_OFFLINE": "1"}
    command = [sys.executable, "-m", "server.train", f"hydra.run.dir={tmp_path / 'run'}", "tracking=none", *overrides]
    return subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)


def test_invalid_node_count_one_line(tmp_path: Path) -> None:
    result = _train(tmp_path, str(tmp_path), "nodes=0")

    assert result.returncode == 2
    assert "Invalid setting nodes=0: it must be an integer >= 1" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.e2e
def test_missing_data_folder_one_line(tmp_path: Path) -> None:
    result = _train(tmp_path, str(tmp_path / "nowhere"), "nodes=2", "rounds=1")

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "None of the dataset files" in output
    assert "Set FEDSEAL_DATA_DIR to a folder that contains one of them" in output
    assert "Traceback" not in output

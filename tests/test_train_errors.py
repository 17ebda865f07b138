"""`fedseal-train` reports a wrong setting or data folder in one line, without a traceback."""

from __future__ import annotations

import json
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


def test_run_without_any_training_fails(tmp_path: Path) -> None:
    from server.simulation import NoTrainingError, check_some_training

    reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'... Message: Update has L2 norm 1.3, above strategy.norm_bound=0.5.'>"
    lines = [
        {"phase": "train", "round": 1, "scope": "global", "sampled": 2, "replied": 0, "failures": [f"node 7: {reason}", "node 8: other"]},
        {"phase": "train", "round": 2, "scope": "global", "sampled": 2, "replied": 0, "failures": []},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")

    with pytest.raises(NoTrainingError) as raised:
        check_some_training(tmp_path)

    message = str(raised.value)
    assert message.startswith("No node trained in any of the 2 rounds, so the final model is the initial one.")
    assert "First failure: Update has L2 norm 1.3, above strategy.norm_bound=0.5." in message


def test_run_with_one_reply_passes(tmp_path: Path) -> None:
    from server.simulation import check_some_training

    lines = [
        {"phase": "train", "round": 1, "scope": "global", "sampled": 2, "replied": 0, "failures": ["node 7: down"]},
        {"phase": "train", "round": 2, "scope": "global", "sampled": 2, "replied": 1, "failures": ["node 7: down"]},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")

    check_some_training(tmp_path)


def test_empty_keys_dir_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    result = _train(tmp_path, str(tmp_path), "nodes=2", f"provenance.keys_dir={tmp_path / 'empty'}")

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert f"Invalid setting provenance.keys_dir={tmp_path / 'empty'}: {tmp_path / 'empty' / 'registry.sqlite'} is missing" in output
    assert f"`fedseal keys init --out {tmp_path / 'empty'} --nodes N`" in output
    assert "Traceback" not in output
    assert not (tmp_path / "empty" / "registry.sqlite").exists()


def test_missing_registry_file_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'typo.sqlite'}"

    result = _train(tmp_path, str(tmp_path), "nodes=2", f"provenance.registry_url={url}")

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert f"Invalid setting provenance.registry_url={url}: the SQLite file {tmp_path / 'typo.sqlite'} does not exist" in output
    assert not (tmp_path / "typo.sqlite").exists()


def test_fewer_keys_than_nodes_one_line(tmp_path: Path) -> None:
    from server.cli import main as cli_main

    keys = tmp_path / "keys"
    assert cli_main(["keys", "init", "--out", str(keys), "--nodes", "2"]) == 0

    result = _train(tmp_path, str(tmp_path), "nodes=3", f"provenance.keys_dir={keys}")

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert f"{keys / 'signing' / 'node-2' / 'signing.key'} is missing, but the simulation runs 3 nodes (partitions 0 to 2)" in output
    assert f"`fedseal keys init --out {keys} --nodes 3`" in output
    assert "Traceback" not in output


def test_missing_validator_key_named(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from server.cli import main as cli_main
    from server.config import ConfigError, check_simulation_signing_keys

    keys = tmp_path / "keys"
    assert cli_main(["keys", "init", "--out", str(keys), "--nodes", "3"]) == 0
    cfg = OmegaConf.create({"nodes": 3, "provenance": {"signatures": True, "keys_dir": str(keys)}})

    with pytest.raises(ConfigError) as raised:
        check_simulation_signing_keys(cfg, 4)

    assert f"{keys / 'signing' / 'node-3' / 'signing.key'} is missing, but strategy.rule=trust runs the validator as node 3" in str(raised.value)
    assert f"`fedseal keys init --out {keys} --nodes 3 --validator`" in str(raised.value)

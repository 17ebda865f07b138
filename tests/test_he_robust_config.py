"""Settings, keys and simulation size of strategy=he_robust."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from crypto.ckks import scoring
from server.config import ConfigError, compose_config, validate_config
from server.keys import (
    NODE_DIR,
    SCORING_FINGERPRINT_FILE,
    SERVER_DIR,
    init_scoring_keys,
    load_server_scoring_context,
)
from server.simulation import simulated_supernodes


def he_robust(*overrides: str):
    return compose_config(["strategy=he_robust", "nodes=5", *overrides])


def test_defaults_accepted() -> None:
    validate_config(he_robust())


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.committee_size=6", "strategy.committee_size=6"),
        ("strategy.max_faulty=2", "strategy.max_faulty=2 with strategy.committee_size=3"),
        ("strategy.rule=bulyan", "strategy.rule=bulyan"),
        ("strategy.norm_bound=1000", "strategy.norm_bound=1000"),
        ("strategy.norm_mode=clip", "strategy.norm_mode=clip"),
        ("strategy.preset=compact", "strategy.preset=compact"),
    ],
)
def test_bad_setting_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(he_robust(override))


def test_krum_needs_enough_nodes() -> None:
    with pytest.raises(ConfigError, match="needs more than 2f\\+2"):
        validate_config(he_robust("nodes=4", "strategy.rule=krum", "strategy.num_malicious=1"))


def test_committee_limited_by_sampled_nodes() -> None:
    with pytest.raises(ConfigError, match="drawn from the 2 nodes that train per round"):
        validate_config(he_robust("train.fraction=0.4"))


def test_validator_adds_one_supernode() -> None:
    assert simulated_supernodes(he_robust("strategy.rule=trust")) == 6
    assert simulated_supernodes(he_robust("strategy.rule=krum")) == 5


def test_model_poisoning_needs_simulation_keys(tmp_path: Path) -> None:
    from strategies.factory import RunResources, wrap_robustness

    cfg = he_robust("attack=sign_flip")
    user_keys = RunResources(task=None, run_dir=tmp_path)
    with pytest.raises(ValueError, match="allowed only in a Ray simulation that creates its own keys"):
        wrap_robustness(cfg, object(), None, user_keys)
    with pytest.raises(ValueError, match="allowed only in a Ray simulation"):
        wrap_robustness(cfg, object(), None, None)


def test_model_poisoning_wraps_with_simulation_keys(tmp_path: Path) -> None:
    from strategies.encrypted_attack_simulation import EncryptedAttackSimulation
    from strategies.factory import RunResources, wrap_robustness

    init_scoring_keys(tmp_path / "keys")
    resources = RunResources(task=None, run_dir=tmp_path, extra={"simulation_keys": tmp_path / "keys"})
    wrapped = wrap_robustness(he_robust("attack=sign_flip", "attack.fraction=0.2"), object(), None, resources)

    assert isinstance(wrapped, EncryptedAttackSimulation)
    assert wrapped.attackers


def test_scoring_keys_layout(tmp_path: Path) -> None:
    fingerprint = init_scoring_keys(tmp_path)

    secret_file = tmp_path / NODE_DIR / scoring.SCORING_SECRET_CONTEXT_FILENAME
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert not (tmp_path / SERVER_DIR / scoring.SCORING_SECRET_CONTEXT_FILENAME).exists()
    assert (tmp_path / SCORING_FINGERPRINT_FILE).read_text().strip() == fingerprint
    public = load_server_scoring_context(tmp_path)
    assert isinstance(public, scoring.ScoringPublicContext)
    assert public.fingerprint == fingerprint
    with pytest.raises(FileExistsError, match="--overwrite"):
        init_scoring_keys(tmp_path)


def test_keys_cli_scoring_flag(tmp_path: Path) -> None:
    from server.cli import main

    assert main(["keys", "init", "--out", str(tmp_path), "--scoring"]) == 0
    assert (tmp_path / SERVER_DIR / scoring.SCORING_PUBLIC_CONTEXT_FILENAME).exists()
    assert (tmp_path / NODE_DIR / scoring.SCORING_SECRET_CONTEXT_FILENAME).exists()


def test_deploy_layout_copies_scoring_secret(tmp_path: Path) -> None:
    from deploy.layout import provision

    layout = provision(tmp_path / "state", 2, "compact", tls=False)

    server_side = {path.name for path in layout.server_keys.rglob("*")}
    assert scoring.SCORING_SECRET_CONTEXT_FILENAME not in server_side
    assert scoring.SCORING_PUBLIC_CONTEXT_FILENAME in server_side
    for node in layout.nodes():
        secret_file = node.ckks_dir / scoring.SCORING_SECRET_CONTEXT_FILENAME
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.committee_partitions=[0,0,1]", "give distinct partition ids"),
        ("strategy.committee_partitions=[0,1,5]", r"each in \[0, 4\]"),
        ("strategy.committee_partitions=[0]", "strategy.max_faulty=1 with strategy.committee_size=1"),
    ],
)
def test_bad_fixed_committee_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(he_robust(override))


def test_fixed_committee_needs_every_node_training() -> None:
    with pytest.raises(ConfigError, match="Set train.fraction=1.0"):
        validate_config(he_robust("strategy.committee_partitions=[0,1,2]", "train.fraction=0.6"))


def test_fixed_committee_accepted() -> None:
    validate_config(he_robust("strategy.committee_partitions=[0,2,4]"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.rule=trust", "strategy.root_size=0"], "strategy.root_size=0: the validator trains on that many held-out rows"),
        (["strategy.rule=trust", "strategy.reference_epochs=0"], "strategy.reference_epochs=0: it must be null or an integer >= 1"),
        (["strategy.rule=trust", "data.holdout=100"], "data.holdout=100 with strategy.root_size=200"),
        (["strategy.rule=trust", "strategy.decay=2"], r"strategy.decay=2: it must be in \[0, 1\)"),
        (["strategy.committee_seed=abc"], "strategy.committee_seed=abc: it must be null or an integer"),
        (["strategy.max_faulty=-1"], "strategy.max_faulty=-1: it must be an integer >= 0"),
        (["strategy.rule=multikrum", "strategy.num_selected=10"], "Multi-Krum averages at most n - f = 4 of the 5 updates"),
        (["strategy.rule=multikrum", "strategy.num_selected=0"], "strategy.num_selected=0: it must be null or an integer >= 1"),
        (["strategy.rule=krum", "strategy.num_malicious=-1"], "strategy.num_malicious=-1: it must be null or an integer >= 0"),
    ],
)
def test_bad_rule_setting_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(he_robust(*overrides))


def test_keys_dir_without_scoring_key_named(tmp_path: Path) -> None:
    from server.cli import main

    assert main(["keys", "init", "--out", str(tmp_path)]) == 0

    with pytest.raises(ConfigError, match=f"Create it with `fedseal keys init --out {tmp_path} --scoring`"):
        validate_config(he_robust(f"security.keys_dir={tmp_path}"))


def test_scoring_flag_keeps_existing_aggregation_key(tmp_path: Path) -> None:
    from server.cli import main

    assert main(["keys", "init", "--out", str(tmp_path)]) == 0
    before = (tmp_path / NODE_DIR / "ckks_secret_context.bin").read_bytes()

    assert main(["keys", "init", "--out", str(tmp_path), "--scoring"]) == 0

    assert (tmp_path / NODE_DIR / "ckks_secret_context.bin").read_bytes() == before
    assert (tmp_path / SERVER_DIR / scoring.SCORING_PUBLIC_CONTEXT_FILENAME).exists()
    validate_config(he_robust(f"security.keys_dir={tmp_path}"))


def test_keys_init_negative_nodes_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from server.cli import main

    out = tmp_path / "keys"

    assert main(["keys", "init", "--out", str(out), "--nodes", "-2"]) == 2

    assert "--nodes -2 is negative" in capsys.readouterr().err
    assert not out.exists()

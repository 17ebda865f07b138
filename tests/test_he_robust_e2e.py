"""One Ray simulation of strategy=he_robust with the trust rule and its validator, on real fraud data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.encrypted import flatten, unflatten
from clients.local import build_model, evaluate_model
from crypto.ckks import scoring
from crypto.ckks.scoring.aggregate import EncryptedDrift, decrypt_drift
from provenance.audit import verify_chain
from scenarios.spec import load_all_nodes, scenario_for
from server.config import compose_config, task_spec
from server.federation import robustness_spec
from server.model_store import read_batch
from server.simulation import run_in_simulation
from strategies.signatures import verify_audit_signatures

pytestmark = pytest.mark.e2e


def _mean_primary(scenario, spec, state) -> float:
    model = build_model(scenario, spec.train.seed, state)
    values = [evaluate_model(scenario, model, node)[scenario.primary_metric] for node in load_all_nodes(spec)]
    return float(np.nanmean(values))


def test_trust_run_beats_initial_model(tmp_path: Path, data_root: Path) -> None:
    overrides = ["nodes=3", "rounds=2", f"data.root={data_root}", f"output_dir={tmp_path}", "strategy=he_robust", "strategy.rule=trust", "baselines=false", "tracking=none"]
    cfg = compose_config(overrides)
    summary = run_in_simulation(cfg, tmp_path)

    spec = robustness_spec(cfg, task_spec(cfg))
    scenario = scenario_for(spec)
    initial = torch.load(tmp_path / "model_initial.pt")
    before = _mean_primary(scenario, spec, initial)
    after = summary["federated"]["global"][scenario.primary_metric]
    assert after > before + 0.02, f"{scenario.primary_metric} went from {before} to {after}"

    # The final model decrypts on a key holder and scores what the nodes reported.
    secret = scoring.read_scoring_secret_context(tmp_path / "keys" / "node")
    drift = EncryptedDrift.from_bytes(secret, read_batch(tmp_path / "model_final.ckks")[0], flatten(initial).size)
    final = unflatten(flatten(initial) + decrypt_drift(secret, drift), initial)
    assert abs(_mean_primary(scenario, spec, final) - after) <= 1e-6

    assert verify_chain(tmp_path / "audit.jsonl").ok
    # The validator signed its reference with its own key and the server accepted it each round.
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted(entry["round"] for entry in audit if entry["event"] == "reference_accepted") == [1, 2]
    assert not [entry for entry in audit if entry["event"] == "reference_rejected"]
    assert verify_audit_signatures(tmp_path / "audit.jsonl").ok
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r["phase"] == "he_robust"]
    assert sorted({r["round"] for r in events if r["event"] == "reference"}) == [1, 2]
    assert len([r for r in events if r["event"] == "score"]) == 6
    # The server folder holds only the public scoring context.
    assert not (tmp_path / "keys" / "server" / scoring.SCORING_SECRET_CONTEXT_FILENAME).exists()

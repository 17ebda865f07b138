"""One federated training run, from initial model to ``summary.json``.

``run_federation`` is the body of the ServerApp in every runtime. Its steps:

1. Build the task for the nodes and the seeded initial model.
2. Run the strategy stack for ``rounds`` rounds through the Flower grid.
3. Save the final model checkpoint.
4. Train the baselines (when the server can see the data) and write the summary.

The experiment tracker (``tracking``) follows the run through the run log
and receives the summary and the final model at the end.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from clients.encrypted import flatten, state_hash
from clients.local import build_model, evaluate_model
from privacy.recording import privacy_summary
from provenance import run_state
from provenance.audit import AuditLog
from provenance.run_state import restore_random_state
from provenance.versions import VersionIndex
from scenarios.spec import TASK_KEY, TaskSpec, load_all_nodes, scenario_for
from server import baselines
from server.config import config_hash, task_spec, validate_config
from server.model_store import read_batch, write_batch
from server.run_log import RunLog
from server.summary import mean_metrics, node_gains, print_table, write_summary
from strategies.arrival_hashing import ArrivalHashingGrid
from strategies.factory import build_strategy
from strategies.factory import RunResources, innermost
from strategies.signatures import setup_signatures, signatures_enabled
from tracking import open_tracker

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model_final.pt"
ENCRYPTED_CHECKPOINT_NAME = "model_final.ckks"
INITIAL_MODEL_NAME = "model_initial.pt"


def _pooled_evaluator(spec: TaskSpec, run_log: RunLog, round_offset: int = 0):
    """Return Flower's ``evaluate_fn``: score the global model on the pooled test split.

    ``round_offset`` maps Flower's round numbers of a resumed run to the
    run's own; the resumed starting model was already scored before the crash.
    """
    scenario = scenario_for(spec)
    pooled = scenario.pool(load_all_nodes(spec))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if round_offset and server_round == 0:
            return None
        started = time.monotonic()
        model = build_model(scenario, spec.train.seed, arrays.to_torch_state_dict())
        metrics = evaluate_model(scenario, model, pooled)
        run_log.on_server_evaluate(server_round + round_offset, metrics, seconds=time.monotonic() - started)
        return MetricRecord(metrics)

    return evaluate


def _restore(strategy: Any, previous: run_state.RunState | None, run_dir: Path, initial_state: dict, encrypted: bool) -> dict:
    """Give a resumed stack its committed state; return the plaintext model to start from."""
    if previous is None:
        return initial_state

    restore_random_state(previous.random_state)
    strategy.restore_state(previous.strategy_state)
    if strategy.versions is not None:
        dropped = strategy.versions.discard_after(previous.run_id, previous.version)
        if dropped and strategy.audit is not None:
            strategy.audit.append("versions_discarded", after_version=previous.version, count=dropped, reason="made by a round that did not commit before the restart")
    model_path = run_dir / run_state.STATE_DIR / previous.model_file
    logger.info("Resuming run %s after round %d from %s", previous.run_id, previous.server_round, model_path)
    if model_path.suffix == ".pt":
        return torch.load(model_path)
    if model_path.suffix == ".ckks" and encrypted:
        innermost(strategy).restore_drift(read_batch(model_path))
    return initial_state


def run_federation(grid: Grid, cfg: DictConfig, run_dir: Path, simulation_keys: Path | None = None) -> dict[str, Any]:
    """Run federated training as configured by ``cfg``; write outputs to ``run_dir``.

    Returns the summary that is also written to ``run_dir/summary.json``. The
    tracker's run is closed as failed when training raises. ``simulation_keys``
    is set only by the Ray simulation, for keys it created itself.
    """
    tracker = open_tracker(cfg, run_dir)
    try:
        return _run_federation(grid, cfg, run_dir, tracker, simulation_keys)
    except BaseException:
        tracker.finish(None, None)
        raise


def _run_federation(grid: Grid, cfg: DictConfig, run_dir: Path, tracker: Any, simulation_keys: Path | None = None) -> dict[str, Any]:
    started = time.monotonic()
    validate_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")

    encrypted = bool(cfg.strategy.get("encrypted", False))
    spec = robustness_spec(cfg, task_spec(cfg, run_dir))
    scenario = scenario_for(spec)
    num_rounds = int(cfg.rounds)
    initial = build_model(scenario, spec.train.seed)

    previous = run_state.load(run_dir) if cfg.resume else None
    if cfg.resume and previous is None:
        logger.warning("resume=true but %s has no committed round; starting from round 1", run_dir)
    audit = AuditLog(run_dir / "audit.jsonl", recover=previous is not None)
    resources = RunResources(
        task=ConfigRecord({TASK_KEY: spec.to_json()}),
        run_dir=run_dir,
        audit=audit,
        run_id=previous.run_id if previous else uuid.uuid4().hex,
        versions=VersionIndex(str(cfg.versions_db or f"sqlite:///{run_dir / 'registry.sqlite'}")),
        round_offset=previous.server_round if previous else 0,
        start_version=previous.version if previous else 0,
        start_hash=previous.model_hash if previous else state_hash(initial.state_dict()),
    )
    if encrypted and str(cfg.strategy.name) == "he_robust":
        spec = scoring_setup(cfg, spec, resources, initial.state_dict(), run_dir)
    elif encrypted:
        spec = encryption_setup(cfg, spec, resources, initial.state_dict())
        resources.task = ConfigRecord({TASK_KEY: spec.to_json()})

    logger.info("Run starts: scenario=%s strategy=%s nodes=%d rounds=%d seed=%d, outputs in %s", spec.scenario, cfg.strategy.name, cfg.nodes, num_rounds, cfg.seed, run_dir)
    audit.append(
        "run_resume" if previous else "run_start",
        run_id=resources.run_id,
        after_round=resources.round_offset,
        scenario=spec.scenario,
        strategy=str(cfg.strategy.name),
        config_hash=config_hash(cfg),
        code_version=code_version(),
        initial_model_hash=state_hash(initial.state_dict()),
        ckks_fingerprint=(spec.encryption or {}).get("fingerprint"),
    )
    if spec.privacy:
        audit.append("privacy_setup", mode=spec.privacy["name"], settings=spec.privacy)
    if spec.attack:
        audit.append("attack_setup", attack=spec.attack["name"], fraction=spec.attack["fraction"], seed=spec.attack["seed"], attackers=spec.attack["attackers"])
    spec = setup_signatures(cfg, spec, resources, run_dir)
    resources.task = ConfigRecord({TASK_KEY: spec.to_json()})

    run_log = RunLog(run_dir / "metrics.jsonl", num_rounds, scenario.primary_metric, resume_after=resources.round_offset if previous else None, quiet=bool(cfg.get("quiet", False)))
    # TODO: a resumed run starts a new tracker run; the rounds before the restart stay in the first one.
    tracker.attach(run_log, list(scenario.metric_names))
    # The trust strategy trains on the spec's holdout rows and reports to the run log.
    resources.extra.update(spec=spec, sink=run_log, simulation_keys=simulation_keys)
    strategy = build_strategy(cfg, run_log, resources)
    start_state = _restore(strategy, previous, run_dir, initial.state_dict(), encrypted)
    # An encrypted global model cannot be scored on the server.
    evaluate_fn = _pooled_evaluator(spec, run_log, resources.round_offset) if cfg.evaluate.server_side and not encrypted else None

    remaining = num_rounds - resources.round_offset
    # Signature checks hash every update; hashing each one as it arrives keeps that work off the end of the round.
    if signatures_enabled(cfg):
        grid = ArrivalHashingGrid(grid)
    try:
        if remaining > 0:
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(start_state),
                num_rounds=remaining,
                timeout=float(cfg.runtime.timeout_s),
                train_config=ConfigRecord({TASK_KEY: spec.to_json()}),
                evaluate_config=ConfigRecord({TASK_KEY: spec.to_json()}),
                evaluate_fn=evaluate_fn,
            )
            final_arrays = result.arrays if len(result.arrays) else ArrayRecord(start_state)
        else:
            final_arrays = ArrayRecord(start_state)
    finally:
        run_log.close()
        if isinstance(grid, ArrivalHashingGrid):
            grid.close()
    federated_seconds = time.monotonic() - started

    if encrypted:
        final_state = None
        _save_encrypted_checkpoint(run_dir, innermost(strategy), initial.state_dict())
    else:
        final_state = final_arrays.to_torch_state_dict()
        torch.save(final_state, run_dir / CHECKPOINT_NAME)
    audit.append("run_end", rounds=num_rounds, seconds=round(federated_seconds, 2))

    summary = _summarize(cfg, spec, run_log, final_state, num_rounds)
    summary["checkpoint"] = ENCRYPTED_CHECKPOINT_NAME if encrypted else CHECKPOINT_NAME
    summary["seconds"] = {"federated": round(federated_seconds, 2), "total": round(time.monotonic() - started, 2)}
    summary["parameters"] = int(sum(tensor.numel() for tensor in initial.state_dict().values() if tensor.is_floating_point()))
    summary["attack"] = spec.attack or {"name": "none", "fraction": 0.0, "attackers": []}
    privacy = privacy_summary(strategy)
    if privacy is not None:
        summary["privacy"] = privacy
    write_summary(run_dir / "summary.json", summary)
    tracker.finish(json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), run_dir / summary["checkpoint"])
    print_table(summary)
    logger.info("Run finished in %.1f s; summary in %s", time.monotonic() - started, run_dir / "summary.json")
    return summary


def robustness_spec(cfg: DictConfig, spec: TaskSpec) -> TaskSpec:
    """Return ``spec`` with the server's holdout rows and the simulated attack filled in.

    ``data.holdout`` rows are reserved for the server; with ``strategy=trust``
    and ``data.holdout=0`` the holdout is ``strategy.root_size``. The attack
    entry names the attacker partition ids, so nodes can poison their data.

    Raises
    ------
    ValueError
        If a holdout is set for a scenario that cannot reserve rows.
    """
    from dataclasses import replace

    from scenarios.base import Scenario
    from strategies.attack_simulation import AttackSettings, attack_spec

    holdout = int(cfg.data.get("holdout") or 0)
    trust = str(cfg.strategy.name) == "trust" or (str(cfg.strategy.name) == "he_robust" and str(cfg.strategy.get("rule")) == "trust")
    if trust and holdout == 0:
        holdout = int(cfg.strategy.root_size)
    if holdout and type(scenario_for(spec)).load_holdout is Scenario.load_holdout:
        raise ValueError(f"Scenario {spec.scenario!r} cannot reserve rows for the server; set data.holdout=0 and use a strategy other than trust.")

    attack = attack_spec(AttackSettings.from_config(cfg.get("attack")), int(cfg.nodes))
    return replace(spec, partition=replace(spec.partition, holdout=holdout), attack=attack)


def encryption_setup(cfg: DictConfig, spec: TaskSpec, resources: RunResources, initial_state: dict) -> TaskSpec:
    """Load the public CKKS context, run the preflight, and return ``spec`` with its encryption settings.

    Raises
    ------
    crypto.ckks.PreflightError
        If ``rounds`` updates of ``security.update_bound`` could outgrow the preset's headroom.
    """
    from dataclasses import replace

    from crypto import ckks
    from server.keys import NODE_DIR, load_server_context

    if not cfg.security.keys_dir:
        raise ValueError("security.keys_dir is not set; run `fedseal keys init --out DIR` and pass security.keys_dir=DIR.")
    public = load_server_context(Path(cfg.security.keys_dir))
    if public.preset.name != str(cfg.security.preset):
        raise ValueError(f"The keys in {cfg.security.keys_dir} use preset {public.preset.name}, but security.preset={cfg.security.preset}; make them match.")

    # One round's sum: nodes updates whose weights add up to 1. The drift
    # accumulated over rounds is checked by the nodes, which see it after
    # decrypting (clients.encrypted.global_state).
    ckks.preflight(public.preset, num_nodes=int(cfg.nodes), norm_bound=float(cfg.security.update_bound))

    resources.public_context = public
    resources.num_parameters = int(flatten(initial_state).size)
    resources.initial_hash = state_hash(initial_state)
    encryption = {
        "preset": public.preset.name,
        "fingerprint": public.fingerprint,
        "secret_dir": str(Path(cfg.security.keys_dir) / NODE_DIR),
        "update_bound": float(cfg.security.update_bound),
    }
    return replace(spec, encryption=encryption)


def scoring_setup(cfg: DictConfig, spec: TaskSpec, resources: RunResources, initial_state: dict, run_dir: Path) -> TaskSpec:
    """Load the public scoring context for ``strategy=he_robust`` and return ``spec`` with its scoring settings.

    The server process loads ``keys_dir/server`` only, so it never has the
    scoring secret key.

    Raises
    ------
    ValueError
        If ``security.keys_dir`` is unset, or its scoring key uses another preset.
    crypto.ckks.PreflightError
        If ``strategy.norm_bound`` is above what the preset's statistics can hold.
    """
    from dataclasses import replace

    from crypto.ckks.scoring import check_scoring_bound
    from server.config import uses_validator
    from server.keys import NODE_DIR, load_server_scoring_context

    if not cfg.security.keys_dir:
        raise ValueError("security.keys_dir is not set; run `fedseal keys init --scoring --out DIR` and pass security.keys_dir=DIR.")
    public = load_server_scoring_context(Path(cfg.security.keys_dir))
    if public.preset.name != str(cfg.strategy.preset):
        raise ValueError(f"The scoring key in {cfg.security.keys_dir} uses preset {public.preset.name}, but strategy.preset={cfg.strategy.preset}; make them match.")
    check_scoring_bound(public.preset, float(cfg.strategy.norm_bound))

    resources.public_context = public
    resources.num_parameters = int(flatten(initial_state).size)
    resources.initial_hash = state_hash(initial_state)
    encryption = {
        "scheme": "scoring",
        "preset": public.preset.name,
        "fingerprint": public.fingerprint,
        "secret_dir": str(Path(cfg.security.keys_dir) / NODE_DIR),
        # Simulated nodes keep their committee budgets here; a SuperNode's own state-dir wins.
        "state_dir": str(run_dir / "node-state"),
        "norm_bound": float(cfg.strategy.norm_bound),
        "validator": uses_validator(cfg),
        "reference_epochs": cfg.strategy.get("reference_epochs"),
    }
    return replace(spec, encryption=encryption)


def _save_encrypted_checkpoint(run_dir: Path, strategy: Any, initial_state: dict) -> None:
    """Write the public initial model and the final encrypted drift (global = initial + drift)."""
    torch.save(initial_state, run_dir / INITIAL_MODEL_NAME)
    if strategy.drift is not None:
        write_batch(run_dir / ENCRYPTED_CHECKPOINT_NAME, strategy.drift)


def code_version() -> str:
    """Return the package version and, inside a git checkout, the commit."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("fedseal")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package}+{commit}" if commit else package


def _summarize(cfg: DictConfig, spec: TaskSpec, run_log: RunLog, final_state: dict | None, num_rounds: int) -> dict[str, Any]:
    """Assemble the summary sections from the run log and, if enabled, the baselines."""
    scenario = scenario_for(spec)
    summary: dict[str, Any] = {
        "scenario": spec.scenario,
        "strategy": str(cfg.strategy.name),
        "primary_metric": scenario.primary_metric,
        "metric_names": list(scenario.metric_names),
        "nodes": int(cfg.nodes),
        "rounds": num_rounds,
        "seed": int(cfg.seed),
        "checkpoint": CHECKPOINT_NAME,
    }

    federated_nodes = {str(node): metrics for node, metrics in run_log.last_node_evaluation.items()}
    if run_log.server_evaluations:
        summary["global_source"] = "pooled test split"
        summary["round_0"] = {"global": run_log.server_evaluations.get(0, {})}
        summary["federated"] = {"global": run_log.server_evaluations[max(run_log.server_evaluations)], "nodes": federated_nodes}
    else:
        summary["global_source"] = "mean over nodes"
        summary["federated"] = {"global": mean_metrics(federated_nodes), "nodes": federated_nodes}

    if not cfg.baselines:
        return summary

    nodes = load_all_nodes(spec)
    if not federated_nodes and final_state is not None:
        # No evaluate round ran (evaluate.fraction=0): score the final model here.
        model = build_model(scenario, spec.train.seed, final_state)
        federated_nodes = {str(node.node): evaluate_model(scenario, model, node) for node in nodes}
        summary["federated"]["nodes"] = federated_nodes

    summary["centralized"] = baselines.centralized(scenario, spec, nodes, num_rounds)
    local = baselines.local_only(scenario, spec, nodes, num_rounds)
    local["mean"] = mean_metrics(local["nodes"])
    summary["local_only"] = local
    summary["gain"] = node_gains(federated_nodes, local["nodes"], tuple(scenario.gain_metrics))

    # Compare like with like: pooled-test scores, or means over the nodes' own test splits.
    primary = scenario.primary_metric
    centralized_reference = summary["centralized"]["global"]
    if not run_log.server_evaluations:
        centralized_reference = mean_metrics(summary["centralized"]["nodes"])
        summary["centralized"]["node_mean"] = centralized_reference
    federated_value = summary["federated"]["global"].get(primary, float("nan"))
    summary["gap_to_centralized"] = {primary: float(federated_value) - float(centralized_reference[primary])}
    return summary

"""One federated training run, from initial model to ``summary.json``.

``run_federation`` is the body of the ServerApp in every runtime. Its steps:

1. Build the task for the nodes and the seeded initial model.
2. Run the strategy stack for ``rounds`` rounds through the Flower grid.
3. Save the final model checkpoint.
4. Train the baselines (when the server can see the data) and write the summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from clients.local import build_model, evaluate_model
from scenarios.spec import TASK_KEY, TaskSpec, load_all_nodes, scenario_for
from server import baselines
from server.config import task_spec, validate_config
from server.run_log import RunLog
from server.summary import mean_metrics, node_gains, print_table, write_summary
from strategies import build_strategy

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model_final.pt"


def _pooled_evaluator(spec: TaskSpec, run_log: RunLog):
    """Return Flower's ``evaluate_fn``: score the global model on the pooled test split."""
    scenario = scenario_for(spec)
    pooled = scenario.pool(load_all_nodes(spec))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_model(scenario, spec.train.seed, arrays.to_torch_state_dict())
        metrics = evaluate_model(scenario, model, pooled)
        run_log.on_server_evaluate(server_round, metrics)
        return MetricRecord(metrics)

    return evaluate


def run_federation(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run federated training as configured by ``cfg``; write outputs to ``run_dir``.

    Returns the summary that is also written to ``run_dir/summary.json``.
    """
    started = time.monotonic()
    validate_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")

    spec = task_spec(cfg)
    scenario = scenario_for(spec)
    num_rounds = int(cfg.rounds)
    logger.info("Run starts: scenario=%s strategy=%s nodes=%d rounds=%d seed=%d, outputs in %s", spec.scenario, cfg.strategy.name, cfg.nodes, num_rounds, cfg.seed, run_dir)

    initial = build_model(scenario, spec.train.seed)
    run_log = RunLog(run_dir / "metrics.jsonl", num_rounds, scenario.primary_metric)
    strategy = build_strategy(cfg, run_log)
    evaluate_fn = _pooled_evaluator(spec, run_log) if cfg.evaluate.server_side else None

    task = ConfigRecord({TASK_KEY: spec.to_json()})
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial.state_dict()),
            num_rounds=num_rounds,
            timeout=float(cfg.runtime.timeout_s),
            train_config=task,
            evaluate_config=ConfigRecord({TASK_KEY: spec.to_json()}),
            evaluate_fn=evaluate_fn,
        )
    finally:
        run_log.close()
    federated_seconds = time.monotonic() - started

    final_state = result.arrays.to_torch_state_dict() if len(result.arrays) else initial.state_dict()
    torch.save(final_state, run_dir / CHECKPOINT_NAME)

    summary = _summarize(cfg, spec, run_log, final_state, num_rounds)
    summary["seconds"] = {"federated": round(federated_seconds, 2), "total": round(time.monotonic() - started, 2)}
    write_summary(run_dir / "summary.json", summary)
    print_table(summary)
    logger.info("Run finished in %.1f s; summary in %s", time.monotonic() - started, run_dir / "summary.json")
    return summary


def _summarize(cfg: DictConfig, spec: TaskSpec, run_log: RunLog, final_state: dict, num_rounds: int) -> dict[str, Any]:
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
    if not federated_nodes:
        # No evaluate round ran (evaluate.fraction=0): score the final model here.
        model = build_model(scenario, spec.train.seed, final_state)
        federated_nodes = {str(node.node): evaluate_model(scenario, model, node) for node in nodes}
        summary["federated"]["nodes"] = federated_nodes

    summary["centralized"] = baselines.centralized(scenario, spec, nodes, num_rounds)
    local = baselines.local_only(scenario, spec, nodes, num_rounds)
    local["mean"] = mean_metrics(local["nodes"])
    summary["local_only"] = local
    summary["gain"] = node_gains(federated_nodes, local["nodes"], tuple(scenario.gain_metrics))

    primary = scenario.primary_metric
    federated_value = summary["federated"]["global"].get(primary, float("nan"))
    summary["gap_to_centralized"] = {primary: float(federated_value) - float(summary["centralized"]["global"][primary])}
    return summary

"""Run a configured job on Flower's Ray simulation runtime on this machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from server.environment import keep_local

logger = logging.getLogger(__name__)


def backend_config(cfg: DictConfig) -> dict:
    """Return Flower's Ray backend settings, sized by ``cfg.runtime``.

    Concurrency is ``ray_cpus / client_cpus`` ClientApps at a time.
    """
    return {
        "client_resources": {"num_cpus": int(cfg.runtime.client_cpus), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": int(cfg.runtime.ray_cpus),
            "num_gpus": 0,
            "object_store_memory": int(cfg.runtime.object_store_mb) * 1024 * 1024,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


def run_in_simulation(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg`` with ``cfg.nodes`` simulated SuperNodes and return the summary.

    Raises
    ------
    RuntimeError
        If the ServerApp did not write ``summary.json`` (the run failed; the
        cause is in the log above).
    """
    keep_local()
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    logger.info("Starting Ray simulation with %d nodes", int(cfg.nodes))
    run_simulation(
        server_app=make_server_app(cfg, run_dir),
        client_app=client_app,
        num_supernodes=int(cfg.nodes),
        backend_config=backend_config(cfg),
    )

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"The simulation ended without writing {summary_path}; see the errors logged above.")
    return json.loads(summary_path.read_text(encoding="utf-8"))

"""One ``fedseal-train`` job: quiet mode, the sweep's tracking group, and failures that do not end a multirun.

Hydra's basic launcher runs the jobs of a multirun one after another in one
process. An exception that escapes a job is stored by Hydra, the remaining
jobs still run, and the sweep then exits with that first error, leaving
nothing in the failed job's folder but its log. Here a failed job writes
``failed.json`` to its folder, logs one error line and returns, so the sweep
report can list it. ``FailedJobs`` names all failed jobs when the sweep ends.
A single run re-raises, so its exit status stays non-zero. A single run that
fails on a setting or a data folder logs the message without a traceback
and exits 2.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

FAILED_NAME = "failed.json"


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job on the Ray simulation; return its summary, or None if a multirun job failed.

    Raises
    ------
    Exception
        Whatever the run raised, when this is not a multirun job.
    """
    from server.console import quiet_console
    from server.simulation import run_in_simulation

    if cfg.get("quiet", False):
        quiet_console()
    multirun = _is_multirun()
    if multirun and cfg.get("tracking") is not None and "group" in cfg.tracking and not cfg.tracking.group:
        cfg.tracking.group = sweep_group(Path(HydraConfig.get().sweep.dir))

    run_dir = Path(cfg.output_dir)
    try:
        return run_in_simulation(cfg, run_dir)
    except Exception as error:
        write_failure(run_dir, error, _overrides())
        shutdown_ray()
        if not multirun:
            if _is_user_error(error):
                # A wrong setting or data folder: the message names the fix, a traceback would bury it.
                logger.error("%s", error)
                raise SystemExit(2) from None
            raise
        logger.error("Job %s failed: %s: %s. Details in %s; the sweep continues.", run_dir.name, type(error).__name__, error, run_dir / FAILED_NAME)
        return None


def _is_user_error(error: BaseException) -> bool:
    """Tell whether ``error`` comes from a setting or data folder the user can fix, not from a bug."""
    from scenarios.datasets import DatasetError
    from server.config import ConfigError
    from server.simulation import NoTrainingError

    return isinstance(error, (ConfigError, DatasetError, NoTrainingError))


def sweep_group(sweep_dir: Path) -> str:
    """Return a W&B group name for a sweep folder: its last two path parts, such as ``2026-12-05_10-00-00``."""
    parts = [part for part in sweep_dir.parts[-2:] if part not in ("/", "")]
    return "_".join(parts) or "fedseal-sweep"


def write_failure(run_dir: Path, error: BaseException, overrides: list[str]) -> Path:
    """Write ``failed.json`` (error type, message, traceback, overrides, time) to ``run_dir`` and return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FAILED_NAME
    record = {
        "status": "failed",
        "error": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "overrides": overrides,
        "time": round(time.time(), 3),
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def shutdown_ray() -> None:
    """Stop Ray if a failed job left it running, so the next job starts a fresh one."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        logger.warning("Ray was still running after the failed job; shutting it down")
        ray.shutdown()


class FailedJobs(Callback):
    """Hydra callback: at the end of a multirun, log every job folder that contains ``failed.json``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Log the failed jobs of the sweep, or nothing when every job finished."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = sorted(path.parent.name for path in sweep_dir.glob(f"*/{FAILED_NAME}"))
        if failed:
            logger.error("%d job(s) of the sweep in %s failed: %s. See failed.json in each folder.", len(failed), sweep_dir, ", ".join(failed))


def _is_multirun() -> bool:
    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return list(OmegaConf.to_container(HydraConfig.get().overrides.task))

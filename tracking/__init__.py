"""Experiment tracking: consumers of a run's records that mirror them to a tracking service.

``open_tracker`` builds the tracker that the ``tracking`` config group names:

- ``tracking=wandb`` (default): one W&B run per training run, offline unless a
  W&B API key is configured (``tracking.settings.resolve_mode``);
- ``tracking=none``: nothing is sent or written.

A tracker follows the run through ``attach(run_log, metric_names)`` and
``finish(summary, model_path)``; see ``tracking.wandb_tracker``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tracking.settings import TrackingSettings

logger = logging.getLogger(__name__)


class NullTracker:
    """The tracker of ``tracking=none``: accepts every call and does nothing."""

    active = False

    def attach(self, run_log: Any, metric_names: list[str]) -> None:
        """Do nothing."""

    def finish(self, summary: dict[str, Any] | None, model_path: Path | None) -> None:
        """Do nothing."""


def open_tracker(cfg: DictConfig, run_dir: Path) -> Any:
    """Return the tracker named by ``cfg.tracking.name``, not yet started.

    An invalid ``tracking`` section logs one warning and returns a
    ``NullTracker``: tracking settings never stop a training run.
    """
    try:
        settings = TrackingSettings.from_config(cfg.get("tracking"))
        if settings.name == "none":
            return NullTracker()
        if settings.name != "wandb":
            raise ValueError(f"unknown tracking.name={settings.name!r}; use tracking=wandb or tracking=none")

        from tracking.wandb_tracker import WandbTracker

        config = OmegaConf.to_container(cfg, resolve=True)
        return WandbTracker(settings, run_dir, config, run_dir.name or "fedseal")
    except Exception as error:  # noqa: BLE001 - tracking must never stop a run.
        logger.warning("W&B tracking is off for this run: invalid tracking settings: %s: %s. Training continues.", type(error).__name__, error)
        return NullTracker()

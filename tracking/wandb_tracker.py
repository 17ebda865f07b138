"""Mirror one run to Weights & Biases, as a consumer of the run's records.

The tracker listens to the run log (``RunLog.add_listener``) and reads new
audit-log lines whenever a round ends, so no strategy calls W&B. Each round
becomes one W&B step with:

- global metrics (``eval_pooled/*``: pooled test split; ``eval_nodes/*``:
  mean over the nodes' test splits; ``train/*``),
- a ``nodes`` table (per node: status, examples, timings, trust, reputation,
  epsilon and its evaluation metrics),
- payload bytes (``bytes/*``) and the time split (``time/*``, in seconds),
- accepted and rejected updates, an ``events`` table with the reasons
  (rejections, quarantines, canary promotions and rollbacks).

At the end, the figures of ``summary.json`` become the W&B run summary and the
final model file is logged as a ``model`` artifact.

Tracking never stops training: any W&B failure (import, invalid mode,
unwritable folder, init timeout, a failing call) logs one warning and turns
the tracker off for the rest of the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from tracking.rounds import NODE_COLUMNS, RoundCollector, RoundLog
from tracking.settings import TrackingSettings, resolve_mode

logger = logging.getLogger(__name__)

EVENT_COLUMNS = ("round", "node", "event", "reason")


class WandbTracker:
    """One W&B run for one training run.

    Parameters
    ----------
    settings : TrackingSettings
        The ``tracking`` config group.
    run_dir : Path
        The run's output folder; W&B's files go to ``run_dir/wandb`` unless
        ``settings.dir`` is set.
    config : dict
        The resolved run configuration, stored as the W&B run config.
    name : str
        Display name of the W&B run.
    """

    def __init__(self, settings: TrackingSettings, run_dir: Path, config: dict[str, Any], name: str) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.config = config
        self.name = name
        self.run: Any = None
        self.metric_names: list[str] = []
        self._collector = RoundCollector()
        self._audit_path = run_dir / "audit.jsonl"
        self._audit_offset = 0
        self._current_round = -1

    @property
    def active(self) -> bool:
        """Whether a W&B run is open and receiving logs."""
        return self.run is not None

    def attach(self, run_log: Any, metric_names: list[str]) -> None:
        """Start the W&B run and listen to ``run_log``; on failure, warn once and stay off."""
        self.metric_names = list(metric_names)
        try:
            self.run = self._init()
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run.
            self._turn_off("wandb.init failed", error)
            return
        logger.info("W&B run %s started in %s mode; files in %s", self.run.id, self.run.settings.mode, self.run.dir)
        run_log.add_listener(self.on_record)

    def on_record(self, record: dict[str, Any]) -> None:
        """Fold one run-log record in and log every round that it finishes."""
        if not self.active:
            return
        try:
            server_round = int(record.get("round", self._current_round))
            if server_round > self._current_round:
                self._read_audit()
                self._log_rounds(self._collector.pop_before(server_round))
                self._current_round = server_round
            self._collector.add(record)
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run.
            self._turn_off("logging a round failed", error)

    def finish(self, summary: dict[str, Any] | None, model_path: Path | None) -> None:
        """Log the last rounds, the summary and the model artifact, then close the W&B run.

        Parameters
        ----------
        summary : dict, optional
            The run's ``summary.json`` content; None for a run that failed.
        model_path : Path, optional
            The final model file to log as an artifact; skipped when missing.
        """
        if not self.active:
            return
        try:
            self._read_audit()
            self._log_rounds(self._collector.pop_all())
            if summary is not None:
                self.run.summary.update(flatten_summary(summary))
            if model_path is not None and model_path.exists():
                self._log_model(model_path)
            self.run.finish(exit_code=0 if summary is not None else 1)
            logger.info("W&B run %s finished; files in %s", self.run.id, self.run.dir)
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run.
            self._turn_off("finishing the W&B run failed", error)
        self.run = None

    def _init(self) -> Any:
        mode = resolve_mode(self.settings.mode)
        if mode == "disabled":
            raise ValueError("tracking.mode=disabled; use tracking=none to turn tracking off without this warning")
        files_dir = writable_dir(Path(self.settings.dir) if self.settings.dir else self.run_dir)

        import wandb

        settings = wandb.Settings(
            mode=mode,
            init_timeout=self.settings.init_timeout_s,
            # Leave stdout to Hydra and the progress display; skip system sampling threads.
            console="off",
            silent=True,
            x_disable_stats=True,
            # Every training run, and every job of a multirun, gets a run of its own.
            reinit="create_new",
        )
        return wandb.init(
            project=self.settings.project,
            entity=self.settings.entity,
            group=self.settings.group,
            name=self.name,
            tags=list(self.settings.tags) or None,
            config=self.config,
            dir=str(files_dir),
            settings=settings,
        )

    def _read_audit(self) -> None:
        """Pass the audit lines written since the last call to the collector; a partial last line waits."""
        if not self._audit_path.exists():
            return
        with self._audit_path.open("rb") as handle:
            handle.seek(self._audit_offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._audit_offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            if line.strip():
                self._collector.add_audit(json.loads(line))

    def _log_rounds(self, rounds: list[RoundLog]) -> None:
        import wandb

        for entry in rounds:
            data: dict[str, Any] = dict(entry.scalars)
            if entry.nodes:
                data["nodes"] = wandb.Table(columns=[*NODE_COLUMNS, *self.metric_names], data=entry.node_rows(self.metric_names))
            if entry.events:
                data["events"] = wandb.Table(columns=list(EVENT_COLUMNS), data=[[e.get(c) for c in EVENT_COLUMNS] for e in entry.events])
            self.run.log(data, step=entry.round)

    def _log_model(self, model_path: Path) -> None:
        import wandb

        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"model-{self.run.id}")
        artifact = wandb.Artifact(name=name, type="model", metadata={"file": model_path.name})
        artifact.add_file(str(model_path))
        self.run.log_artifact(artifact)

    def _turn_off(self, failed_step: str, error: BaseException) -> None:
        logger.warning("W&B tracking is off for the rest of this run: %s: %s: %s. Training continues; set tracking=none to skip W&B.", failed_step, type(error).__name__, error)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                logger.debug("Closing the W&B run after a failure also failed", exc_info=True)


def writable_dir(path: Path) -> Path:
    """Create ``path`` and check that a file can be written there.

    Raises
    ------
    OSError
        If the folder cannot be created or written; W&B would otherwise fall
        back to a temporary folder without saying so clearly.
    """
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
        pass
    if not os.access(path, os.W_OK):
        raise PermissionError(f"tracking.dir {path} is not writable; point tracking.dir at a writable folder or leave it null")
    return path


def flatten_summary(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested ``summary.json`` sections into W&B summary keys such as ``federated/global/roc_auc``."""
    flat: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_summary(value, f"{name}/"))
        else:
            flat[name] = value
    return flat

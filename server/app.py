"""The fedseal ServerApp.

``app`` is the component that ``flwr run .`` starts (see ``[tool.flwr.app]``
in pyproject.toml). It composes the same Hydra configuration as
``fedseal-train`` from the ``conf/`` folder shipped in the app bundle, with
overrides taken from the Flower run config:

    flwr run . -c 'scenario="maintenance" overrides="rounds=2 nodes=2"'

``make_server_app`` builds a ServerApp around an already composed
configuration, for ``fedseal-train`` (Flower's simulation gives the
ServerApp no run config of its own).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from server.config import compose_config, overrides_from_run_config
from server.environment import keep_local
from server.federation import run_federation

logger = logging.getLogger(__name__)

OUTPUT_DIR_ENV = "FEDSEAL_OUTPUT_DIR"

app = ServerApp()


def _output_dir(run_config: dict, scenario: str) -> Path:
    """Return the run directory under ``output-dir`` (else $FEDSEAL_OUTPUT_DIR, else ./fedseal-runs).

    Its name is ``run-name`` when set, so a restarted ServerApp with
    ``resume=true`` finds the same folder; otherwise a timestamp and the scenario.
    """
    base = run_config.get("output-dir") or os.environ.get(OUTPUT_DIR_ENV) or "fedseal-runs"
    name = str(run_config.get("run-name") or "") or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{scenario}"
    return Path(str(base)).expanduser().resolve() / name


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the configuration from the run config and run federated training."""
    keep_local()
    run_config = dict(context.run_config)
    overrides = overrides_from_run_config(run_config)
    cfg = compose_config(overrides)
    # Hydra's ${hydra:...} resolvers only exist under @hydra.main, so the
    # output folder is set explicitly here.
    run_dir = _output_dir(run_config, str(cfg.scenario.name))
    cfg.output_dir = str(run_dir)
    logger.info("ServerApp composed config with overrides %s", overrides)
    run_federation(grid, cfg, run_dir)


def make_server_app(cfg: DictConfig, run_dir: Path, simulation_keys: Path | None = None) -> ServerApp:
    """Return a ServerApp that runs ``cfg`` and writes to ``run_dir``.

    ``simulation_keys`` names the key folder that the Ray simulation created
    itself; only then may an encrypted attack simulation read its secret key.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir, simulation_keys=simulation_keys)

    return server_app

"""``fedseal-train``: the Hydra entry point and the product's main job.

    fedseal-train scenario=maintenance rounds=5
    fedseal-train -m scenario=fraud,maintenance
    fedseal-train -m +sweep=robustness
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from server.config import CONF_DIR
from server.environment import keep_local

logger = logging.getLogger(__name__)


# An absolute path: Hydra resolves a relative one as a Python package, which
# an editable install does not provide for the top-level conf/ folder.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run one federated job on the Ray simulation runtime (a failed multirun job does not end the sweep)."""
    keep_local()
    from server.jobs import run_job

    run_job(cfg)


if __name__ == "__main__":
    main()

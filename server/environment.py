"""Process settings that keep every run on this machine.

Flower posts telemetry and checks for updates, the SuperLink installs app
dependencies from PyPI on each ``flwr run``, and Ray listens on all
interfaces, unless told otherwise. Call ``keep_local`` before Flower or Ray
starts; Ray workers and Flower subprocesses inherit the environment.
"""

from __future__ import annotations

import logging
import os

LOCAL_ONLY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray binds to 127.0.0.1 only when this is 0 (Ray 2.55).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # Keep Ray 2.55's current device handling and silence its warning about a change.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def keep_local() -> None:
    """Set the variables above unless the user already set them, and quiet Flower's duplicate log lines."""
    for key, value in LOCAL_ONLY_ENV.items():
        os.environ.setdefault(key, value)

    # Flower's logger has its own handler; propagating to the root logger
    # (which Hydra configures) would print every line twice.
    logging.getLogger("flwr").propagate = False
    # Flower's state database runs Alembic migrations, which log every plugin
    # at INFO on each start. None of those lines needs any action.
    logging.getLogger("alembic").setLevel(logging.WARNING)

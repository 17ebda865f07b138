"""Quiet console mode: warnings and the final table only, the full log in the run's file."""

from __future__ import annotations

import logging
import sys

# Loggers that print through a console handler of their own and do not
# propagate to the root logger (``server.environment.keep_local`` turns off
# Flower's propagation), so their records never reach the run's log file.
OWN_HANDLER_LOGGERS = ("flwr",)


def quiet_console() -> None:
    """Raise the root logger's console handlers to WARNING; file handlers (Hydra's ``train.log``) keep their level.

    Loggers in ``OWN_HANDLER_LOGGERS`` are raised to WARNING as a whole. The
    final table is printed by ``rich`` straight to stdout, so it still shows.
    The progress bar is turned off by ``RunLog(quiet=True)``.
    """
    # Importing Flower's logger module sets the "flwr" logger to DEBUG (flwr
    # 1.42), which would undo the level set below if it came later.
    import flwr.common.logger  # noqa: F401

    for handler in logging.getLogger().handlers:
        if _is_console(handler):
            handler.setLevel(logging.WARNING)
    for name in OWN_HANDLER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _is_console(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)

"""Quiet console mode: warnings and the final table only, the full log in the run's file."""

from __future__ import annotations

import logging
import sys

# Loggers with console handlers of their own (Flower's does not propagate).
OWN_HANDLER_LOGGERS = ("flwr",)


def quiet_console() -> None:
    """Raise every console log handler to WARNING; file handlers (Hydra's ``train.log``) keep their level.

    The final table is printed by ``rich`` straight to stdout, so it still
    shows. The progress bar is turned off by ``RunLog(quiet=True)``.
    """
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in OWN_HANDLER_LOGGERS)]
    for logger in loggers:
        for handler in logger.handlers:
            if _is_console(handler):
                handler.setLevel(logging.WARNING)


def _is_console(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)

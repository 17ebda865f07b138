"""The ``tracking`` config group as a typed value, and the W&B mode it resolves to."""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# `mode` values: `auto` picks online only when an API key is configured.
MODES = ("auto", "online", "offline", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"


@dataclass(frozen=True)
class TrackingSettings:
    """Settings of the ``tracking`` config group (``conf/tracking/*.yaml``).

    Parameters
    ----------
    name : str
        ``wandb`` or ``none``.
    mode : str
        One of ``MODES``; checked when the tracker starts.
    project : str
        W&B project name.
    entity : str, optional
        W&B team or user; None uses the account's default.
    group : str, optional
        W&B group that collects the runs of one sweep.
    dir : str, optional
        Folder for W&B's files; None puts them in the run's output folder.
    init_timeout_s : float
        Maximum wait for ``wandb.init``, in seconds.
    tags : tuple of str
        W&B tags of the run.
    """

    name: str = "none"
    mode: str = "auto"
    project: str = "fedseal"
    entity: str | None = None
    group: str | None = None
    dir: str | None = None
    init_timeout_s: float = 30.0
    tags: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, section: Any) -> TrackingSettings:
        """Build the settings from ``cfg.tracking``; a missing section means no tracking."""
        if section is None:
            return cls()
        return cls(
            name=str(section.get("name", "none")),
            mode=str(section.get("mode", "auto")),
            project=str(section.get("project", "fedseal")),
            entity=section.get("entity") or None,
            group=section.get("group") or None,
            dir=section.get("dir") or None,
            init_timeout_s=float(section.get("init_timeout_s", 30.0)),
            tags=tuple(str(tag) for tag in (section.get("tags") or ())),
        )


def api_key_configured(environ: dict[str, str] | None = None) -> bool:
    """Return whether W&B could authenticate: ``WANDB_API_KEY`` is set or netrc has an entry for the W&B host.

    The netrc file is ``$NETRC`` or ``~/.netrc``; an unreadable or malformed
    file counts as no entry. The key itself is never read into a log.
    """
    environ = dict(os.environ) if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True

    host = urlparse(environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname or ""
    path = Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, environ: dict[str, str] | None = None) -> str:
    """Return the W&B mode to pass to ``wandb.init``: ``auto`` becomes ``online`` or ``offline``.

    Raises
    ------
    ValueError
        If ``mode`` is not one of ``MODES``.
    """
    if mode not in MODES:
        raise ValueError(f"Invalid tracking.mode={mode!r}; use one of {', '.join(MODES)} (auto is online only when a W&B API key is configured).")
    if mode == "auto":
        return "online" if api_key_configured(environ) else "offline"
    return mode

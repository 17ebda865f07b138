"""Server-side aggregation strategies and the wrappers that compose around them.

``strategies.factory.build_strategy`` is the one place where the stack is
assembled from the Hydra ``strategy`` group, so the order of wrappers is
visible there. This package imports nothing eagerly: node-side modules
import protocol constants from single strategy modules without pulling in
the whole server stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RecordingStrategy", "aggregate_finite_metrics", "build_strategy"]


def __getattr__(name: str) -> Any:
    if name == "build_strategy":
        from strategies.factory import build_strategy

        return build_strategy
    if name in ("RecordingStrategy", "aggregate_finite_metrics"):
        from strategies import recording

        return getattr(recording, name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")

"""Server-side aggregation strategies and the wrappers that compose around them.

``build_strategy`` is the one place where the stack is assembled from the
Hydra ``strategy`` group, so the order of wrappers is visible here.
"""

from __future__ import annotations

from strategies.factory import build_strategy
from strategies.recording import RecordingStrategy, aggregate_finite_metrics

__all__ = ["RecordingStrategy", "aggregate_finite_metrics", "build_strategy"]

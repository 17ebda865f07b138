"""Offline HTML reports of runs and sweeps (``fedseal report DIR --out OUTDIR``).

``build_report`` reads the outputs of each run (``config.yaml``,
``summary.json`` or ``failed.json``, ``metrics.jsonl``, ``audit.jsonl``) and
writes ``index.html`` with PNG figures: metric per round, the robustness
table, per-node gains, encryption cost, the privacy-utility curve and the
rejection timeline.
"""

from reporting.html import build_report

__all__ = ["build_report"]

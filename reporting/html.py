"""Build the report: ``index.html`` with its PNG figures in one folder, readable offline.

The page links nothing outside that folder: styles are inline and figures
are files next to ``index.html``.
"""

from __future__ import annotations

import html
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from reporting import figures
from reporting.runs import Run, discover_runs
from reporting.sections import (
    cost_rows,
    metric_series,
    node_gains,
    privacy_points,
    robustness_cells,
    timeline_events,
)

logger = logging.getLogger(__name__)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0 0.3em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
td.worse { color: #b00020; }
td.better { color: #1b6e20; }
p.caption, figcaption { color: #555; font-size: 0.88em; max-width: 60em; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.25em; }
.scroll { overflow-x: auto; }
"""


def build_report(source: Path, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` and its figures for the runs under ``source``; return the page's path.

    Parameters
    ----------
    source : Path
        A run folder or a multirun folder (searched recursively).
    out_dir : Path
        Output folder; created if missing. Existing report files are replaced.

    Raises
    ------
    FileNotFoundError
        If ``source`` contains no run.
    """
    runs = discover_runs(source)
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = [
        _overview(source, runs),
        _rounds_section(runs, out_dir),
        _robustness_section(runs),
        _gains_section(runs, out_dir),
        _encryption_section(runs),
        _privacy_section(runs, out_dir),
        _timeline_section(runs, out_dir),
    ]
    page = _page(f"fedseal report: {source.name}", "\n".join(sections))
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    logger.info("Report of %d runs written to %s", len(runs), index)
    return index


def _overview(source: Path, runs: list[Run]) -> str:
    failed = [run for run in runs if run.failure is not None]
    rows = []
    for run in runs:
        status = "failed" if run.failure is not None else "finished"
        seconds = (run.summary or {}).get("seconds", {}).get("total")
        rows.append([run.label, run.scenario, run.strategy, run.attack, _pct(run.attack_fraction), run.privacy, status, _num(run.final_metric), run.metric_source if run.summary else "", _num(seconds, 1)])
    text = f"<p>{len(runs)} runs from <code>{_e(str(source))}</code>, {len(failed)} failed. Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}.</p>"
    headers = ["run", "scenario", "strategy", "attack", "attackers", "privacy", "status", "final primary metric", "measured on", "seconds"]
    caption = (
        "The final primary metric is that of the last global model: on the pooled test split when the server scored it, else the mean over the nodes' test splits "
        "(encrypted runs, whose model the server cannot read), unweighted. Values from different sources are not directly comparable."
    )
    return "<h2>Runs</h2>" + text + _table(headers, rows, text_columns=7) + _caption(caption)


def _rounds_section(runs: list[Run], out_dir: Path) -> str:
    by_metric: dict[str, dict[str, tuple[str, list[tuple[int, float]]]]] = defaultdict(dict)
    for run in runs:
        source, points = metric_series(run)
        if points:
            by_metric[run.primary_metric][run.label] = (source, points)
    if not by_metric:
        return "<h2>Metric per round</h2><p class='note'>No run recorded an evaluation round (metrics.jsonl is missing or empty).</p>"

    parts = ["<h2>Metric per round</h2>"]
    for metric, series in sorted(by_metric.items()):
        image = figures.metric_per_round(series, metric, out_dir / f"rounds_{metric}.png")
        sources = sorted({source for source, _ in series.values()})
        parts.append(_figure(image.name, f"{metric} of the global model after each round, one line per run. Source: {', '.join(sources)}. Round 0 is the initial model."))
        rounds = sorted({point[0] for _, points in series.values() for point in points})
        rows = [[label, source, *[_num(dict(points).get(r)) for r in rounds]] for label, (source, points) in series.items()]
        parts.append(_table(["run", "measured on", *[f"round {r}" for r in rounds]], rows, text_columns=2))
    return "\n".join(parts)


def _robustness_section(runs: list[Run]) -> str:
    cells = robustness_cells(runs)
    parts = ["<h2>Robustness</h2>"]
    if not any(cell.attack != "none" for cell in cells):
        parts.append("<p class='note'>No run in this folder simulated an attack, so there is no robustness comparison. Run <code>fedseal-train -m +sweep=robustness</code> and report on its folder.</p>")
    for scenario in sorted({cell.scenario for cell in cells}):
        group = [cell for cell in cells if cell.scenario == scenario]
        columns = sorted({(cell.attack, cell.fraction) for cell in group}, key=lambda c: (c[0] != "none", c[1], c[0]))
        strategies = sorted({cell.strategy for cell in group}, key=lambda s: (s != "fedavg", s))
        metric = next(run.primary_metric for run in runs if run.scenario == scenario)
        headers = ["aggregator", *[("no attack" if attack == "none" else f"{attack} {_pct(fraction)}") for attack, fraction in columns]]
        has_reference = any(c.drop is not None for c in group)
        rows = []
        for strategy in strategies:
            row: list[Any] = [strategy]
            for attack, fraction in columns:
                match = [c for c in group if c.strategy == strategy and c.attack == attack and c.fraction == fraction]
                row.append(_robust_cell(match[0], has_reference) if match else ("", ""))
            rows.append(row)
        parts.append(f"<h3>{_e(scenario)}: final {_e(metric)}</h3>")
        parts.append(_table(headers, rows, text_columns=1))
        has_reference = any(c.drop is not None for c in group)
        caption = (
            f"Final {metric} of the global model; in brackets the change from attack-free FedAvg of the same scenario (negative = worse). Columns: attack and share of attacking nodes."
            if has_reference
            else f"Final {metric}. This folder has no attack-free FedAvg run of {scenario}, so no change is shown; add one with strategy=fedavg attack=none."
        )
        if any(c.drop is None and c.source != "unknown" for c in group) and has_reference:
            caption += " A value marked 'other source' was measured differently from the reference (mean over nodes against the pooled test split), so no change is shown."
        parts.append(_caption(caption))
    return "\n".join(parts)


def _robust_cell(cell: Any, has_reference: bool) -> tuple[str, str]:
    if cell.drop is None:
        return (f"{_num(cell.value, 3)} (other source)" if has_reference else _num(cell.value, 3)), ""
    css = ""
    if cell.drop < -0.01:
        css = "worse"
    elif cell.drop > 0.01:
        css = "better"
    return f"{cell.value:.3f} ({cell.drop:+.3f})", css


def _gains_section(runs: list[Run], out_dir: Path) -> str:
    rows = node_gains(runs)
    parts = ["<h2>Gain per node against local-only training</h2>"]
    if not rows:
        parts.append("<p class='note'>No run in this folder trained the local-only baselines (they were run with <code>baselines=false</code>), so per-node gains are not available. Rerun with <code>baselines=true</code> (the default).</p>")
        return "\n".join(parts)

    delta_keys = sorted({key for _, _, deltas in rows for key in deltas})
    primary = f"delta_{runs[0].primary_metric}"
    chart_key = primary if primary in delta_keys else delta_keys[0]
    image = figures.node_gains(rows, chart_key, out_dir / "node_gains.png")
    parts.append(_figure(image.name, f"{chart_key}: the federated model minus the model the node trained alone, both scored on the node's own test split. Above zero, the node gains from federating."))
    table_rows = [[label, node, *[_num(deltas.get(key), signed=True) for key in delta_keys]] for label, node, deltas in rows]
    parts.append(_table(["run", "node", *delta_keys], table_rows, text_columns=2))
    return "\n".join(parts)


def _encryption_section(runs: list[Run]) -> str:
    rows = cost_rows(runs)
    parts = ["<h2>Encryption cost</h2>"]
    if not any(row.encrypted for row in rows):
        parts.append(
            "<p class='note'>No run in this folder used an encrypted strategy, so there is no encryption cost to compare; the table shows the plaintext cost only. "
            "Run <code>fedseal-train -m +sweep=encryption</code> (FedAvg against CKKS FedAvg) and report on its folder.</p>"
        )
    if not rows:
        parts.append("<p class='note'>No run has cost records (metrics.jsonl lines with phase <code>cost</code>).</p>")
        return "\n".join(parts)

    headers = ["run", "strategy", "preset", "parameters", "upload B/param", "download B/param", "train phase s/round", "aggregation s/round", "encryption s/round"]
    table_rows = [
        [r.label, r.strategy, r.preset, f"{r.parameters:,}", _num(r.upload_bytes_per_parameter, 2), _num(r.download_bytes_per_parameter, 2), _num(r.round_seconds, 3), _num(r.aggregate_seconds, 3), _num(r.encrypt_seconds, 3)]
        for r in rows
    ]
    parts.append(_table(headers, table_rows, text_columns=3))
    parts.append(
        _caption(
            "Payload bytes as Flower counts them (record contents, without transport framing), per node and per float parameter: upload is a train reply, download a train message (the task description included). "
            "Train phase: from sending the round's train messages to the end of aggregation, median over rounds; it includes the nodes' training, and round 1 also their start-up. "
            "Aggregation includes signature checks, update validation and, with canary promotion, the canary evaluation. Encryption: the slowest node's CKKS encryption per round (median), 0 for plaintext runs."
        )
    )
    return "\n".join(parts)


def _privacy_section(runs: list[Run], out_dir: Path) -> str:
    points = privacy_points(runs)
    parts = ["<h2>Privacy-utility</h2>"]
    if not any(point.epsilon is not None for point in points):
        parts.append("<p class='note'>No run in this folder used differential privacy, so there is no privacy-utility curve. Run <code>fedseal-train -m +sweep=privacy_utility</code> and report on its folder.</p>")
        return "\n".join(parts)

    metric = runs[0].primary_metric
    image = figures.privacy_utility(points, metric, out_dir / "privacy_utility.png")
    parts.append(_figure(image.name, f"Final {metric} against the privacy budget spent. Epsilon is the largest over the nodes after the last round; a smaller epsilon is stronger privacy. Dashed: the same scenario without DP."))
    rows = [[p.label, p.scenario, p.strategy, "none (no DP)" if p.epsilon is None else _num(p.epsilon, 3), _num(p.value)] for p in points]
    parts.append(_table(["run", "scenario", "strategy", "epsilon", f"final {metric}"], rows, text_columns=3))
    return "\n".join(parts)


def _timeline_section(runs: list[Run], out_dir: Path) -> str:
    events = timeline_events(runs)
    parts = ["<h2>Rejections and quarantines</h2>"]
    if not events:
        parts.append("<p>No update was rejected, no node was quarantined, no round was rolled back and no reply failed in these runs.</p>")
        return "\n".join(parts)

    with_round = [e for e in events if e["round"] is not None]
    if with_round:
        labels = sorted({e["run"] for e in with_round})
        image = figures.timeline(with_round, labels, out_dir / "timeline.png")
        parts.append(_figure(image.name, "Each mark is one event in one round. Rejections come from signature checks, decryption and update validation; quarantines from trust weighting; rollbacks from canary promotion."))
    rows = [[e["run"], "" if e["round"] is None else e["round"], "" if e["node"] is None else e["node"], e["event"], e["reason"]] for e in events]
    parts.append("<div class='scroll'>" + _table(["run", "round", "node", "event", "reason"], rows, text_columns=5) + "</div>")
    return "\n".join(parts)


def _page(title: str, body: str) -> str:
    return f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style></head>\n<body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n"


def _table(headers: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    """Return an HTML table; the first ``text_columns`` columns are left-aligned, cells may be (text, css class)."""
    head = "".join(f"<th class='{'text' if i < text_columns else ''}'>{_e(str(h))}</th>" for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, css = cell if isinstance(cell, tuple) else (cell, "")
            classes = " ".join(c for c in ("text" if i < text_columns else "", css) if c)
            cells.append(f"<td class='{classes}'>{_e(str(text))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(filename: str, caption: str) -> str:
    return f"<figure><img src='{_e(filename)}' alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"


def _caption(text: str) -> str:
    return f"<p class='caption'>{_e(text)}</p>"


def _num(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.0f} %" if fraction else "0 %"


def _e(text: str) -> str:
    return html.escape(text, quote=True)

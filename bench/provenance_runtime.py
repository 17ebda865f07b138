"""Measure what signatures add to real training rounds in the Flower runtime.

``bench/provenance_bench.py`` times the provenance work in one process,
against a reference round of one local epoch plus the aggregation. This
script runs the product instead, on the fraud scenario with an MLP of about
1M parameters, once with signatures on and once with
``provenance.signatures=false``, for each node count. Both runs of a node
count use the same seed, data and settings. ``--runtime simulation`` (the
default) runs ``fedseal-train`` in Ray; ``--runtime deployment`` runs
``fedseal deploy local``, a real SuperLink with one SuperNode per node, all
on this machine.

From each run's ``metrics.jsonl`` it reads, per training round:

- the round time: the server's wait for the replies plus the aggregation
  (``cost`` lines, phase ``cost``, event ``train``);
- the server's provenance seconds (phase ``provenance``). ``server_s`` is
  what the server adds to the round itself: the base-version hash in
  ``configure_train``, the wait for payload hashes still running when the
  replies are in, the signature checks, the audit entries and the registry
  access. ``payload_hash_busy_s`` is the CPU time of all payload hashing.
  Most of it runs while the server still waits for replies
  (``ArrivalHashingGrid``);
- every node's ``sign_seconds`` (hash of the received model, hash of the
  update, Ed25519 signature).

The overhead is estimated two ways, both against the measured round time
with signatures on:

- on separate sites: ``server_s`` plus the slowest node's signing, because
  each site signs on its own cores while the others train, and the server
  hashes each reply while it waits for the rest;
- as simulated: all provenance work shares this machine's cores, so it is
  the server's checks plus all payload hashing and all nodes' signing
  divided by the concurrency (``--concurrency``, the ClientApps that run at
  once in the simulation; on a one-machine deployment, pass the core count).

The table also gives the measured difference between the median rounds
with and without signatures, which includes run-to-run noise.

Round 1 is left out of every median, because it includes Ray's start (or
the SuperNodes' first connection), the data loading and the first model build.

Usage::

    FEDSEAL_DATA_DIR=/path/to/datasets python bench/provenance_runtime.py --nodes 10 100 --rounds 4 --out provenance_runtime.json
    FEDSEAL_DATA_DIR=/path/to/datasets python bench/provenance_runtime.py --runtime deployment --nodes 10 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("provenance_runtime")

# Hidden width and depth of the fraud MLP that give about 1M parameters:
# 30 inputs, three hidden layers of 698 units and one output, 998,141 parameters.
HIDDEN = 698
HIDDEN_LAYERS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100], help="node counts (default: 10 100)")
    parser.add_argument("--rounds", type=int, default=4, help="training rounds per run, the first not counted (default: 4)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden width of the fraud MLP (default: {HIDDEN}, about 1M parameters)")
    parser.add_argument("--runtime", choices=("simulation", "deployment"), default="simulation", help="Ray simulation (fedseal-train) or a local SuperLink with one SuperNode per node (fedseal deploy local); default: simulation")
    parser.add_argument(
        "--concurrency", type=int, default=2,
        help="cores that the nodes' work shares, the divisor of the 'as simulated' estimate; it does not change the runs "
        "(default: 2, the ClientApps that the simulation runs at once on this machine)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (round 1 is not counted), got {args.rounds}")
    if min(args.nodes) < 1:
        parser.error(f"--nodes must all be >= 1, got {args.nodes}")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    return args


def training_overrides(nodes: int, rounds: int, hidden: int, signatures: bool) -> list[str]:
    """Return the Hydra overrides shared by both runtimes."""
    return [
        "scenario=fraud",
        f"+scenario.options.hidden={hidden}",
        f"+scenario.options.hidden_layers={HIDDEN_LAYERS}",
        f"nodes={nodes}",
        f"rounds={rounds}",
        "seed=0",
        "baselines=false",
        "evaluate.fraction=0",
        "evaluate.server_side=false",
        "tracking=none",
        "quiet=true",
        f"provenance.signatures={str(signatures).lower()}",
    ]


def run_training(run_dir: Path, nodes: int, rounds: int, hidden: int, signatures: bool, runtime: str = "simulation") -> tuple[Path, float]:
    """Run one training job; return its run folder and wall seconds.

    ``simulation`` runs ``fedseal-train`` in Ray with its outputs in
    ``run_dir``. ``deployment`` runs ``fedseal deploy local``: a SuperLink
    and one SuperNode per node on this machine, with its state in
    ``run_dir``, and the run folder is read from its ``last-run.json``.

    Raises
    ------
    RuntimeError
        If the run fails; the message names its log file.
    """
    overrides = training_overrides(nodes, rounds, hidden, signatures)
    if runtime == "deployment":
        # The launcher sets nodes= itself from --nodes.
        rest = [item for item in overrides if not item.startswith("nodes=")]
        command = [sys.executable, "-m", "server.cli", "deploy", "local", "--nodes", str(nodes), "--state-dir", str(run_dir), "--", *rest]
    else:
        command = [sys.executable, "-m", "server.train", f"hydra.run.dir={run_dir}", *overrides]

    log_path = run_dir.with_suffix(".log")
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{runtime} run exited with {result.returncode}; see {log_path}")
    if runtime == "deployment":
        return Path(json.loads((run_dir / "last-run.json").read_text(encoding="utf-8"))["run_dir"]), seconds
    return run_dir, seconds


def read_rounds(metrics_path: Path) -> dict[int, dict[str, Any]]:
    """Return round -> round time, server provenance seconds and the nodes' signing seconds."""
    rounds: dict[int, dict[str, Any]] = {}
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            entry = rounds.setdefault(int(record.get("round", 0)), {"sign_seconds": []})
            phase = record.get("phase")
            if phase == "cost" and record.get("event") == "train":
                entry["round_s"] = float(record["wait_s"]) + float(record["aggregate_s"])
            elif phase == "provenance":
                for field in ("server_s", "base_hash_s", "payload_hash_s", "checks_s", "payload_hash_busy_s", "prehashed"):
                    entry[field] = float(record.get(field, 0.0))
            elif phase == "train" and record.get("scope") == "node" and "sign_seconds" in record.get("metrics", {}):
                entry["sign_seconds"].append(float(record["metrics"]["sign_seconds"]))
    return {number: entry for number, entry in rounds.items() if "round_s" in entry}


def summarize(on: dict[int, dict[str, Any]], off: dict[int, dict[str, Any]], concurrency: int) -> dict[str, float]:
    """Return the medians over rounds 2 and later of the round times and the overhead shares."""
    counted = [number for number in sorted(on) if number > 1]
    round_s = [on[n]["round_s"] for n in counted]
    server_s = [on[n].get("server_s", 0.0) for n in counted]
    node_sum = [sum(on[n]["sign_seconds"]) for n in counted]
    node_max = [max(on[n]["sign_seconds"], default=0.0) for n in counted]
    shared = [on[n].get("base_hash_s", 0.0) + on[n].get("checks_s", 0.0) + (on[n].get("payload_hash_busy_s", 0.0) + total) / concurrency for n, total in zip(counted, node_sum)]
    simulated = [work / r for work, r in zip(shared, round_s)]
    sites = [(s + most) / r for s, most, r in zip(server_s, node_max, round_s)]
    off_round_s = [off[n]["round_s"] for n in sorted(off) if n > 1]
    return {
        "rounds_counted": len(counted),
        "round_s": statistics.median(round_s),
        "round_s_without_signatures": statistics.median(off_round_s),
        "server_s": statistics.median(server_s),
        "payload_hash_s": statistics.median([on[n].get("payload_hash_s", 0.0) for n in counted]),
        "payload_hash_busy_s": statistics.median([on[n].get("payload_hash_busy_s", 0.0) for n in counted]),
        "prehashed_share": statistics.median([on[n].get("prehashed", 0.0) / max(1, len(on[n]["sign_seconds"])) for n in counted]),
        "node_sign_s_median": statistics.median([s for n in counted for s in on[n]["sign_seconds"]]),
        "node_sign_s_sum": statistics.median(node_sum),
        "overhead_pct_simulated": 100 * statistics.median(simulated),
        "overhead_pct_sites": 100 * statistics.median(sites),
        "round_difference_pct": 100 * (statistics.median(round_s) / statistics.median(off_round_s) - 1),
    }


def bench_nodes(nodes: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run both configurations for ``nodes``; return the summary row."""
    rounds: dict[str, dict[int, dict[str, Any]]] = {}
    walls: dict[str, float] = {}
    for label, signatures in (("on", True), ("off", False)):
        run_dir = workdir / f"nodes{nodes}_{label}"
        logger.info("%d nodes, signatures %s: running %d rounds in %s", nodes, label, args.rounds, run_dir)
        run_dir, walls[label] = run_training(run_dir, nodes, args.rounds, args.hidden, signatures, args.runtime)
        rounds[label] = read_rounds(run_dir / "metrics.jsonl")
        if label == "on" and not any(entry["sign_seconds"] for entry in rounds[label].values()):
            raise SystemExit(f"error: no node sent a signed training reply in {run_dir}; see {run_dir / 'train.log'} (is FEDSEAL_DATA_DIR set?)")
        logger.info("%d nodes, signatures %s: done in %.1f s", nodes, label, walls[label])

    row = {"nodes": nodes, **summarize(rounds["on"], rounds["off"], args.concurrency)}
    row["wall_s"] = walls
    row["rounds"] = {label: {str(n): entry for n, entry in data.items()} for label, data in rounds.items()}
    logger.info(
        "%d nodes: round %.2f s (%.2f s without signatures), server %.1f ms (payload hashing %.1f ms, mostly during the wait), "
        "signing %.1f ms per node; overhead %.2f %% on separate sites, %.2f %% as simulated",
        nodes, row["round_s"], row["round_s_without_signatures"], 1000 * row["server_s"], 1000 * row["payload_hash_busy_s"],
        1000 * row["node_sign_s_median"], row["overhead_pct_sites"], row["overhead_pct_simulated"],
    )
    return row


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    """Return the Markdown table of ``rows`` (times in seconds or milliseconds as labelled)."""
    header = (
        "| nodes | round, s | round without signatures, s | server, added to the round, ms | of which payload hash wait, ms "
        "| payload hashing in all, CPU ms | signing per node, ms | overhead, separate sites | overhead, as simulated | measured difference |"
    )
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['nodes']} | {row['round_s']:.2f} | {row['round_s_without_signatures']:.2f} "
            f"| {1000 * row['server_s']:.1f} | {1000 * row['payload_hash_s']:.1f} | {1000 * row['payload_hash_busy_s']:.1f} "
            f"| {1000 * row['node_sign_s_median']:.1f} | {row['overhead_pct_sites']:.2f} % | {row['overhead_pct_simulated']:.2f} % "
            f"| {row['round_difference_pct']:+.2f} % |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not os.environ.get("FEDSEAL_DATA_DIR"):
        logger.warning("FEDSEAL_DATA_DIR is not set; fedseal-train looks in its default data folder")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="provenance_runtime_"))
    # fedseal-train appends to an existing run folder, which would mix two runs' costs.
    used = [workdir / f"nodes{n}_{label}" for n in args.nodes for label in ("on", "off") if (workdir / f"nodes{n}_{label}").exists()]
    if used:
        raise SystemExit(f"error: {used[0]} exists from an earlier run; pass an empty --workdir or remove it.")
    workdir.mkdir(parents=True, exist_ok=True)

    load_start = os.getloadavg()
    rows = [bench_nodes(nodes, args, workdir) for nodes in args.nodes]
    load_end = os.getloadavg()

    print("\n".join(results_table(rows)))
    logger.info("load average %s at the start, %s at the end", load_start, load_end)
    if args.out is not None:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "load_start": load_start, "load_end": load_end, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        logger.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()

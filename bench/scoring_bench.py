"""Benchmark encrypted robust scoring: the per-round cost of the statistics and their decryption.

For each node count n, the server computes n squared norms, n(n-1)/2
pairwise squared distances and n inner products with a reference, on
updates encrypted under the ``scoring_8192`` preset
(``crypto.ckks.scoring``), in one process. The script reports medians over
the repeats of each phase's wall-clock and CPU seconds. The statistics run
in one thread, so their CPU seconds estimate what an idle core would take.
It also reports the per-node encryption time, the committee's decryption
time per scalar, the bytes of one encrypted update and of one scalar
ciphertext, and the weighted sum that ``he_robust`` forms after scoring
(one plaintext multiply per chunk and update, the additions and one
rescale per chunk), timed like the statistics.

The round total adds what the server of a ``he_robust`` round pays in
sequence: loading the n updates, the statistics, one committee member's
decryption of every scalar (members decrypt in parallel) and the weighted
sum. The query messages are not included.

With ``--workers K`` it also times `ScoringWorkerPool` with K processes,
starting from the serialized updates, so those times include loading the
ciphertexts (the single-process times do not). Its CPU seconds add up this
process and the workers.

Every update is distinct (identical ciphertexts have no distance), so the
script encrypts max(nodes) + 1 updates, the extra one as the reference.

Usage::

    python bench/scoring_bench.py --params 1000000 --nodes 10 20 --repeats 3 --out scoring.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crypto.ckks import scoring
from crypto.ckks.scoring.aggregate import weighted_sum
from crypto.ckks.scoring.pool import ScoringWorkerPool
from strategies.encrypted_scoring import round_statistics

logger = logging.getLogger("scoring_bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--params", type=int, default=1_000_000, help="Model parameters per update."
    )
    parser.add_argument(
        "--nodes", type=int, nargs="+", default=[10, 20], help="Updates per round."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Timed rounds per node count; medians are reported.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Also time ScoringWorkerPool with this many worker processes (0: single process only).",
    )
    parser.add_argument(
        "--out", type=Path, help="Write the results as JSON to this file."
    )
    args = parser.parse_args(argv)
    for name in ("params", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.nodes) < 2:
        parser.error(f"--nodes must all be >= 2 (a round needs pairs for distances), got {args.nodes}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist; create it first")
    return args


def machine() -> dict[str, Any]:
    """Describe the machine and its load when the run starts."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def timed(function, *args):
    """Return (result, wall-clock seconds) of one call."""
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def score_once(
    public: scoring.ScoringPublicContext, updates: list, reference
) -> tuple[dict[str, float], list]:
    """Compute every statistic of one round; return wall-clock and CPU seconds per phase, and the scalars."""
    scalars: list = []
    seconds: dict[str, float] = {}

    def phase(name: str, compute) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        compute()
        seconds[name] = time.perf_counter() - wall
        seconds[f"{name}_cpu"] = time.process_time() - cpu

    phase(
        "norms",
        lambda: scalars.extend(scoring.squared_norm(public, u) for u in updates),
    )
    pairs = [(i, j) for i in range(len(updates)) for j in range(i + 1, len(updates))]
    phase(
        "distances",
        lambda: scalars.extend(
            scoring.squared_distance(public, updates[i], updates[j]) for i, j in pairs
        ),
    )
    phase(
        "inner_products",
        lambda: scalars.extend(
            scoring.inner_product(public, u, reference) for u in updates
        ),
    )

    seconds["total"] = (
        seconds["norms"] + seconds["distances"] + seconds["inner_products"]
    )
    seconds["total_cpu"] = (
        seconds["norms_cpu"] + seconds["distances_cpu"] + seconds["inner_products_cpu"]
    )
    return seconds, scalars


def child_pids() -> list[int]:
    """Return the ids of this process's child processes (Linux /proc)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        text = (task / "children").read_text(encoding="ascii").split()
        pids += [int(pid) for pid in text]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """Return the CPU seconds used so far by this process and the given child processes."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def score_with_pool(
    pool: ScoringWorkerPool, uploads: list[bytes], reference: bytes, length: int
) -> dict[str, float]:
    """Time one round's statistics in the pool, from serialized updates (loading included)."""
    listed = round_statistics(len(uploads), reference=True)
    statistics_list = [(kind, i, j) for kind, _, i, j in listed]
    pids = child_pids()
    wall, cpu = time.perf_counter(), cpu_seconds(pids)
    pool.compute([*uploads, reference], statistics_list, length)
    return {"total": time.perf_counter() - wall, "total_cpu": cpu_seconds(pids) - cpu}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its results."""
    results: dict[str, Any] = {
        "machine_at_start": machine(),
        "params": args.params,
        "rounds": [],
    }
    secret = scoring.generate_scoring_context()
    public = scoring.ScoringPublicContext.from_bytes(secret.public.serialize())
    results["public_context_bytes"] = len(public.serialize())
    rng = np.random.default_rng(0)

    encrypted, encrypt_seconds = [], []
    for _ in range(max(args.nodes) + 1):
        update = rng.normal(0.0, 1.0 / np.sqrt(args.params), args.params)
        data, seconds = timed(scoring.encrypt_for_scoring, secret, update)
        encrypted.append(data)
        encrypt_seconds.append(seconds)
    results["encrypt_s_per_node"] = statistics.median(encrypt_seconds)
    results["update_bytes_per_param"] = len(encrypted[0]) / args.params

    loaded, load_seconds = [], []
    for data in encrypted:
        update, seconds = timed(
            scoring.ScoringUpdate.from_bytes, public, data, args.params
        )
        loaded.append(update)
        load_seconds.append(seconds)
    results["load_s_per_update"] = statistics.median(load_seconds)
    reference, distinct = loaded[0], loaded[1:]

    for nodes in args.nodes:
        updates = distinct[:nodes]
        repeats = []
        for repeat in range(args.repeats):
            seconds, scalars = score_once(public, updates, reference)
            logger.info("nodes %d repeat %d: %s", nodes, repeat, seconds)
            repeats.append(seconds)

        pooled = []
        if args.workers > 0:
            with ScoringWorkerPool(public, workers=args.workers) as pool:
                # The first call starts the workers; it is not timed.
                pool.compute(encrypted[:1], [("norm", 0, 0)], args.params)
                for repeat in range(args.repeats):
                    pooled.append(
                        score_with_pool(
                            pool, encrypted[1 : nodes + 1], encrypted[0], args.params
                        )
                    )
                    logger.info(
                        "nodes %d pool repeat %d: %s", nodes, repeat, pooled[-1]
                    )

        decrypt_seconds = [
            timed(scoring.decrypt_scalar, secret, scalar)[1] for scalar in scalars[:20]
        ]
        sums = [
            timed(weighted_sum, public, updates, [1.0 / nodes] * nodes)[1]
            for _ in range(args.repeats)
        ]
        logger.info("nodes %d weighted sum: %s", nodes, sums)
        statistics_s = statistics.median(r["total"] for r in repeats)
        round_total = (
            nodes * results["load_s_per_update"]
            + statistics_s
            + len(scalars) * statistics.median(decrypt_seconds)
            + statistics.median(sums)
        )
        results["rounds"].append(
            {
                "nodes": nodes,
                "scalars": len(scalars),
                "median_s": {
                    key: statistics.median(r[key] for r in repeats)
                    for key in repeats[0]
                },
                "all_total_s": [r["total"] for r in repeats],
                "all_total_cpu_s": [r["total_cpu"] for r in repeats],
                "pool_workers": args.workers,
                "pool_median_s": {
                    key: statistics.median(r[key] for r in pooled) for key in pooled[0]
                }
                if pooled
                else None,
                "pool_all_total_s": [r["total"] for r in pooled],
                "decrypt_s_per_scalar": statistics.median(decrypt_seconds),
                "weighted_sum_s": statistics.median(sums),
                "round_total_s": round_total,
                "scalar_bytes": len(scalars[0].serialize()),
                "load_average_after": list(os.getloadavg()),
            }
        )
    return results


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark from the command line and print the results as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Benchmark encrypted aggregation: plaintext FedAvg against the CKKS presets.

For each model size and client count, the script measures upload and download
bytes per parameter and the client encryption, server aggregation and client
decryption times. It reports them for plaintext float32 FedAvg,
``tenseal_default``, ``compact_wide`` and ``compact`` in the same run, with
each round's overhead against plaintext. Each cell reports medians over the repeats, of wall-clock
seconds and of CPU seconds (this process plus its worker processes).

Only ``--measured-clients`` distinct clients encrypt (each one is timed). The
server then aggregates ``--clients`` batches made by cycling through their
ciphertexts, so a 100-client aggregation performs 100 real validations and
additions without 100 encryptions. Each cell gives two round totals:

- ``critical_path_s = encrypt + aggregate + decrypt``: the crypto latency
  one round adds when, as in a deployment, every client encrypts and
  decrypts on its own machine in parallel;
- ``round_s = clients * encrypt + aggregate + decrypt``: all crypto work of
  the round, as if one machine did it for every client.

Reused ciphertexts carry the same noise, which would add up coherently, so
precision is measured separately, with distinct clients (``--error-clients``)
on a vector of ``--error-params`` values.

Usage::

    python bench/ckks_bench.py --params 100000 1000000 10000000 \\
        --clients 10 100 --repeats 3 --out ckks.json
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
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from crypto import ckks

logger = logging.getLogger("ckks_bench")

HE_PRESETS = ("tenseal_default", "compact_wide", "compact")
PHASES = ("encrypt", "aggregate", "decrypt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params", type=int, nargs="+", default=[100_000, 1_000_000],
        help="model sizes, in parameters (default: 100000 1000000)",
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[10],
        help="client counts aggregated per round (default: 10)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per cell (default: 3)")
    parser.add_argument(
        "--measured-clients", type=int, default=2,
        help="distinct clients that encrypt per repeat; their batches are reused (default: 2)",
    )
    parser.add_argument(
        "--workers", type=int, default=2,
        help="worker processes for CKKS work, 1 for in-process (default: 2)",
    )
    parser.add_argument(
        "--cell-budget-s", type=float, default=60.0,
        help="seconds after which a preset stops repeating at one model size; it always "
        "completes one repeat (default: 60)",
    )
    parser.add_argument(
        "--error-clients", type=int, nargs="*", default=[10, 1000],
        help="distinct client counts for the precision check (default: 10 1000)",
    )
    parser.add_argument(
        "--error-params", type=int, default=16_384,
        help="vector length of the precision check (default: 16384)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args(argv)

    for name in ("repeats", "measured_clients", "workers", "error_params"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def machine_info() -> dict[str, Any]:
    """Describe the CPU, memory, load and library versions of this machine."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    memory_gib = None
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
                break

    # Every SEAL serialization starts with a header whose bytes 3 and 4 are
    # the SEAL major and minor version.
    parameters = ckks.generate_context("compact").public.seal_context.key_context_data().parms()
    with ckks.SealBytesIO() as scratch:
        header = scratch.save(parameters)

    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "load_average_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tenseal": metadata.version("tenseal"),
        "seal_header_version": f"{header[3]}.{header[4]}",
    }


def make_updates(count: int, length: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Return float32 updates whose mean has entries of magnitude 1e-2 to 1."""
    base = rng.choice([-1.0, 1.0], length) * 10 ** rng.uniform(-2, 0, length)
    return [
        (base * (1 + 0.1 * rng.standard_normal(length))).astype(np.float32) for _ in range(count)
    ]


def cpu_seconds(pids: Sequence[int]) -> float:
    """Return the CPU seconds used so far by this process and the given child processes."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def timed(function: Callable[[], Any], pids: Sequence[int] = ()) -> tuple[Any, float, float]:
    """Call a function; return its result, the wall-clock seconds and the CPU seconds."""
    cpu_start = cpu_seconds(pids)
    start = time.perf_counter()
    result = function()
    wall = time.perf_counter() - start
    return result, wall, cpu_seconds(pids) - cpu_start


def batch_bytes(batch: list[bytes]) -> int:
    """Return the total size of a batch, header included."""
    return sum(len(part) for part in batch)


def new_samples() -> dict[str, list[float]]:
    """Return empty sample lists for the wall and CPU time of every phase."""
    return {f"{phase}_{clock}": [] for phase in PHASES for clock in ("wall", "cpu")}


def record(samples: dict[str, list[float]], phase: str, wall: float, cpu: float) -> None:
    """Append one wall and CPU sample of a phase."""
    samples[f"{phase}_wall"].append(wall)
    samples[f"{phase}_cpu"].append(cpu)


def measure_plaintext(
    updates: list[np.ndarray], client_counts: list[int], repeats: int
) -> dict[int, dict[str, Any]]:
    """Time plaintext float32 FedAvg: serialize, weighted sum, deserialize."""
    length = updates[0].size
    samples = {n: new_samples() for n in client_counts}

    for _ in range(repeats):
        uploads = []
        for update in updates:
            upload, wall, cpu = timed(update.tobytes)
            uploads.append(upload)
            for n in client_counts:
                record(samples[n], "encrypt", wall, cpu)

        for n in client_counts:
            received = [uploads[i % len(uploads)] for i in range(n)]
            total, wall, cpu = timed(lambda: weighted_float32_sum(received).tobytes())
            record(samples[n], "aggregate", wall, cpu)

            _, wall, cpu = timed(lambda: np.frombuffer(total, np.float32).copy())
            record(samples[n], "decrypt", wall, cpu)

    return {
        n: summarize(samples[n], n, upload_bytes=4 * length, download_bytes=4 * length,
                     length=length)
        for n in client_counts
    }


def weighted_float32_sum(uploads: list[bytes]) -> np.ndarray:
    """Average serialized float32 vectors with equal weights, as FedAvg does."""
    weight = np.float32(1 / len(uploads))
    total = np.zeros(len(uploads[0]) // 4, dtype=np.float32)
    for upload in uploads:
        total += weight * np.frombuffer(upload, np.float32)
    return total


def measure_preset(
    preset: str,
    updates: list[np.ndarray],
    args: argparse.Namespace,
    pool: ckks.CkksWorkerPool | None,
    secret: ckks.SecretContext,
) -> dict[int, dict[str, Any]]:
    """Time encryption, aggregation and decryption of one CKKS preset.

    One repeat encrypts every measured client, aggregates once per client
    count and decrypts the last aggregate. Repeats stop early, after at least
    one, once the preset has used ``args.cell_budget_s`` at this size. Every
    client uses the weight 1 / max(client counts), so no aggregate in the run
    exceeds the preset's headroom.
    """
    length = updates[0].size
    weight = 1.0 / max(args.clients)
    pids = pool.worker_pids if pool is not None else ()
    shared = new_samples()
    aggregate = {n: new_samples() for n in args.clients}
    sizes: dict[int, tuple[int, int]] = {}
    started = time.perf_counter()

    for repeat in range(args.repeats):
        if repeat > 0 and time.perf_counter() - started > args.cell_budget_s:
            logger.info("%s, %d params: stopping after %d repeats (budget)", preset, length, repeat)
            break

        batches = []
        for update in updates:
            batch, wall, cpu = timed(
                lambda: ckks.encrypt_update(secret, update, weight, pool=pool), pids
            )
            batches.append(batch)
            record(shared, "encrypt", wall, cpu)

        for n in args.clients:
            received = [batches[i % len(batches)] for i in range(n)]
            result, wall, cpu = timed(
                lambda: ckks.aggregate_batches(received, secret.public, length, pool=pool), pids
            )
            if result.rejected:
                raise RuntimeError(f"{preset}: aggregation rejected batches {result.rejected}")
            record(aggregate[n], "aggregate", wall, cpu)
            sizes[n] = (batch_bytes(batches[0]), batch_bytes(result.batch))

        _, wall, cpu = timed(
            lambda: ckks.decrypt_sum(secret, result.batch, length, pool=pool), pids
        )
        record(shared, "decrypt", wall, cpu)
        logger.info(
            "%s, %d params, repeat %d: encrypt %.3f s, aggregate %s s, decrypt %.3f s",
            preset, length, repeat + 1, statistics.median(shared["encrypt_wall"][-len(updates):]),
            ", ".join(f"{aggregate[n]['aggregate_wall'][-1]:.3f}" for n in args.clients), wall,
        )

    cells = {}
    for n in args.clients:
        samples = {**shared, "aggregate_wall": aggregate[n]["aggregate_wall"],
                   "aggregate_cpu": aggregate[n]["aggregate_cpu"]}
        cells[n] = summarize(samples, n, upload_bytes=sizes[n][0], download_bytes=sizes[n][1],
                             length=length)
    return cells


def summarize(
    samples: dict[str, list[float]], clients: int, *, upload_bytes: int, download_bytes: int,
    length: int,
) -> dict[str, Any]:
    """Reduce timing samples to medians and per-round totals."""
    medians = {key: statistics.median(values) for key, values in samples.items()}
    cell: dict[str, Any] = {
        "upload_bytes_per_param": upload_bytes / length,
        "download_bytes_per_param": download_bytes / length,
        "client_encrypt_s": medians["encrypt_wall"],
        "server_aggregate_s": medians["aggregate_wall"],
        "client_decrypt_s": medians["decrypt_wall"],
        "client_encrypt_cpu_s": medians["encrypt_cpu"],
        "server_aggregate_cpu_s": medians["aggregate_cpu"],
        "client_decrypt_cpu_s": medians["decrypt_cpu"],
        "repeats": len(samples["aggregate_wall"]),
        "samples": samples,
    }
    cell["critical_path_s"] = (
        cell["client_encrypt_s"] + cell["server_aggregate_s"] + cell["client_decrypt_s"]
    )
    cell["round_s"] = (
        clients * cell["client_encrypt_s"] + cell["server_aggregate_s"] + cell["client_decrypt_s"]
    )
    cell["round_cpu_s"] = (
        clients * cell["client_encrypt_cpu_s"] + cell["server_aggregate_cpu_s"]
        + cell["client_decrypt_cpu_s"]
    )
    return cell


def measure_precision(
    preset: str,
    secret: ckks.SecretContext,
    client_counts: list[int],
    length: int,
    pool: ckks.CkksWorkerPool | None,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Sum distinct encrypted updates and compare the decryption with float64."""
    results = []
    for n in client_counts:
        updates = make_updates(n, length, rng)
        weights = rng.uniform(0.5, 1.5, n)
        weights /= weights.sum()

        exact = np.zeros(length)
        batches = []
        for update, weight in zip(updates, weights):
            exact += weight * update.astype(np.float64)
            batches.append(ckks.encrypt_update(secret, update, float(weight), pool=pool))

        result = ckks.aggregate_batches(batches, secret.public, length, pool=pool)
        total = ckks.decrypt_sum(secret, result.batch, length, pool=pool)
        error = np.abs(total - exact)
        results.append({
            "preset": preset,
            "clients": n,
            "params": length,
            "max_abs_error": float(error.max()),
            "max_rel_error": float(np.max(error / np.abs(exact))),
            "min_abs_exact": float(np.abs(exact).min()),
        })
        logger.info(
            "%s precision, %d clients: max abs error %.3g, max relative error %.3g",
            preset, n, results[-1]["max_abs_error"], results[-1]["max_rel_error"],
        )
    return results


def add_overheads(results: list[dict[str, Any]]) -> None:
    """Add each cell's round overhead and ratio against plaintext of the same size."""
    plaintext = {
        (row["params"], row["clients"]): row["round_s"]
        for row in results if row["preset"] == "plaintext"
    }
    for row in results:
        baseline = plaintext[(row["params"], row["clients"])]
        row["overhead_vs_plaintext_s"] = row["round_s"] - baseline
        row["round_ratio_vs_plaintext"] = row["round_s"] / baseline


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement and return the report."""
    rng = np.random.default_rng(args.seed)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": {key: str(value) if isinstance(value, Path) else value
                     for key, value in vars(args).items()},
        "results": [],
        "precision": [],
    }
    contexts = {preset: ckks.generate_context(preset) for preset in HE_PRESETS}
    pools = {
        preset: ckks.CkksWorkerPool(context, args.workers) if args.workers > 1 else None
        for preset, context in contexts.items()
    }

    try:
        for length in args.params:
            updates = make_updates(args.measured_clients, length, rng)
            cells = {"plaintext": measure_plaintext(updates, args.clients, args.repeats)}
            for preset in HE_PRESETS:
                cells[preset] = measure_preset(
                    preset, updates, args, pools[preset], contexts[preset]
                )

            for preset, by_clients in cells.items():
                for clients, cell in by_clients.items():
                    report["results"].append(
                        {"preset": preset, "params": length, "clients": clients, **cell}
                    )

        for preset in HE_PRESETS:
            report["precision"].extend(measure_precision(
                preset, contexts[preset], args.error_clients, args.error_params, pools[preset], rng
            ))
    finally:
        for pool in pools.values():
            if pool is not None:
                pool.close()

    add_overheads(report["results"])
    report["machine"]["load_average_end"] = os.getloadavg()
    return report


def log_table(report: dict[str, Any]) -> None:
    """Log the medians as one line per cell."""
    for row in report["results"]:
        logger.info(
            "%-15s %9d params %4d clients: up %6.2f B/param, down %6.2f B/param, encrypt "
            "%.3f s, aggregate %.3f s, decrypt %.3f s, critical path %.3f s, round %.3f s "
            "(CPU %.3f s), %.0fx plaintext",
            row["preset"], row["params"], row["clients"], row["upload_bytes_per_param"],
            row["download_bytes_per_param"], row["client_encrypt_s"], row["server_aggregate_s"],
            row["client_decrypt_s"], row["critical_path_s"], row["round_s"], row["round_cpu_s"],
            row["round_ratio_vs_plaintext"],
        )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the JSON report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("crypto.ckks.codec").setLevel(logging.WARNING)
    args = parse_args(argv)
    started = time.perf_counter()

    report = run(args)
    report["wall_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    log_table(report)
    logger.info("wrote %s after %.0f s", args.out, report["wall_s"])


if __name__ == "__main__":
    main()

"""Benchmark DP-SGD step time against non-private training, for every scenario.

For each scenario the script loads node 0 of an iid partition. It times one
local epoch of the scenario's own ``fit`` (non-private) and one epoch of
``privacy.dp_sgd.PrivateTrainer`` (Opacus per-example clipping, noise and
Poisson sampling), on the same data with the same learning rate. It reports
the median seconds per optimizer step over the repeats, after one warm-up
epoch each, and the median ratio of back-to-back epoch pairs, which is
less sensitive to load from other processes. Torch runs on one thread, as
on a node.

For the recommendations scenario a DP-SGD example is a user (all of their
ratings), while the non-private loop steps over single ratings. The two step
times therefore cover different amounts of data, and the table gives both
batch sizes.

Usage::

    FEDSEAL_DATA_DIR=/path/to/datasets python bench/dp_bench.py --repeats 3 --out dp_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from privacy.dp_sgd import DPSGDSettings, PrivateTrainer
from scenarios import get_scenario
from scenarios.base import NodeData, PartitionSettings, Scenario, TrainSettings
from scenarios.datasets import resolve_data_root

logger = logging.getLogger("dp_bench")

# Batch size and learning rate of conf/scenario/<name>.yaml, and the DP batch
# size in privacy units (users for recommendations).
SCENARIOS: dict[str, dict[str, Any]] = {
    "fraud": {"batch_size": 256, "lr": 1e-3, "dp_batch_size": 256},
    "maintenance": {"batch_size": 256, "lr": 1e-3, "dp_batch_size": 256},
    "imaging": {"batch_size": 64, "lr": 1e-3, "dp_batch_size": 64},
    "recommendations": {"batch_size": 256, "lr": 0.02, "dp_batch_size": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=list(SCENARIOS),
        choices=list(SCENARIOS),
        help="scenarios to time (default: all)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=5,
        help="nodes of the iid partition; node 0 is timed (default: 5)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed epochs per loop, after one warm-up epoch (default: 3)",
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=1.0,
        help="DP-SGD noise multiplier (default: 1.0)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="DP-SGD per-example clipping norm (default: 1.0)",
    )
    parser.add_argument(
        "--data-root", default=None, help="dataset folder (default: $FEDSEAL_DATA_DIR)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the results as JSON to this file"
    )
    return parser.parse_args(argv)


def time_epochs(
    scenario: Scenario,
    model: torch.nn.Module,
    node: NodeData,
    initial: OrderedDict,
    settings: TrainSettings,
    trainer: PrivateTrainer,
    repeats: int,
) -> tuple[list[float], list[float]]:
    """Return the seconds of each timed non-private and DP-SGD epoch.

    One warm-up epoch of each comes first. The timed epochs alternate
    between the two loops, so load from other processes affects both alike.
    """
    plain: list[float] = []
    private: list[float] = []
    for repeat in range(repeats + 1):
        model.load_state_dict(initial)
        started = time.perf_counter()
        scenario.fit(model, node, settings)
        plain_seconds = time.perf_counter() - started

        trainer.reseed(repeat)
        started = time.perf_counter()
        trainer.train_round(initial, epochs=1, loss_seed=repeat)
        private_seconds = time.perf_counter() - started

        if repeat > 0:
            plain.append(plain_seconds)
            private.append(private_seconds)
    return plain, private


def bench_scenario(
    name: str, args: argparse.Namespace, data_root: Path
) -> dict[str, Any]:
    """Time both loops on node 0 of ``name`` and return one result row."""
    options = SCENARIOS[name]
    scenario = get_scenario(name)
    node = scenario.load_nodes(
        data_root, PartitionSettings(num_nodes=args.nodes, scheme="iid", seed=0)
    )[0]
    torch.manual_seed(0)
    model = scenario.build_model()
    initial = OrderedDict(
        (key, value.clone()) for key, value in model.state_dict().items()
    )

    settings = TrainSettings(
        epochs=1, batch_size=options["batch_size"], lr=options["lr"], seed=0
    )
    plain_steps = math.ceil(scenario.num_examples(node.train) / settings.batch_size)

    privacy = DPSGDSettings(
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        batch_size=options["dp_batch_size"],
        delta=1e-5,
        state_dir=tempfile.mkdtemp(prefix="dp_bench_"),
        noise_seed=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        trainer = PrivateTrainer(scenario, node, privacy, settings, partition_id=0)
    plain, private = time_epochs(
        scenario, model, node, initial, settings, trainer, args.repeats
    )

    plain_step = statistics.median(plain) / plain_steps
    private_step = statistics.median(private) / trainer.steps_per_epoch
    pair_ratios = [
        (dp / trainer.steps_per_epoch) / (base / plain_steps)
        for base, dp in zip(plain, private)
    ]
    row = {
        "scenario": name,
        "examples": scenario.num_examples(node.train),
        "dp_units": trainer.num_units,
        "batch_size": settings.batch_size,
        "dp_batch_size": min(options["dp_batch_size"], trainer.num_units),
        "steps_per_epoch": plain_steps,
        "dp_steps_per_epoch": trainer.steps_per_epoch,
        "plain_step_ms": 1000 * plain_step,
        "dp_step_ms": 1000 * private_step,
        "step_ratio": statistics.median(pair_ratios),
        "plain_epoch_s": statistics.median(plain),
        "dp_epoch_s": statistics.median(private),
    }
    logger.info(
        "%s: %.3f ms per plain step, %.3f ms per DP-SGD step (x%.2f)",
        name,
        row["plain_step_ms"],
        row["dp_step_ms"],
        row["step_ratio"],
    )
    return row


def machine() -> dict[str, Any]:
    """Describe the machine and library versions."""
    from importlib.metadata import version

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": version("opacus"),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, log a Markdown table and optionally write JSON."""
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    args = parse_args(argv)
    torch.set_num_threads(1)
    data_root = resolve_data_root(args.data_root)

    rows = [bench_scenario(name, args, data_root) for name in args.scenarios]
    result = {
        "machine": machine(),
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "repeats": args.repeats,
        "rows": rows,
    }

    header = "| scenario | batch (plain / DP) | steps per epoch (plain / DP) | plain ms/step | DP-SGD ms/step | ratio |"
    lines = [header, "|---|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['batch_size']} / {row['dp_batch_size']} | {row['steps_per_epoch']} / {row['dp_steps_per_epoch']} "
            f"| {row['plain_step_ms']:.2f} | {row['dp_step_ms']:.2f} | {row['step_ratio']:.2f} |"
        )
    logger.info("Results:\n%s", "\n".join(lines))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        logger.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()

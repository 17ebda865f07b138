"""Benchmark DP-SGD step time against non-private training, for every scenario.

For each scenario the script loads node 0 of an iid partition. It times one
local epoch of the scenario's own ``fit`` (non-private) and one epoch of
``privacy.dp_sgd.PrivateTrainer`` (per-example clipping, noise and Poisson
sampling) per clipping mode: Opacus's per-example gradient hooks
(``per_example_clipping=opacus``) and the default (``auto``), where the
default picks a different mode. Every loop uses the batch size and learning
rate of ``conf/scenario/<name>.yaml`` and the same data. The script reports
the median milliseconds per optimizer step over the repeats, after one
warm-up epoch each, and the median ratio of back-to-back epoch pairs, which
is less sensitive to load from other processes. Both come as wall-clock and
as CPU time of the process. The CPU time leaves out waits for a core, so it
is the steadier figure on a shared machine. Torch runs on one thread, as on
a node.

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
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from privacy.dp_sgd import DPSGDSettings, PrivateTrainer
from scenarios import get_scenario
from scenarios.base import NodeData, PartitionSettings, Scenario, TrainSettings
from scenarios.datasets import resolve_data_root

logger = logging.getLogger("dp_bench")

SCENARIOS = ("fraud", "maintenance", "imaging", "recommendations")

# Batch size and learning rate come from each scenario's config.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "scenario"

# DP batch sizes in privacy units where they differ from the config's batch
# size: 32 users per recommendations step in place of 256 ratings.
DP_BATCH_SIZES = {"recommendations": 32}

CLOCKS = ("wall", "cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=list(SCENARIOS),
        choices=SCENARIOS,
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


def load_train_options(name: str) -> dict[str, Any]:
    """Return the batch size and learning rate of ``conf/scenario/<name>.yaml``, and the DP batch size."""
    config = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    batch_size = int(config["train"]["batch_size"])
    return {
        "batch_size": batch_size,
        "lr": float(config["train"]["lr"]),
        "dp_batch_size": DP_BATCH_SIZES.get(name, batch_size),
    }


def build_trainers(
    scenario: Scenario, node: NodeData, privacy: DPSGDSettings, settings: TrainSettings
) -> dict[str, PrivateTrainer]:
    """Build one DP-SGD trainer per distinct clipping mode: the default (``auto``) and Opacus's hooks."""
    trainers: dict[str, PrivateTrainer] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        for mode in ("auto", "opacus"):
            trainer = PrivateTrainer(
                scenario,
                node,
                replace(privacy, per_example_clipping=mode),
                settings,
                partition_id=0,
            )
            if trainer.clipping not in trainers:
                trainers[trainer.clipping] = trainer
    return trainers


def timed(run: Callable[[], object]) -> dict[str, float]:
    """Run ``run`` once and return its wall-clock and CPU seconds.

    The CPU time of this process leaves out the time it waits for a core,
    so it varies less than the wall clock on a machine shared with other
    jobs. Torch runs on one thread here, so it is close to that thread's time.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def time_epochs(
    scenario: Scenario,
    model: torch.nn.Module,
    node: NodeData,
    initial: OrderedDict,
    settings: TrainSettings,
    trainers: dict[str, PrivateTrainer],
    repeats: int,
) -> dict[str, dict[str, list[float]]]:
    """Time each loop's epochs and return loop -> clock (``wall``, ``cpu``) -> seconds per epoch.

    The loops are ``plain`` (the scenario's ``fit``) and one per DP-SGD
    clipping mode in ``trainers``. One warm-up epoch of each loop comes
    first. The timed epochs alternate between the loops, so load from other
    processes affects all of them alike.
    """
    times: dict[str, dict[str, list[float]]] = {
        loop: {clock: [] for clock in CLOCKS} for loop in ("plain", *trainers)
    }
    for repeat in range(repeats + 1):
        model.load_state_dict(initial)
        epochs = {"plain": timed(partial(scenario.fit, model, node, settings))}
        for mode, trainer in trainers.items():
            trainer.reseed(repeat)
            run = partial(trainer.train_round, initial, epochs=1, loss_seed=repeat)
            epochs[mode] = timed(run)
        if repeat == 0:
            continue
        for loop, seconds in epochs.items():
            for clock in CLOCKS:
                times[loop][clock].append(seconds[clock])
    return times


def draw_noise(trainer: PrivateTrainer) -> list[torch.Tensor]:
    """Draw one step's Gaussian noise as the DP optimizer does: one ``torch.normal`` call per parameter."""
    optimizer = trainer.optimizer
    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    return [
        torch.normal(0.0, std, size=parameter.shape, generator=optimizer.generator)
        for parameter in optimizer.params
    ]


def time_dp_costs(trainer: PrivateTrainer, repeats: int) -> dict[str, float]:
    """Return the CPU milliseconds per step of the Poisson sampling and of the noise draws.

    ``sampling_cpu_ms`` times the loader's batch sampler alone (one uniform
    draw per training unit per step), ``noise_cpu_ms`` the noise of every
    parameter (``draw_noise``). Both are medians over ``repeats`` epochs.
    """
    steps = trainer.steps_per_epoch
    sampling, noise = [], []
    for repeat in range(repeats):
        trainer.reseed(repeat)
        sampling.append(timed(partial(list, trainer.loader.batch_sampler))["cpu"])
        noise.append(timed(lambda: [draw_noise(trainer) for _ in range(steps)])["cpu"])
    return {
        "sampling_cpu_ms": 1000 * statistics.median(sampling) / steps,
        "noise_cpu_ms": 1000 * statistics.median(noise) / steps,
    }


def step_summary(
    plain: list[float], private: list[float], plain_steps: int, dp_steps: int
) -> tuple[float, float]:
    """Return the median milliseconds per DP-SGD step and the median ratio over back-to-back epoch pairs."""
    pair_ratios = [
        (dp / dp_steps) / (base / plain_steps) for base, dp in zip(plain, private)
    ]
    return 1000 * statistics.median(private) / dp_steps, statistics.median(pair_ratios)


def bench_scenario(
    name: str, args: argparse.Namespace, data_root: Path
) -> dict[str, Any]:
    """Time the non-private loop and each DP-SGD clipping mode on node 0 of ``name``; return one result row.

    Keys ending in ``_ms``, ``_ratio`` and ``_epoch_s`` come per clock:
    ``plain_step_ms`` is wall-clock and ``plain_cpu_step_ms`` CPU time, and
    likewise ``<mode>_step_ms`` and ``<mode>_cpu_step_ms``. The default
    mode's sampling and noise costs are ``sampling_cpu_ms`` and ``noise_cpu_ms``.
    """
    options = load_train_options(name)
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
    trainers = build_trainers(scenario, node, privacy, settings)
    times = time_epochs(
        scenario, model, node, initial, settings, trainers, args.repeats
    )

    default = next(iter(trainers.values()))
    dp_steps = default.steps_per_epoch
    row: dict[str, Any] = {
        "scenario": name,
        "examples": scenario.num_examples(node.train),
        "dp_units": default.num_units,
        "batch_size": settings.batch_size,
        "dp_batch_size": min(options["dp_batch_size"], default.num_units),
        "steps_per_epoch": plain_steps,
        "dp_steps_per_epoch": dp_steps,
        "clipping": default.clipping,
    }
    for clock in CLOCKS:
        infix = "" if clock == "wall" else "cpu_"
        plain = times["plain"][clock]
        row[f"plain_{infix}step_ms"] = 1000 * statistics.median(plain) / plain_steps
        row[f"plain_{infix}epoch_s"] = statistics.median(plain)
        for mode in trainers:
            private = times[mode][clock]
            step_ms, ratio = step_summary(plain, private, plain_steps, dp_steps)
            row[f"{mode}_{infix}step_ms"] = step_ms
            row[f"{mode}_{infix}ratio"] = ratio
            row[f"{mode}_{infix}epoch_s"] = statistics.median(private)
    row.update(time_dp_costs(default, args.repeats))
    for mode in trainers:
        logger.info(
            "%s: %.3f ms per plain step, %.3f ms per DP-SGD step with %s clipping "
            "(x%.2f wall clock, x%.2f CPU time)",
            name,
            row["plain_step_ms"],
            row[f"{mode}_step_ms"],
            mode,
            row[f"{mode}_ratio"],
            row[f"{mode}_cpu_ratio"],
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


def _pair(row: dict[str, Any], loop: str, measure: str) -> str:
    """Format a loop's wall-clock and CPU value of ``measure`` (``step_ms`` or ``ratio``) as ``wall / cpu``."""
    return f"{row[f'{loop}_{measure}']:.2f} / {row[f'{loop}_cpu_{measure}']:.2f}"


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    """Return the Markdown table of ``rows``: plain step, Opacus hooks and the default clipping mode.

    Every time and ratio cell gives the wall-clock value, then the CPU-time value.
    """
    header = (
        "| scenario | batch (plain / DP) | steps per epoch (plain / DP) | plain ms/step "
        "| DP-SGD, Opacus hooks: ms/step | ratio | DP-SGD, default clipping: ms/step | ratio |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        mode = row["clipping"]
        default = "same as Opacus hooks | -"
        if mode != "opacus":
            default = (
                f"{_pair(row, mode, 'step_ms')} ({mode}) | {_pair(row, mode, 'ratio')}"
            )
        lines.append(
            f"| {row['scenario']} | {row['batch_size']} / {row['dp_batch_size']} "
            f"| {row['steps_per_epoch']} / {row['dp_steps_per_epoch']} | {_pair(row, 'plain', 'step_ms')} "
            f"| {_pair(row, 'opacus', 'step_ms')} | {_pair(row, 'opacus', 'ratio')} | {default} |"
        )
    return lines


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

    logger.info("Results:\n%s", "\n".join(results_table(rows)))
    for row in rows:
        logger.info(
            "%s, %s clipping: Poisson sampling %.3f ms and noise %.3f ms of CPU time per DP-SGD step",
            row["scenario"],
            row["clipping"],
            row["sampling_cpu_ms"],
            row["noise_cpu_ms"],
        )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        logger.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()

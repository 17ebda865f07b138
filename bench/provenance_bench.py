"""Benchmark what update signatures, their checks and the audit log add to a round.

For each node count, the script builds an MLP of about ``--params``
parameters, one real registry (SQLite in a temporary folder), one audit log
and one Ed25519 key per node, and runs one plaintext FedAvg round in this
process (no Ray, no network):

- server ``configure_train``, with and without ``SignatureVerification``
  (the difference is the hash of the global model);
- on every node: the base version hash of the received model, the payload
  hash of the reply and the signature (``clients.signing``);
- server ``aggregate_train``, with and without the wrapper (the difference is
  the payload hashes, the signature checks, one fsynced audit entry per reply
  and the registry reads and writes).

The reference round is one node's local training plus the server's plain
FedAvg configure and aggregate. The local training defaults to the fraud
scenario's budget per node at its default 5 nodes: 7,000 training examples
(70 % of the 50,000-row file, split 5 ways), 1 epoch, batch size 256. Here the
examples are synthetic and the model is the 1M-parameter MLP. Nodes train and sign in parallel, so the
node-side cost counts once per round and the server-side cost in full.

Usage::

    python bench/provenance_bench.py --nodes 10 100 --repeats 3 --out provenance.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from clients.signing import base_version_hash, sign_update
from crypto import signing
from provenance.audit import AuditLog
from provenance.registry import NodeRegistry, sqlite_url
from strategies.arrival_hashing import timed_payload_hashes
from strategies.signatures import SignatureVerification

logger = logging.getLogger("provenance_bench")

RUN_ID = "bench-run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="model size in parameters (default: 1000000)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100], help="node counts (default: 10 100)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds measured per node count; medians are reported (default: 3)")
    parser.add_argument("--train-examples", type=int, default=7_000, help="training examples per node in the reference round (default: 7000)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs in the reference round (default: 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size in the reference round (default: 256)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("params", "repeats", "train_examples", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.nodes) < 1:
        parser.error(f"--nodes must all be >= 1, got {args.nodes}")
    return args


def machine_info() -> dict[str, Any]:
    """Describe the CPU, memory, load and library versions of this machine."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cryptography": metadata.version("cryptography"),
        "sqlalchemy": metadata.version("sqlalchemy"),
    }


def build_model(params: int, features: int = 64) -> nn.Sequential:
    """Return a 3-layer MLP with about ``params`` parameters (within 1 %)."""
    # Two hidden layers of width h: features*h + h + h*h + h + h + 1 parameters.
    width = int((-(features + 3) + ((features + 3) ** 2 + 4 * (params - 1)) ** 0.5) / 2)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(parameter.numel() for parameter in model.parameters())


def time_local_training(model: nn.Sequential, examples: int, epochs: int, batch_size: int) -> float:
    """Train ``model`` on synthetic binary data; return wall seconds."""
    generator = torch.Generator().manual_seed(1)
    features = model[0].in_features
    inputs = torch.randn(examples, features, generator=generator)
    labels = (torch.rand(examples, 1, generator=generator) < 0.1).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.BCEWithLogitsLoss()

    started = time.perf_counter()
    for _ in range(epochs):
        for start in range(0, examples, batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[start : start + batch_size]), labels[start : start + batch_size])
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


class FixedGrid:
    """The part of Flower's Grid that FedAvg's sampling uses: a fixed node list."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def make_reply(flower_id: int, partition: int, state: OrderedDict[str, torch.Tensor]) -> Message:
    """Build a training reply as the server receives it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{flower_id}",
        src_node_id=flower_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{flower_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": 100.0}),
            "node": ConfigRecord({"partition-id": partition}),
        }
    )
    return make_message(metadata=metadata, content=content)


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """Return ``function()`` and its wall-clock seconds."""
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def measure_round(nodes: int, global_state: OrderedDict[str, torch.Tensor], folder: Path) -> dict[str, float]:
    """Run one round with and without signature checks; return the seconds of each phase."""
    flower_ids = [1000 + node for node in range(nodes)]
    registry = NodeRegistry(sqlite_url(folder / "registry.sqlite"))
    keys = {node: signing.generate_private_key() for node in range(nodes)}
    for node, key in keys.items():
        registry.register(node, signing.public_key_hex(key), f"site-{node}", replace=True)
    audit = AuditLog(folder / "audit.jsonl")
    sampling = {"min_available_nodes": nodes, "min_train_nodes": nodes}
    plain = FedAvg(**sampling)
    checked = SignatureVerification(FedAvg(**sampling), registry, audit, RUN_ID)
    grid = FixedGrid(flower_ids)
    arrays = ArrayRecord(global_state)

    _, configure_plain = timed(lambda: list(plain.configure_train(1, arrays, ConfigRecord({}), grid)))
    messages, configure_checked = timed(lambda: list(checked.configure_train(1, arrays, ConfigRecord({}), grid)))
    sent = {message.metadata.dst_node_id: message for message in messages}

    # Each node's update: the global model plus its own noise.
    replies, node_seconds = [], []
    for node, flower_id in enumerate(flower_ids):
        state = OrderedDict((name, tensor + 0.01 * torch.randn_like(tensor)) for name, tensor in global_state.items())
        reply = make_reply(flower_id, node, state)
        received = sent[flower_id].content

        def sign(reply: Message = reply, received: RecordDict = received, node: int = node) -> None:
            sign_update(reply.content, keys[node], RUN_ID, 1, node, base_version_hash(received))

        _, seconds = timed(sign)
        node_seconds.append(seconds)
        replies.append(reply)

    _, aggregate_plain = timed(lambda: plain.aggregate_train(1, replies))
    (result, _), aggregate_checked = timed(lambda: checked.aggregate_train(1, replies))
    if result is None:
        raise RuntimeError("Every signed update was rejected; the benchmark setup is wrong.")

    breakdown = measure_parts(replies, keys, registry, AuditLog(folder / "parts.jsonl"))
    registry.close()
    return {
        "configure_plain": configure_plain,
        "configure_overhead": configure_checked - configure_plain,
        "node_sign_median": statistics.median(node_seconds),
        "aggregate_plain": aggregate_plain,
        "aggregate_overhead": aggregate_checked - aggregate_plain,
        **breakdown,
    }


def measure_parts(replies: list[Message], keys: dict, registry: NodeRegistry, audit: AuditLog) -> dict[str, float]:
    """Time the server-side steps of the check one by one, for all replies together."""
    _, hashing = timed(lambda: timed_payload_hashes(replies))

    records = [reply.content.config_records[signing.SIGNATURE_RECORD] for reply in replies]
    public_keys = [signing.load_public_key(signing.public_key_hex(keys[node])) for node in range(len(replies))]
    checks = list(zip(public_keys, records))
    _, verifying = timed(lambda: [signing.verify_digest(key, bytes.fromhex(record[signing.DIGEST_KEY]), record[signing.SIGNATURE_KEY]) for key, record in checks])

    def append_all() -> None:
        for node, record in enumerate(records):
            audit.append("update_accepted", check="signature", round=1, partition=node, digest=record[signing.DIGEST_KEY], signature=record[signing.SIGNATURE_KEY].hex())

    _, auditing = timed(append_all)
    _, registry_io = timed(lambda: (registry.list_nodes(), registry.record_contributions(range(len(replies)))))
    return {"part_hash": hashing, "part_verify": verifying, "part_audit": auditing, "part_registry": registry_io}


def summarize(samples: list[dict[str, float]], train_seconds: float) -> dict[str, float]:
    """Return the medians over repeats and the overhead relative to the reference round."""
    medians = {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}
    reference = train_seconds + medians["configure_plain"] + medians["aggregate_plain"]
    overhead = medians["node_sign_median"] + medians["configure_overhead"] + medians["aggregate_overhead"]
    return {
        **medians,
        "train": train_seconds,
        "round_reference": reference,
        "round_overhead": overhead,
        "overhead_percent": 100.0 * overhead / reference,
    }


def print_table(results: dict[int, dict[str, float]]) -> None:
    """Log one line per node count, times in milliseconds."""
    header = f"{'nodes':>5} {'train':>8} {'aggr':>8} {'sign/node':>10} {'configure+':>10} {'aggregate+':>10} {'overhead':>9} {'%':>6}"
    logger.info(header)
    for nodes, row in results.items():
        logger.info(
            "%5d %8.1f %8.1f %10.1f %10.1f %10.1f %9.1f %6.2f",
            nodes,
            1000 * row["train"],
            1000 * row["aggregate_plain"],
            1000 * row["node_sign_median"],
            1000 * row["configure_overhead"],
            1000 * row["aggregate_overhead"],
            1000 * row["round_overhead"],
            row["overhead_percent"],
        )
    logger.info("Server-side parts, all replies together (ms):")
    logger.info(f"{'nodes':>5} {'hash':>8} {'verify':>8} {'audit':>8} {'registry':>9}")
    for nodes, row in results.items():
        logger.info("%5d %8.1f %8.1f %8.1f %9.1f", nodes, 1000 * row["part_hash"], 1000 * row["part_verify"], 1000 * row["part_audit"], 1000 * row["part_registry"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and log (and optionally write) the results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Flower, the registry and the wrapper log every call at INFO.
    for name in ("flwr", "provenance", "strategies"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    # Flower 1.42 stamps new Messages with the run of the current process;
    # outside a ServerApp none is set.
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0

    model = build_model(args.params)
    parameters = count_parameters(model)
    train_seconds = statistics.median(time_local_training(model, args.train_examples, args.epochs, args.batch_size) for _ in range(args.repeats))
    global_state = OrderedDict((name, tensor.detach().clone()) for name, tensor in model.state_dict().items())
    logger.info("Model: %d parameters; reference local training: %.3f s", parameters, train_seconds)

    results: dict[int, dict[str, float]] = {}
    for nodes in args.nodes:
        samples = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="provenance-bench-") as folder:
                samples.append(measure_round(nodes, global_state, Path(folder)))
        results[nodes] = summarize(samples, train_seconds)
    print_table(results)

    report = {
        "machine": machine,
        "parameters": parameters,
        "train_examples": args.train_examples,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds_total": time.perf_counter() - started,
        "load_average_end": os.getloadavg(),
        "results": {str(nodes): row for nodes, row in results.items()},
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        logger.info("Results written to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

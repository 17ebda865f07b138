"""The task description that the server sends to every node, and node-side data loading.

The server owns the Hydra configuration. Nodes only see a ``TaskSpec``, sent as
one JSON string in each message's ConfigRecord, so a ClientApp behaves the
same in simulation, under ``flwr run`` and on a SuperNode.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scenarios import get_scenario
from scenarios.base import NodeData, PartitionSettings, Scenario, TrainSettings
from scenarios.datasets import resolve_data_root

logger = logging.getLogger(__name__)

# ConfigRecord key that carries the JSON-encoded TaskSpec.
TASK_KEY = "fedseal-task"


@dataclass(frozen=True)
class TaskSpec:
    """Everything a node needs to build its data and model and to train.

    Parameters
    ----------
    scenario : str
        Registered scenario name (``fraud``, ``maintenance``, ``imaging``,
        ``recommendations``).
    options : dict
        Keyword arguments of the scenario class.
    partition : PartitionSettings
        How the dataset is split across nodes; identical on every node.
    train : TrainSettings
        Local budget. Its ``seed`` is the run seed; ``round_seed`` derives the
        per-round, per-node seed from it.
    data_root : str or None
        Dataset folder. A node's own ``data-root`` node config overrides it.
    allow_download : bool
        Whether a node may fetch missing files from their canonical URL.
    encryption : dict or None
        CKKS settings (``clients.encrypted.EncryptionSpec`` fields) when
        updates are encrypted; None for plaintext aggregation.
    attack : dict or None
        Simulated attack settings that nodes act on (data poisoning), with
        the attacker partition ids; None without an attack.
    privacy : dict or None
        Differential-privacy settings for node-side training; None without DP.
    provenance : dict or None
        Update signing: ``run_id`` (the server's id of this run, which nodes
        sign) and ``keys_dir`` (simulation only: the folder with the nodes'
        ``signing/node-<id>/signing.key``); None when signatures are off.
    """

    scenario: str
    options: dict[str, Any] = field(default_factory=dict)
    partition: PartitionSettings = field(default_factory=lambda: PartitionSettings(num_nodes=1))
    train: TrainSettings = field(default_factory=TrainSettings)
    data_root: str | None = None
    allow_download: bool = True
    encryption: dict[str, Any] | None = None
    attack: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Serialize to a JSON string with sorted keys (stable across processes)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        """Parse a string made by ``to_json``."""
        raw = json.loads(text)
        return cls(
            scenario=raw["scenario"],
            options=dict(raw.get("options", {})),
            partition=PartitionSettings(**raw["partition"]),
            train=TrainSettings(**raw["train"]),
            data_root=raw.get("data_root"),
            allow_download=bool(raw.get("allow_download", True)),
            encryption=raw.get("encryption"),
            attack=raw.get("attack"),
            privacy=raw.get("privacy"),
            provenance=raw.get("provenance"),
        )

    def round_seed(self, server_round: int, partition_id: int) -> int:
        """Return the seed for one node's local training in one round."""
        return (self.train.seed * 1_000_003 + server_round * 1_009 + partition_id) % (2**31 - 1)


@functools.lru_cache(maxsize=8)
def _cached_scenario(name: str, options_json: str) -> Scenario:
    return get_scenario(name, **json.loads(options_json))


def scenario_for(spec: TaskSpec) -> Scenario:
    """Return the (per-process cached) scenario object of ``spec``."""
    return _cached_scenario(spec.scenario, json.dumps(spec.options, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _cached_nodes(spec_json: str, data_root: str) -> tuple[NodeData, ...]:
    spec = TaskSpec.from_json(spec_json)
    logger.info(
        "Loading scenario %s for %d nodes from %s", spec.scenario, spec.partition.num_nodes, data_root
    )
    return tuple(scenario_for(spec).load_nodes(Path(data_root), spec.partition))


def load_all_nodes(spec: TaskSpec, data_root: str | None = None) -> list[NodeData]:
    """Load every node's data for ``spec``; cached per process.

    ``data_root`` overrides ``spec.data_root``. The result is shared between
    calls, so callers must not modify it.
    """
    root = resolve_data_root(data_root or spec.data_root)
    if not spec.allow_download:
        # Scenario loaders take no download flag, so the spec's choice reaches
        # the datasets module through its offline switch, for this process.
        os.environ["FEDSEAL_OFFLINE"] = "1"
    return list(_cached_nodes(spec.to_json(), str(root)))


def load_node(spec: TaskSpec, partition_id: int, data_root: str | None = None) -> NodeData:
    """Return the data of node ``partition_id``.

    Raises
    ------
    ValueError
        If ``partition_id`` is outside ``0 .. num_nodes - 1``.
    """
    num_nodes = spec.partition.num_nodes
    if not 0 <= partition_id < num_nodes:
        raise ValueError(
            f"partition-id {partition_id} is out of range for {num_nodes} nodes; "
            f"set the node config partition-id to 0..{num_nodes - 1}."
        )
    return load_all_nodes(spec, data_root)[partition_id]

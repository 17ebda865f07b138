"""The fedseal ClientApp: one node's side of every round.

Each message carries the global model (ArrayRecord ``arrays``) and a
ConfigRecord ``config`` with the JSON ``TaskSpec`` and the server round. The
node answers with its new model and a MetricRecord, plus a ConfigRecord
``node`` that names its partition so the server can order replies stably.

Node config keys (set by the simulation, or ``flower-supernode --node-config``):
``partition-id`` and ``num-partitions`` (required), ``data-root`` (optional,
overrides the server's suggestion).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.local import evaluate_node, train_node
from scenarios.spec import TASK_KEY, TaskSpec

logger = logging.getLogger(__name__)

# Keys of the records in messages and replies.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NODE_KEY = "node"

app = ClientApp()


def node_identity(context: Context, spec: TaskSpec) -> int:
    """Return this node's partition id, checked against the task's node count.

    Raises
    ------
    ValueError
        If the node config lacks ``partition-id`` or its ``num-partitions``
        differs from the server's ``nodes`` setting.
    """
    if "partition-id" not in context.node_config:
        raise ValueError(
            "Node config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M'."
        )
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", spec.partition.num_nodes))
    if num_partitions != spec.partition.num_nodes:
        raise ValueError(
            f"This node has num-partitions={num_partitions} but the server runs nodes="
            f"{spec.partition.num_nodes}; make them equal (the server's 'nodes' setting "
            "or the SuperNode's --node-config)."
        )
    return partition_id


def _data_root(context: Context) -> str | None:
    root = context.node_config.get("data-root")
    return str(root) if root else None


def _metric_record(metrics: dict[str, float]) -> MetricRecord:
    # A metric undefined on this node (one class in its test split) is sent
    # as NaN; the server's averaging skips it.
    return MetricRecord({key: float(value) for key, value in metrics.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data for one round."""
    config = msg.content[CONFIG_KEY]
    spec = TaskSpec.from_json(str(config[TASK_KEY]))
    server_round = int(config["server-round"])
    partition_id = node_identity(context, spec)

    state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    new_state, metrics = train_node(spec, partition_id, state, server_round, _data_root(context))
    logger.info("Node %d finished training round %d on %d examples", partition_id, server_round, int(metrics["num-examples"]))

    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(new_state),
            METRICS_KEY: _metric_record(metrics),
            NODE_KEY: ConfigRecord({"partition-id": partition_id}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this node's test split."""
    config = msg.content[CONFIG_KEY]
    spec = TaskSpec.from_json(str(config[TASK_KEY]))
    partition_id = node_identity(context, spec)

    state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    metrics = evaluate_node(spec, partition_id, state, _data_root(context))

    content = RecordDict({METRICS_KEY: _metric_record(metrics), NODE_KEY: ConfigRecord({"partition-id": partition_id})})
    return Message(content=content, reply_to=msg)

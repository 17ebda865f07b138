"""The fedseal ClientApp: one node's side of every round.

Each message carries the global model (ArrayRecord ``arrays``) and a
ConfigRecord ``config`` with the JSON ``TaskSpec`` and the server round. The
node answers with its new model and a MetricRecord, plus a ConfigRecord
``node`` that names its partition so the server can order replies stably.

Node config keys (set by the simulation, or ``flower-supernode --node-config``):
``partition-id`` and ``num-partitions`` (required), ``data-root`` (optional,
overrides the server's suggestion), ``signing-key`` (path of the node's
Ed25519 private key; needed when the server checks update signatures),
``ckks-secret-dir`` (folder with the CKKS secret context), ``state-dir``
(optional folder for the node's privacy ledger under ``privacy=dp_sgd`` and
its model cache; the default is a folder the server names). A SuperNode
starts a new ClientApp process per message, so all of these are read from
disk each time (``clients.node_state``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import encrypted, node_state, robust, signing
from clients.committee import handle_scoring_query
from clients.local import build_model, evaluate_node, train_node
from privacy import is_central
from privacy.central import clip_on_node
from privacy.ledger import BUDGET_EXHAUSTED_ERROR_CODE, PrivacyBudgetExhausted
from scenarios.spec import TASK_KEY, TaskSpec, load_node, scenario_for
from strategies.he_fedavg import (
    BATCH_KEY,
    DENOMINATOR_KEY,
    ENCRYPTION_KEY,
    INITIAL_HASH_KEY,
    MODEL_RECORD,
    UPDATE_RECORD,
    batch_digest,
)

logger = logging.getLogger(__name__)

# Keys of the records in messages and replies.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NODE_KEY = "node"

# Train-reply metrics with the node's own timings, in seconds.
TRAIN_SECONDS_KEY = "train_seconds"
ENCRYPT_SECONDS_KEY = "encrypt_seconds"

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
    node_state.check_node_files(dict(context.node_config))
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", spec.partition.num_nodes))
    # With a validator node (he_robust, trust rule) the federation has one node more than it has training partitions.
    allowed = {spec.partition.num_nodes, spec.partition.num_nodes + 1} if robust.has_validator(spec.encryption) else {spec.partition.num_nodes}
    if num_partitions not in allowed:
        raise ValueError(
            f"This node has num-partitions={num_partitions} but the server runs nodes="
            f"{spec.partition.num_nodes}; make them equal (the server's 'nodes' setting "
            "or the SuperNode's --node-config)."
        )
    return partition_id


def _data_root(context: Context) -> str | None:
    root = context.node_config.get("data-root")
    return str(root) if root else None


def _state_dir(context: Context) -> str | None:
    state_dir = node_state.state_dir(dict(context.node_config))
    return str(state_dir) if state_dir else None


def _metric_record(metrics: dict[str, float]) -> MetricRecord:
    # A metric undefined on this node (one class in its test split) is sent
    # as NaN; the server's averaging skips it.
    return MetricRecord({key: float(value) for key, value in metrics.items()})


def _is_encrypted(msg: Message) -> bool:
    return msg.content[CONFIG_KEY].get(ENCRYPTION_KEY) == "ckks"


def _scoring_global(msg: Message, context: Context, spec: TaskSpec):
    """Return (scoring secret context, global state) for a he_robust round, and record the round as seen."""
    config = msg.content[CONFIG_KEY]
    node_config = dict(context.node_config)
    secret = robust.load_scoring_secret(spec.encryption, node_config)
    initial = build_model(scenario_for(spec), spec.train.seed).state_dict()
    if encrypted.state_hash(initial) != config[INITIAL_HASH_KEY]:
        raise ValueError("The initial model rebuilt on this node differs from the server's; check both run the same code and seed.")
    if msg.metadata.message_type in ("train", "evaluate"):
        robust.note_round(spec.encryption, node_config, msg.metadata.run_id, int(config.get("server-round", 0)))
    drift = list(msg.content[MODEL_RECORD][BATCH_KEY]) if MODEL_RECORD in msg.content.config_records else None
    return secret, robust.global_state(secret, initial, drift)


def _encrypted_global(msg: Message, context: Context, spec: TaskSpec):
    """Return (secret context, global state) for an encrypted round."""
    config = msg.content[CONFIG_KEY]
    if robust.is_scoring(config):
        return _scoring_global(msg, context, spec)
    enc_spec = encrypted.EncryptionSpec(**spec.encryption)
    secret = encrypted.load_secret(enc_spec, context.node_config.get("ckks-secret-dir"))

    initial = build_model(scenario_for(spec), spec.train.seed).state_dict()
    if encrypted.state_hash(initial) != config[INITIAL_HASH_KEY]:
        raise ValueError("The initial model rebuilt on this node differs from the server's; check both run the same code and seed.")

    drift = msg.content[MODEL_RECORD][BATCH_KEY] if MODEL_RECORD in msg.content.config_records else None
    version_hash = batch_digest(list(drift)) if drift else str(config[INITIAL_HASH_KEY])
    cache = node_state.ModelCache.for_node(dict(context.node_config))
    is_train = msg.metadata.message_type == "train"
    if cache is not None and not is_train:
        # Training always decrypts, because only decryption checks the overflow bound below.
        cached = cache.get(version_hash)
        if cached is not None:
            return secret, cached

    # Training rounds also check that their sum cannot overflow; evaluation only reads.
    bound = float(enc_spec.update_bound) if is_train else None
    state = encrypted.global_state(secret, initial, drift, update_bound=bound)
    if cache is not None:
        cache.put(version_hash, state, int(config.get("server-round", 0)))
    return secret, state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data for one round."""
    config = msg.content[CONFIG_KEY]
    spec = TaskSpec.from_json(str(config[TASK_KEY]))
    server_round = int(config["server-round"])
    partition_id = node_identity(context, spec)
    node_record = ConfigRecord({"partition-id": partition_id})
    if robust.is_validator(spec.encryption, partition_id, spec.partition.num_nodes):
        return _train_reference(msg, context, spec, partition_id)

    if _is_encrypted(msg):
        secret, state = _encrypted_global(msg, context, spec)
    else:
        state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    started = time.perf_counter()
    try:
        new_state, metrics = train_node(spec, partition_id, state, server_round, _data_root(context), _state_dir(context))
    except PrivacyBudgetExhausted as declined:
        # An error reply, so every strategy skips this node and the round goes on with the others.
        logger.warning("Node %d declines round %d: %s", partition_id, server_round, declined)
        return Message(Error(code=BUDGET_EXHAUSTED_ERROR_CODE, reason=str(declined)), reply_to=msg)
    # Wall-clock seconds of local training (data loading included), for the run's cost records.
    metrics[TRAIN_SECONDS_KEY] = time.perf_counter() - started
    logger.info("Node %d finished training round %d on %d examples", partition_id, server_round, int(metrics["num-examples"]))
    if is_central(spec.privacy) and not _is_encrypted(msg):
        clip_on_node(config, spec.privacy, new_state, state, metrics)

    if _is_encrypted(msg):
        started = time.perf_counter()
        if robust.is_scoring(config):
            # he_robust weights on the server, after scoring the very ciphertext it sums.
            batch = [robust.encrypt_update(secret, new_state, state, float(spec.encryption["norm_bound"]))]
        else:
            weight = metrics["num-examples"] / float(config[DENOMINATOR_KEY])
            batch = encrypted.encrypt_delta(secret, new_state, state, weight, float(spec.encryption["update_bound"]))
        metrics[ENCRYPT_SECONDS_KEY] = time.perf_counter() - started
        content = RecordDict({METRICS_KEY: _metric_record(metrics), UPDATE_RECORD: ConfigRecord({BATCH_KEY: batch}), NODE_KEY: node_record})
    else:
        content = RecordDict({ARRAYS_KEY: ArrayRecord(new_state), METRICS_KEY: _metric_record(metrics), NODE_KEY: node_record})
    # Sign last: the signature covers the payload exactly as sent.
    signing.sign_train_reply(content, msg.content, dict(context.node_config), spec.provenance, partition_id, server_round)
    return Message(content=content, reply_to=msg)


def _train_reference(msg: Message, context: Context, spec: TaskSpec, partition_id: int) -> Message:
    """Train, encrypt and sign the trust reference on the validator's root rows; the reply is never aggregated."""
    config = msg.content[CONFIG_KEY]
    if config.get(robust.ROLE_KEY) != robust.ROLE_VALIDATOR:
        raise ValueError(f"Partition {partition_id} is the validator and only trains the reference; the message does not name the validator role.")
    server_round = int(config["server-round"])
    secret, state = _encrypted_global(msg, context, spec)
    examples = [float(value) for value in config.get(robust.NODE_EXAMPLES_KEY, [])]

    # A SuperNode's own data-root wins over the server's, as for training nodes.
    root = _data_root(context)
    reference_spec = dataclasses.replace(spec, data_root=root) if root else spec
    started = time.perf_counter()
    reference = robust.train_reference(reference_spec, state, server_round, examples)
    seconds = time.perf_counter() - started
    norm = float(np.linalg.norm(reference))
    data = robust.encrypt_vector(secret, reference, float(spec.encryption["norm_bound"]))
    logger.info("Validator (partition %d) trained the round %d reference: norm %.4g in %.2f s", partition_id, server_round, norm, seconds)

    metrics = MetricRecord({robust.REFERENCE_NORM_KEY: norm, TRAIN_SECONDS_KEY: seconds})
    batch = robust.reference_batch(data, norm)
    content = RecordDict({METRICS_KEY: metrics, UPDATE_RECORD: ConfigRecord({BATCH_KEY: batch}), NODE_KEY: ConfigRecord({"partition-id": partition_id})})
    # Signed as a training reply is. The payload hash covers both the encrypted reference and ||r||,
    # and the server checks the signature before scoring with them.
    signing.sign_train_reply(content, msg.content, dict(context.node_config), spec.provenance, partition_id, server_round)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this node's test split."""
    config = msg.content[CONFIG_KEY]
    spec = TaskSpec.from_json(str(config[TASK_KEY]))
    partition_id = node_identity(context, spec)
    if robust.is_validator(spec.encryption, partition_id, spec.partition.num_nodes):
        raise ValueError(f"Partition {partition_id} is the validator, which has no test split; the server must not ask it to evaluate.")

    if _is_encrypted(msg):
        _, state = _encrypted_global(msg, context, spec)
    else:
        state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    metrics = evaluate_node(spec, partition_id, state, _data_root(context))

    content = RecordDict({METRICS_KEY: _metric_record(metrics), NODE_KEY: ConfigRecord({"partition-id": partition_id})})
    return Message(content=content, reply_to=msg)


@app.query("size")
def size(msg: Message, context: Context) -> Message:
    """Return this node's number of training examples (the FedAvg weight)."""
    spec = TaskSpec.from_json(str(msg.content[CONFIG_KEY][TASK_KEY]))
    partition_id = node_identity(context, spec)
    if robust.is_validator(spec.encryption, partition_id, spec.partition.num_nodes):
        metrics = {"num-examples": 0.0, "partition-id": float(partition_id), robust.VALIDATOR_METRIC: 1.0}
        return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
    data = load_node(spec, partition_id, _data_root(context))
    examples = float(scenario_for(spec).num_examples(data.train))
    metrics = {"num-examples": examples, "partition-id": float(partition_id), robust.VALIDATOR_METRIC: 0.0}
    return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


@app.query("canary")
def canary(msg: Message, context: Context) -> Message:
    """Score the current global model and a candidate on this node's test split (A/B)."""
    config = msg.content[CONFIG_KEY]
    spec = TaskSpec.from_json(str(config[TASK_KEY]))
    partition_id = node_identity(context, spec)

    if _is_encrypted(msg) and robust.is_scoring(config):
        secret = robust.load_scoring_secret(spec.encryption, dict(context.node_config))
        initial = build_model(scenario_for(spec), spec.train.seed).state_dict()
        records = msg.content.config_records
        models = {name: robust.global_state(secret, initial, list(records[name][BATCH_KEY]) if name in records else None) for name in ("current", "candidate")}
    elif _is_encrypted(msg):
        enc_spec = encrypted.EncryptionSpec(**spec.encryption)
        secret = encrypted.load_secret(enc_spec, context.node_config.get("ckks-secret-dir"))
        initial = build_model(scenario_for(spec), spec.train.seed).state_dict()
        records = msg.content.config_records
        models = {
            name: encrypted.global_state(secret, initial, records[name][BATCH_KEY] if name in records else None)
            for name in ("current", "candidate")
        }
    else:
        models = {name: msg.content[name].to_torch_state_dict() for name in ("current", "candidate")}

    metrics: dict[str, float] = {}
    for name, state in models.items():
        for key, value in evaluate_node(spec, partition_id, state, _data_root(context)).items():
            metrics[f"{name}.{key}"] = float(value)
    return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


@app.query("scoring")
def scoring(msg: Message, context: Context) -> Message:
    """Decrypt the server's scalar statistics on a committee node, within the round's budget."""
    return handle_scoring_query(msg, context)

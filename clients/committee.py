"""Committee side of encrypted scoring: decrypt a round's scalar statistics, within a budget.

A committee node has the scoring secret context. The server sends it a
``query.scoring`` message with scalar ciphertexts (squared norms, squared
distances, inner products). The node decrypts each one and returns slot 0,
rounded to ``scoring-decimals`` decimal places (node config, default 6).

Per (run, round) it decrypts at most n squared norms, n(n-1)/2 squared
distances and n inner products, where n is the round's update count. n is
fixed by the first request of the round and capped by the node config's
``num-partitions``. A SuperNode starts a new process per message, so the
counters live in ``state-dir/scoring-budget/`` and are updated under a file
lock. A request that would exceed the budget is rejected as a whole,
logged, and answered with an error reply.

Request (ConfigRecord ``scoring``): ``server-round`` int, ``num-updates`` int,
``kinds`` list of "norm" | "distance" | "inner", ``labels`` list of str,
``scalars`` list of bytes (`ScalarCiphertext.serialize`).
Reply (ConfigRecord ``scoring``): ``labels`` and ``values`` (list of float).

Two hardening steps limit what a malicious server learns:

- Round binding: the train and evaluate handlers record the highest round
  this node has seen in the run (`record_seen_round`), and a request for any
  other round is rejected. A server that invents a round number gets no new
  budget unless it also sends this node a train or evaluate message for it.
- Noise flooding: before rounding, each value gets Gaussian noise with
  standard deviation ``scoring-flooding-std`` (node config, default 5e-8).
  That is about 50 times the CKKS decryption noise of a statistic of
  magnitude 1 (about 1e-9) and a tenth of the rounding step's half width
  (5e-7), so a value near a rounding boundary no longer reveals the CKKS
  noise exactly. NOTE: 50 times is a heuristic margin, not the
  statistical-distance bound of formal noise flooding, which needs noise
  about 2^40 times larger than the CKKS noise and so far above the rounding.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from clients import node_state
from crypto.ckks.errors import CkksError
from crypto.ckks.scoring import (
    ScalarCiphertext,
    ScoringSecretContext,
    decrypt_scalar,
    read_scoring_secret_context,
)

__all__ = [
    "KINDS",
    "KIND_DISTANCE",
    "KIND_INNER",
    "KIND_NORM",
    "RECORD_KEY",
    "SCORING_QUERY",
    "SCORING_REJECTED_ERROR_CODE",
    "ScoringBudget",
    "ScoringRequestRejected",
    "budget_limits",
    "decrypt_request",
    "handle_scoring_query",
    "last_seen_round",
    "record_seen_round",
    "scoring_node_config",
]

logger = logging.getLogger(__name__)

# The handler is registered as @app.query("scoring"), so messages use type "query.scoring".
SCORING_QUERY = "scoring"
RECORD_KEY = "scoring"
SCORING_REJECTED_ERROR_CODE = 1101

KIND_NORM = "norm"
KIND_DISTANCE = "distance"
KIND_INNER = "inner"
KINDS = (KIND_NORM, KIND_DISTANCE, KIND_INNER)

DECIMALS_KEY = "scoring-decimals"
DEFAULT_DECIMALS = 6
FLOODING_KEY = "scoring-flooding-std"
DEFAULT_FLOODING_STD = 5e-8
BUDGET_DIR = "scoring-budget"
# ConfigRecord with the task spec, which simulated nodes read their key and state folders from.
TASK_RECORD_KEY = "config"


class ScoringRequestRejected(Exception):
    """A scoring request that this node does not decrypt; the message is the reason."""


def budget_limits(num_updates: int) -> dict[str, int]:
    """Return the per-round decryption limits for a round of `num_updates` updates."""
    return {
        KIND_NORM: num_updates,
        KIND_DISTANCE: num_updates * (num_updates - 1) // 2,
        KIND_INNER: num_updates,
    }


class ScoringBudget:
    """Decryptions used in one (run, round), stored in the node's state folder.

    Parameters
    ----------
    state_dir : Path
        The node's ``state-dir``.
    run_id : int
        Flower run id.
    server_round : int
        Server round the request belongs to.
    """

    def __init__(self, state_dir: Path, run_id: int, server_round: int) -> None:
        folder = Path(state_dir) / BUDGET_DIR
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / f"run-{run_id}-round-{server_round}.json"
        self._lock_path = folder / f"run-{run_id}-round-{server_round}.lock"

    def used(self) -> dict[str, Any]:
        """Return the stored state: ``num_updates`` (None before the first request) and ``used`` counts."""
        if not self.path.exists():
            return {"num_updates": None, "used": dict.fromkeys(KINDS, 0)}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as error:
            # Fail closed: an unreadable counter must not reset the budget.
            raise ScoringRequestRejected(
                f"budget file {self.path} is unreadable ({error}); inspect or remove it by hand"
            ) from error

    def charge(self, num_updates: int, counts: dict[str, int]) -> dict[str, int]:
        """Add `counts` to the round's usage, or raise without changing it.

        Parameters
        ----------
        num_updates : int
            The round's update count n that the request declares.
        counts : dict of str to int
            Decryptions requested, by kind.

        Returns
        -------
        dict of str to int
            The usage after this request, by kind.

        Raises
        ------
        ScoringRequestRejected
            If n differs from the one fixed by the round's first request, or
            a count would exceed its limit.
        """
        with open(self._lock_path, "a") as lock:
            # Processes of one SuperNode may handle requests at the same time.
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.used()
            fixed = state["num_updates"]
            if fixed is not None and fixed != num_updates:
                raise ScoringRequestRejected(
                    f"request declares {num_updates} updates, but this round's first request fixed {fixed}"
                )

            limits = budget_limits(num_updates)
            used = {
                kind: int(state["used"].get(kind, 0)) + int(counts.get(kind, 0))
                for kind in KINDS
            }
            over = [
                f"{kind} {used[kind]} > {limits[kind]}"
                for kind in KINDS
                if used[kind] > limits[kind]
            ]
            if over:
                raise ScoringRequestRejected(
                    f"request exceeds the round's budget ({', '.join(over)})"
                )

            _write_json(self.path, {"num_updates": num_updates, "used": used})
            return used


def _seen_path(state_dir: Path, run_id: int) -> Path:
    folder = Path(state_dir) / BUDGET_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"run-{run_id}-seen.json"


def record_seen_round(state_dir: Path, run_id: int, server_round: int) -> int:
    """Store `server_round` as the highest round this node has seen in run `run_id`; return that highest round.

    The train and evaluate handlers call it, so `decrypt_request` can reject
    requests for rounds that this node never took part in.
    """
    path = _seen_path(state_dir, run_id)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        highest = max(last_seen_round(state_dir, run_id) or 0, int(server_round))
        _write_json(path, {"round": highest})
    return highest


def last_seen_round(state_dir: Path, run_id: int) -> int | None:
    """Return the highest round recorded by `record_seen_round` for run `run_id`, or None."""
    path = _seen_path(state_dir, run_id)
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["round"])
    except (ValueError, KeyError, TypeError) as error:
        raise ScoringRequestRejected(f"round file {path} is unreadable ({error}); inspect or remove it by hand") from error


def _check_round_binding(state_dir: Path, run_id: int, server_round: int) -> None:
    seen = last_seen_round(state_dir, run_id)
    if seen != server_round:
        raise ScoringRequestRejected(
            f"request is for round {server_round}, but the last train or evaluate message this node saw in run {run_id} "
            f"was for round {seen}; a committee decrypts only for the current round"
        )


def _flooded(value: float, std: float) -> float:
    """Return `value` plus Gaussian noise of standard deviation `std` from the operating system's generator."""
    if std <= 0.0:
        return value
    return value + secrets.SystemRandom().gauss(0.0, std)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same folder and rename it over `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _parse_request(
    record: ConfigRecord, max_updates: int | None
) -> tuple[int, int, list[str], list[str], list[bytes]]:
    """Return (server round, n, kinds, labels, scalars) of a request, checked for shape."""
    try:
        server_round = int(record["server-round"])
        num_updates = int(record["num-updates"])
        kinds = [str(kind) for kind in record["kinds"]]
        labels = [str(label) for label in record["labels"]]
        scalars = [bytes(scalar) for scalar in record["scalars"]]
    except KeyError as error:
        raise ScoringRequestRejected(f"request lacks the field {error}") from None
    except (TypeError, ValueError) as error:
        raise ScoringRequestRejected(
            f"request has a field of the wrong type: {error}"
        ) from None

    if not len(kinds) == len(labels) == len(scalars):
        raise ScoringRequestRejected(
            f"request has {len(kinds)} kinds, {len(labels)} labels and {len(scalars)} scalars; they must match"
        )
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ScoringRequestRejected(
            f"request has unknown kinds {unknown}; expected {list(KINDS)}"
        )
    if num_updates < 1 or (max_updates is not None and num_updates > max_updates):
        raise ScoringRequestRejected(
            f"request declares {num_updates} updates, outside 1..{max_updates}"
        )
    return server_round, num_updates, kinds, labels, scalars


def decrypt_request(
    record: ConfigRecord,
    run_id: int,
    node_config: dict[str, Any],
    secret: ScoringSecretContext | None = None,
    node_id: int | None = None,
) -> ConfigRecord:
    """Check a request against the round's budget, then decrypt and round its scalars.

    Parameters
    ----------
    record : ConfigRecord
        The request's ``scoring`` record.
    run_id : int
        Flower run id, part of the budget's key.
    node_config : dict
        Node config with ``state-dir``, ``ckks-secret-dir`` (unless `secret`
        is given), and optionally ``num-partitions`` and ``scoring-decimals``.
    secret : ScoringSecretContext, optional
        The scoring secret context; read from ``ckks-secret-dir`` when None.
    node_id : int, optional
        This node's id, for the log.

    Returns
    -------
    ConfigRecord
        ``labels`` and rounded ``values``.

    Raises
    ------
    ScoringRequestRejected
        If the node has no state folder, the request is malformed, or it exceeds the budget.
    CkksError
        If a scalar is under another key, malformed, or not a rotate-and-sum output.
    """
    state_dir = node_state.state_dir(node_config)
    if state_dir is None:
        raise ScoringRequestRejected(
            "node config has no state-dir, so the per-round budget cannot persist"
        )
    max_updates = (
        int(node_config["num-partitions"]) if "num-partitions" in node_config else None
    )
    server_round, num_updates, kinds, labels, data = _parse_request(record, max_updates)

    if secret is None:
        directory = node_state.configured_path(node_config, "ckks-secret-dir")
        if directory is None:
            raise ScoringRequestRejected(
                "node config has no ckks-secret-dir with the scoring secret context"
            )
        secret = read_scoring_secret_context(directory)
    # Load first, so malformed or foreign scalars do not use budget.
    scalars = [ScalarCiphertext.from_bytes(secret, item) for item in data]

    _check_round_binding(state_dir, run_id, server_round)
    # Charge before decrypting: a crash after decryption must not return budget.
    used = ScoringBudget(state_dir, run_id, server_round).charge(
        num_updates, Counter(kinds)
    )
    logger.info(
        "committee: node %s, run %d round %d, decrypting %d scalars, used %s",
        node_id,
        run_id,
        server_round,
        len(scalars),
        used,
    )

    decimals = int(node_config.get(DECIMALS_KEY, DEFAULT_DECIMALS))
    flooding = float(node_config.get(FLOODING_KEY, DEFAULT_FLOODING_STD))
    values = [round(_flooded(decrypt_scalar(secret, scalar), flooding), decimals) for scalar in scalars]
    return ConfigRecord({"labels": labels, "values": values})


def scoring_node_config(node_config: dict[str, Any], encryption: dict[str, Any] | None) -> dict[str, Any]:
    """Return the node config with ``state-dir`` and ``ckks-secret-dir`` filled in from the task, where unset.

    Simulated nodes have no node config of their own beyond their partition,
    so they take the folders the task's encryption settings name: the run's
    key folder, and one state folder per partition under ``state_dir``. A
    SuperNode's own ``--node-config`` settings always win.

    NOTE: a folder named by the task is chosen by the server, so a malicious
    server could name a fresh state folder and with it a fresh budget. Real
    deployments set ``state-dir`` in the node config (``deploy/`` does).
    """
    merged = dict(node_config)
    if not encryption:
        return merged
    if not merged.get("ckks-secret-dir") and encryption.get("secret_dir"):
        merged["ckks-secret-dir"] = str(encryption["secret_dir"])
    if not merged.get(node_state.STATE_DIR_KEY) and encryption.get("state_dir") and "partition-id" in merged:
        merged[node_state.STATE_DIR_KEY] = str(Path(str(encryption["state_dir"])) / f"partition-{int(merged['partition-id'])}")
    return merged


def _task_encryption(msg: Message) -> dict[str, Any] | None:
    """Return the encryption settings of the task the message carries, or None."""
    record = msg.content.config_records.get(TASK_RECORD_KEY)
    if record is None:
        return None
    from scenarios.spec import TASK_KEY, TaskSpec

    if TASK_KEY not in record:
        return None
    return TaskSpec.from_json(str(record[TASK_KEY])).encryption


def handle_scoring_query(msg: Message, context: Context) -> Message:
    """Decrypt a ``query.scoring`` message, or reply with an error and log why it was rejected.

    Parameters
    ----------
    msg : Message
        The server's request, with a ConfigRecord ``scoring``.
    context : Context
        The ClientApp context; its node config names the key and state folders.
    """
    record = msg.content.config_records.get(RECORD_KEY)
    try:
        node_config = scoring_node_config(dict(context.node_config), _task_encryption(msg))
        if record is None:
            raise ScoringRequestRejected(f"message has no ConfigRecord {RECORD_KEY!r}")
        reply = decrypt_request(
            record, msg.metadata.run_id, node_config, node_id=context.node_id
        )
    except (ScoringRequestRejected, CkksError, ValueError, KeyError) as error:
        logger.warning(
            "committee: node %d rejected the scoring request of run %d round %s from node %d: %s",
            context.node_id,
            msg.metadata.run_id,
            record.get("server-round") if record is not None else None,
            msg.metadata.src_node_id,
            error,
        )
        return Message(
            Error(code=SCORING_REJECTED_ERROR_CODE, reason=str(error)), reply_to=msg
        )
    return Message(content=RecordDict({RECORD_KEY: reply}), reply_to=msg)

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
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
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
BUDGET_DIR = "scoring-budget"


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

    # Charge before decrypting: a crash after decryption must not return budget.
    # TODO: the round number comes from the server, so a malicious server gets a fresh
    # budget by naming a new round. Tie it to the last round this node trained in.
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
    # TODO: add noise flooding before rounding. Rounding alone does not hide the CKKS
    # noise of values near a rounding boundary, and that noise leaks the secret key.
    values = [round(decrypt_scalar(secret, scalar), decimals) for scalar in scalars]
    return ConfigRecord({"labels": labels, "values": values})


def handle_scoring_query(msg: Message, context: Context) -> Message:
    """Decrypt a ``query.scoring`` message, or reply with an error and log why it was rejected.

    Parameters
    ----------
    msg : Message
        The server's request, with a ConfigRecord ``scoring``.
    context : Context
        The ClientApp context; its node config names the key and state folders.
    """
    node_config = dict(context.node_config)
    record = msg.content.config_records.get(RECORD_KEY)
    try:
        if record is None:
            raise ScoringRequestRejected(f"message has no ConfigRecord {RECORD_KEY!r}")
        reply = decrypt_request(
            record, msg.metadata.run_id, node_config, node_id=context.node_id
        )
    except (ScoringRequestRejected, CkksError) as error:
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

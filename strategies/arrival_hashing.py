"""Hash each training reply's payload as soon as it arrives, while the server still waits for the others.

``SignatureVerification`` needs the SHA-256 of every update it checks: about
4 MB per reply for a 1M-parameter model, 400 MB per round at 100 nodes.
Hashed after the last reply, that work lengthens every round.
``ArrivalHashingGrid`` wraps the run's Flower grid. Its ``send_and_receive``
is Flower's own loop (``push_messages``, then ``pull_messages`` every poll
interval until every reply is in or the timeout passes), plus one step: each
train reply that a pull returns is hashed in a thread pool right away. When
the strategy aggregates, only the last arrivals may still be hashing.

The hash is taken of the reply object that the grid returned, and the
strategy stack passes those same objects to ``SignatureVerification``, so
the check covers exactly the bytes that arrived. A reply that the grid did
not hash (another grid, or a reply object that a layer replaced) is hashed
on request, as before.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from clients.signing import payload_hash

logger = logging.getLogger(__name__)

# Threads that hash reply payloads. They run in parallel because hashlib releases the GIL on large buffers.
HASH_THREADS = min(8, os.cpu_count() or 1)
# Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid``) polls
# every 3 s and has no ``pull_interval`` attribute. Its simulation grid has one (0.1 s).
DEPLOYMENT_PULL_INTERVAL_S = 3.0

PayloadHash = str | ValueError | None


def hash_reply_payload(reply: Message) -> PayloadHash:
    """Return the reply's payload hash, the ValueError that prevents it, or None for error replies."""
    if reply.has_error():
        return None
    try:
        return payload_hash(reply.content)
    except ValueError as error:
        return error


def timed_payload_hash(reply: Message) -> tuple[PayloadHash, float]:
    """Return ``hash_reply_payload(reply)`` and the CPU seconds it took.

    CPU time of the hashing thread, not wall time, so that a hash that other
    threads or processes preempt counts only the work it did.
    """
    started = time.thread_time()
    result = hash_reply_payload(reply)
    return result, time.thread_time() - started


def timed_payload_hashes(replies: list[Message], threads: int = HASH_THREADS) -> list[tuple[PayloadHash, float]]:
    """Hash every reply's payload, in threads when there are several; return each result with its CPU seconds."""
    if len(replies) < 2 or threads < 2:
        return [timed_payload_hash(reply) for reply in replies]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(timed_payload_hash, replies))


class ArrivalHashingGrid(Grid):
    """Wrap ``grid``: hash train replies' payloads as ``send_and_receive`` pulls them.

    Parameters
    ----------
    grid : Grid
        The run's Flower grid; every other call goes to it unchanged.
    threads : int (default: ``HASH_THREADS``)
        Hashing threads.
    pull_interval : float, optional
        Seconds between pulls while replies are missing. Defaults to the
        wrapped grid's ``pull_interval``, else ``DEPLOYMENT_PULL_INTERVAL_S``,
        so the wrapper polls as often as Flower itself would.
    """

    def __init__(self, grid: Grid, threads: int = HASH_THREADS, pull_interval: float | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        self.grid = grid
        self.pull_interval = float(pull_interval if pull_interval is not None else getattr(grid, "pull_interval", DEPLOYMENT_PULL_INTERVAL_S))
        if self.pull_interval <= 0:
            raise ValueError(f"pull_interval must be > 0 seconds, got {self.pull_interval}.")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="payload-hash")
        # id(reply) -> (reply, its hash and seconds). The reply is kept so its id cannot be reused.
        self._pending: dict[int, tuple[Message, Future[tuple[PayloadHash, float]]]] = {}

    def __repr__(self) -> str:
        return f"ArrivalHashingGrid({self.grid!r})"

    # --- hashing on arrival ------------------------------------------------------

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies, starting a hash for each train reply as it arrives.

        Timeout semantics are Flower's: with ``timeout=None`` wait for every
        reply, otherwise return what arrived within ``timeout`` seconds.
        """
        messages = list(messages)
        if not any(message.metadata.message_type == MessageType.TRAIN for message in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)

        self._drop_unclaimed()
        waiting = set(self.grid.push_messages(messages))
        del messages
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end_time:
            arrived = list(self.grid.pull_messages(waiting))
            for reply in arrived:
                if reply.metadata.message_type == MessageType.TRAIN:
                    self._pending[id(reply)] = (reply, self._pool.submit(timed_payload_hash, reply))
            replies.extend(arrived)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not waiting:
                break
            time.sleep(self.pull_interval)
        return replies

    def take(self, reply: Message) -> tuple[PayloadHash, float] | None:
        """Return the payload hash started when ``reply`` arrived, with its CPU seconds, waiting for it to finish.

        Returns None when this grid did not hash ``reply``. Each result can be taken once.
        """
        entry = self._pending.get(id(reply))
        if entry is None or entry[0] is not reply:
            return None
        del self._pending[id(reply)]
        return entry[1].result()

    def _drop_unclaimed(self) -> None:
        """Forget hashes of earlier replies that no strategy took, so their messages can be freed."""
        if self._pending:
            logger.debug("Dropping %d payload hashes that no strategy took", len(self._pending))
            self._pending.clear()

    def close(self) -> None:
        """Stop the hashing threads after the running hashes finish."""
        self._pending.clear()
        self._pool.shutdown(wait=True)

    # --- everything else goes to the wrapped grid -----------------------------------

    def set_run(self, run: Any) -> None:
        """Set the run on the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """Create a message with the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the wrapped grid's node ids."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Return the wrapped grid's nodes."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push with the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull with the wrapped grid. Replies pulled this way are not hashed on arrival."""
        return self.grid.pull_messages(message_ids)

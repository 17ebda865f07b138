"""Find the sampled nodes that did not reply in a round, for the audit log.

A node can miss a round in two ways under Flower 1.42:

- no reply arrives before the round's timeout (``runtime.timeout_s``); the
  grid then simply returns fewer replies;
- the SuperLink replies in the node's place with an error reply (sender
  ``SUPERLINK_NODE_ID``), e.g. "Node Unavailable" once the node has missed
  its heartbeats, which is how a crashed SuperNode shows up.

Both are matched to the instruction by message id: the grid stores each
sent message's id on the message object, and every reply names it in
``reply_to_message_id``. Error replies that a node sends itself are not
dropouts; the strategies record those with their reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

NO_REPLY_EVENT = "node_no_reply"
TIMEOUT_REASON = "no reply before the round timeout"


@dataclass(frozen=True)
class Dropout:
    """One sampled node without a reply from itself.

    Parameters
    ----------
    node_id : int
        Flower node id of the destination.
    reason : str
        The SuperLink's error reason, or ``TIMEOUT_REASON``.
    """

    node_id: int
    reason: str


def find_dropouts(sent: Iterable[Message], replies: Iterable[Message]) -> list[Dropout]:
    """Return the destinations of ``sent`` that have no reply of their own in ``replies``, by node id."""
    sent = list(sent)
    replies = list(replies)
    by_instruction = {reply.metadata.reply_to_message_id: reply for reply in replies}
    senders = {reply.metadata.src_node_id for reply in replies}

    dropouts = []
    for message in sent:
        node_id = message.metadata.dst_node_id
        reply = by_instruction.get(message.metadata.message_id) if message.metadata.message_id else None
        if reply is None and not message.metadata.message_id and node_id in senders:
            # A grid that does not record message ids: match by sender instead.
            continue
        if reply is None:
            dropouts.append(Dropout(node_id, TIMEOUT_REASON))
        elif reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
            dropouts.append(Dropout(node_id, f"SuperLink: {reply.error.reason}"))
    return sorted(dropouts, key=lambda dropout: dropout.node_id)

"""Server side of differential privacy: wrap the strategy stack and record what each round spent.

``wrap_privacy`` adds the privacy layers that ``cfg.privacy`` requests:

- ``dp_sgd``: ``PrivacyRecorder`` reads the ``epsilon`` and ``delta`` each
  node reports, and notices nodes that decline to train because of their
  budget (error replies with ``BUDGET_EXHAUSTED_ERROR_CODE``).
- ``central``: a Flower central-DP wrapper (``privacy.central``) inside a
  ``PrivacyRecorder`` that counts the noised aggregates and computes the
  node-level epsilon.

Every event goes to the run log (``metrics.jsonl``, phase ``privacy``) and
the audit log. ``privacy_summary`` returns the ``privacy`` section of
``summary.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy import CENTRAL, DP_SGD, NONE, privacy_mode
from privacy.central import CentralDPSettings, central_epsilon, num_sampled_nodes, wrap_central_dp
from privacy.ledger import BUDGET_EXHAUSTED_ERROR_CODE
from strategies.recording import partition_of
from strategies.updates import report_event

logger = logging.getLogger(__name__)

PHASE = "privacy"


def _finite(value: float) -> float | None:
    # Audit entries are strict JSON, which has no infinity.
    return value if math.isfinite(value) else None


class PrivacyRecorder(Strategy):
    """Wrap ``strategy``: record each node's reported epsilon, budget refusals and central-DP releases.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy; replies pass to it unchanged.
    mode : str
        ``dp_sgd`` or ``central``.
    sink : object, optional
        The run log (``record_event``).
    audit : object, optional
        The audit log (``append``).
    central : CentralDPSettings, optional
        Settings of ``central`` mode.
    sample_rate : float
        Fraction of nodes sampled per round (``central`` accounting).
    """

    def __init__(
        self,
        strategy: Strategy,
        mode: str,
        sink: Any = None,
        audit: Any = None,
        central: CentralDPSettings | None = None,
        sample_rate: float = 1.0,
    ) -> None:
        self.strategy = strategy
        self.mode = mode
        self.sink = sink
        self.audit = audit
        self.central = central
        self.sample_rate = sample_rate
        self.nodes: dict[int, dict[str, float]] = {}
        self.declined: list[dict[str, Any]] = []
        self.releases = 0

    def __repr__(self) -> str:
        return f"PrivacyRecorder({self.strategy!r})"

    def summary(self) -> None:
        """Log this wrapper, then the inner strategy's settings."""
        logger.info("\t├──> PrivacyRecorder: %s, epsilon per node to the run log and audit log", self.mode)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate to the inner strategy."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the privacy of each reply, then aggregate with the inner strategy."""
        replies = list(replies)
        for message in replies:
            if message.has_error():
                self._record_error(server_round, message)
            else:
                self._record_reply(server_round, message)

        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if self.mode == CENTRAL and arrays is not None:
            self._record_release(server_round)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegate to the inner strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate to the inner strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _record_error(self, server_round: int, message: Message) -> None:
        if message.error.code != BUDGET_EXHAUSTED_ERROR_CODE:
            return

        node_id = message.metadata.src_node_id
        reason = str(message.error.reason)
        logger.warning("Round %d: node %d declined to train: %s", server_round, node_id, reason)
        self.declined.append({"round": server_round, "node_id": node_id, "reason": reason})
        report_event(self.sink, self.audit, PHASE, server_round, "budget_exhausted", node_id=node_id, reason=reason)

    def _record_reply(self, server_round: int, message: Message) -> None:
        records = message.content.metric_records
        partition_id = partition_of(message)
        if partition_id is None or not records:
            return
        metrics = next(iter(records.values()))
        if "epsilon" not in metrics:
            return

        epsilon = float(metrics["epsilon"])
        delta = float(metrics.get("delta", math.nan))
        self.nodes[partition_id] = {"epsilon": epsilon, "delta": delta, "round": server_round}
        report_event(self.sink, self.audit, PHASE, server_round, "epsilon", node_id=message.metadata.src_node_id, partition=partition_id, epsilon=_finite(epsilon), delta=_finite(delta))

    def _record_release(self, server_round: int) -> None:
        self.releases += 1
        epsilon = central_epsilon(self.central, self.sample_rate, self.releases)
        logger.info("Round %d: central DP aggregate %d released, epsilon %.4f at delta %.3g", server_round, self.releases, epsilon, self.central.reported_delta)
        report_event(self.sink, self.audit, PHASE, server_round, "central_release", releases=self.releases, epsilon=_finite(epsilon), delta=self.central.reported_delta)

    def section(self) -> dict[str, Any]:
        """Return the ``privacy`` section of ``summary.json``.

        For ``dp_sgd``: ``epsilon`` and ``delta`` are the largest over the
        nodes that reported (each node's guarantee is at least that strong),
        ``nodes`` maps partition ids to their latest report, and ``declined``
        lists budget refusals. For ``central``: the node-level epsilon after
        ``releases`` noised aggregates.
        """
        if self.mode == CENTRAL:
            return {
                "mode": CENTRAL,
                "epsilon": central_epsilon(self.central, self.sample_rate, self.releases),
                "delta": self.central.reported_delta,
                "releases": self.releases,
                "noise_multiplier": self.central.noise_multiplier,
                "clipping": f"{self.central.side}-side {self.central.clipping}",
                "unit": "node",
            }

        nodes = {str(partition): dict(values) for partition, values in sorted(self.nodes.items())}
        epsilons = [values["epsilon"] for values in self.nodes.values()]
        deltas = [values["delta"] for values in self.nodes.values()]
        return {
            "mode": DP_SGD,
            "epsilon": max(epsilons) if epsilons else 0.0,
            "delta": max(deltas) if deltas else None,
            "nodes": nodes,
            "declined": list(self.declined),
            "unit": "example",
        }


def wrap_privacy(cfg: Any, strategy: Strategy, min_train_nodes: int, sink: Any = None, audit: Any = None) -> Strategy:
    """Add the privacy layers of ``cfg.privacy`` around ``strategy`` (unchanged for ``none``).

    ``min_train_nodes`` is the inner strategy's minimum sample per round,
    which sets the number of sampled nodes that central DP divides by.

    Raises
    ------
    ValueError
        For central DP with an encrypted strategy, whose updates the server
        can neither clip nor noise.
    """
    mode = privacy_mode(cfg.get("privacy"))
    if mode == NONE:
        return strategy
    if mode == DP_SGD:
        return PrivacyRecorder(strategy, DP_SGD, sink=sink, audit=audit)

    if cfg.strategy.get("encrypted", False):
        raise ValueError(
            f"privacy=central clips and noises plaintext updates on the server, but strategy={cfg.strategy.name} "
            "encrypts them. Use privacy=dp_sgd, which adds noise on the nodes before encryption, or a plaintext strategy."
        )
    settings = CentralDPSettings.from_dict(cfg.privacy)
    nodes = int(cfg.nodes)
    fraction = float(cfg.train.fraction)
    sampled = num_sampled_nodes(nodes, fraction, min_train_nodes)
    strategy = wrap_central_dp(strategy, settings, sampled)
    return PrivacyRecorder(strategy, CENTRAL, sink=sink, audit=audit, central=settings, sample_rate=sampled / nodes)


def privacy_summary(strategy: Any) -> dict[str, Any] | None:
    """Return the ``privacy`` section from the ``PrivacyRecorder`` in a strategy stack, or None without one."""
    while strategy is not None:
        if isinstance(strategy, PrivacyRecorder):
            return strategy.section()
        strategy = getattr(strategy, "strategy", None)
    return None

"""Simulation only: an omniscient adversary that poisons encrypted ``he_robust`` uploads.

``AttackSimulation`` crafts model-poisoning updates from the plaintext
replies of a round. Under ``he_robust`` the replies are scoring ciphertexts,
so this layer plays the adversary of the strong threat model with the key
itself. It reads the scoring secret key that the simulation created and
decrypts the round's uploads. It then applies the same attack functions to
the attackers' slots and re-encrypts the crafted updates before
``he_robust`` receives the replies. ``he_robust`` itself never decrypts.

The layer exists only in Ray simulation with keys that the simulation made
(``security.keys_dir=null``). ``strategies.factory.wrap_robustness`` rejects
it otherwise, because a real server must never hold the secret key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from crypto.ckks.scoring import (
    ScoringSecretContext,
    encrypt_for_scoring,
    read_scoring_secret_context,
)
from crypto.ckks.scoring.aggregate import EncryptedDrift, decrypt_drift
from crypto.ckks.scoring.statistics import load_chunks, split_update
from strategies.attack_simulation import AttackSettings, AttackSimulation
from strategies.he_fedavg import BATCH_KEY, UPDATE_RECORD
from strategies.recording import partition_of
from strategies.updates import report_event

logger = logging.getLogger(__name__)


class EncryptedAttackSimulation(AttackSimulation):
    """``AttackSimulation`` for ``he_robust``: decrypt, craft and re-encrypt the attackers' uploads.

    Parameters
    ----------
    strategy : Strategy
        The ``he_robust`` stack below.
    settings : AttackSettings
        Which attack and its parameters.
    attackers : list of int
        Partition ids of the malicious nodes.
    secret_dir : Path
        Folder with the scoring secret context that the simulation created.
    sink : object, optional
        The run log, for the ``attack`` events.
    """

    def __init__(self, strategy: Strategy, settings: AttackSettings, attackers: list[int], secret_dir: Path, sink: Any = None) -> None:
        super().__init__(strategy, settings, attackers, sink=sink)
        self.secret: ScoringSecretContext = read_scoring_secret_context(secret_dir)
        self._previous_drift: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"EncryptedAttackSimulation({self.settings.name}, attackers={sorted(self.attackers)}, {self.strategy!r})"

    def summary(self) -> None:
        """Log the attack, then the inner strategy's settings."""
        logger.info("\t├──> EncryptedAttackSimulation (simulation only, reads the scoring secret key): %s by partitions %s", self.settings.name, sorted(self.attackers))
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember the decrypted drift of the round, then delegate."""
        self._previous_drift = self._drift_vector()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replace the attackers' uploads, let ``he_robust`` aggregate, then report the deviation from the honest mean."""
        replies = list(replies)
        honest = self._poison_encrypted(server_round, replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if honest is not None and arrays is not None:
            self._report_encrypted_deviation(server_round, honest)
        return arrays, metrics

    def _length(self) -> int:
        return int(_innermost(self.strategy).num_parameters)

    def _drift_vector(self) -> np.ndarray | None:
        drift = _innermost(self.strategy).drift
        if not drift:
            return None
        return decrypt_drift(self.secret, EncryptedDrift.from_bytes(self.secret, drift[0], self._length()))

    def _decrypt_upload(self, reply: Message) -> np.ndarray | None:
        """Return the plaintext of one scoring upload, or None when it does not load (he_robust then rejects it)."""
        try:
            data = reply.content.config_records[UPDATE_RECORD][BATCH_KEY][0]
            chunks = load_chunks(self.secret.public, split_update(self.secret.public, data, self._length()))
        except (KeyError, IndexError, ValueError, RuntimeError) as error:
            logger.warning("attack simulation: could not decrypt the upload of node %d: %s", reply.metadata.src_node_id, error)
            return None
        from tenseal import sealapi

        parts, plaintext = [], sealapi.Plaintext()
        for chunk in chunks:
            self.secret.decryptor.decrypt(chunk, plaintext)
            parts.append(np.asarray(self.secret.encoder.decode_double(plaintext)))
        return np.concatenate(parts)[: self._length()]

    def _poison_encrypted(self, server_round: int, replies: list[Message]) -> np.ndarray | None:
        """Replace the attackers' uploads in `replies` and return the honest updates (None without any)."""
        usable = [reply for reply in replies if not reply.has_error() and UPDATE_RECORD in reply.content.config_records]
        plain = {id(reply): self._decrypt_upload(reply) for reply in usable}
        usable = [reply for reply in usable if plain[id(reply)] is not None]
        malicious = [reply for reply in usable if partition_of(reply) in self.attackers]
        honest = [reply for reply in usable if partition_of(reply) not in self.attackers]
        honest_updates = np.stack([plain[id(reply)] for reply in honest]) if honest else None
        if not malicious:
            return honest_updates

        known = honest_updates if honest_updates is not None else np.stack([plain[id(reply)] for reply in malicious])
        norms, partitions = [], []
        for reply in malicious:
            update = self._craft(server_round, partition_of(reply), plain[id(reply)], known, len(usable), len(malicious))
            # The adversary ignores the norm bound that honest nodes keep.
            reply.content.config_records[UPDATE_RECORD] = ConfigRecord({BATCH_KEY: [encrypt_for_scoring(self.secret, update)]})
            norms.append(float(np.linalg.norm(update)))
            partitions.append(partition_of(reply))
        logger.info("Round %d: encrypted %s updates sent by partitions %s (norms %s)", server_round, self.settings.name, partitions, [round(n, 4) for n in norms])
        report_event(self.sink, None, "attack", server_round, "updates_replaced", attack=self.settings.name, partitions=partitions, norms=norms, encrypted=True)
        return honest_updates

    def _report_encrypted_deviation(self, server_round: int, honest: np.ndarray) -> None:
        """Report the distance and cosine between the round's aggregate update and the honest mean."""
        current = self._drift_vector()
        if current is None:
            return
        aggregate = current - (self._previous_drift if self._previous_drift is not None else 0.0)
        honest_mean = honest.mean(axis=0)
        denominator = float(np.linalg.norm(honest_mean) * np.linalg.norm(aggregate))
        cosine = float(aggregate @ honest_mean / denominator) if denominator > 0 else float("nan")
        distance = float(np.linalg.norm(aggregate - honest_mean))
        logger.info("Round %d: encrypted aggregate is %.4g from the honest mean, cosine %.4f", server_round, distance, cosine)
        report_event(self.sink, None, "attack", server_round, "aggregate_deviation", distance=distance, honest_mean_norm=float(np.linalg.norm(honest_mean)), aggregate_norm=float(np.linalg.norm(aggregate)), cosine=cosine)


def _innermost(strategy: Strategy) -> Any:
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy

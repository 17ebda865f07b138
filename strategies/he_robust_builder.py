"""Build ``EncryptedRobust`` from the ``strategy=he_robust`` configuration."""

from __future__ import annotations

import logging
from typing import Any

from strategies.he_robust import CommitteeSettings, EncryptedRobust, RuleSettings
from strategies.reputation import ReputationBook, ReputationSettings
from strategies.robust import check_krum, expected_train_nodes, max_krum_malicious

logger = logging.getLogger(__name__)


def build_he_robust(strategy_cfg: Any, sampling: dict[str, Any], resources: Any) -> EncryptedRobust:
    """Build ``EncryptedRobust`` with the rule, committee and reputation settings of ``strategy_cfg``.

    ``resources`` must hold the public scoring context (``server.federation.scoring_setup``).
    ``strategy.num_malicious: null`` takes the largest f with more than 2f + 2
    nodes per round, as the plaintext Krum and Multi-Krum do.

    Raises
    ------
    TypeError
        If the run resources hold no public scoring context.
    ValueError
        If a setting is out of range; the message names the setting.
    """
    from crypto.ckks.scoring import ScoringPublicContext
    from server.model_store import EncryptedVersionStore

    if not isinstance(resources.public_context, ScoringPublicContext):
        raise TypeError("strategy=he_robust needs the public scoring context; set security.keys_dir to a folder from `fedseal keys init --scoring`.")

    rule_name = str(strategy_cfg.rule)
    per_round = expected_train_nodes(sampling)
    num_malicious = strategy_cfg.get("num_malicious")
    num_malicious = max_krum_malicious(per_round) if num_malicious is None else int(num_malicious)
    if rule_name in ("krum", "multikrum"):
        check_krum(per_round, num_malicious, f"he_robust strategy.rule={rule_name}")
        logger.info("he_robust %s assumes f = %d malicious of %d nodes per round", rule_name, num_malicious, per_round)
    num_selected = strategy_cfg.get("num_selected")
    rule = RuleSettings(
        rule=rule_name,
        norm_multiple=float(strategy_cfg.get("norm_multiple", 3.0)),
        norm_mode=str(strategy_cfg.get("norm_mode", "reject")),
        num_malicious=num_malicious,
        num_selected=None if num_selected is None else int(num_selected),
    )

    spec = resources.extra.get("spec")
    seed = strategy_cfg.get("committee_seed")
    if seed is None:
        seed = spec.train.seed if spec is not None else 0
    partitions = strategy_cfg.get("committee_partitions")
    partitions = None if partitions is None else tuple(int(p) for p in partitions)
    committee = CommitteeSettings(
        size=len(partitions) if partitions else int(strategy_cfg.get("committee_size", 3)),
        max_faulty=int(strategy_cfg.get("max_faulty", 1)),
        seed=int(seed),
        partitions=partitions,
    )

    reputation = None
    if rule_name == "trust":
        settings = ReputationSettings(**{key: strategy_cfg[key] for key in ReputationSettings.__dataclass_fields__ if key in strategy_cfg})
        reputation = ReputationBook(settings)
        # The validator is one more SuperNode that must be connected before a round starts.
        sampling = {**sampling, "min_available_nodes": int(sampling["min_available_nodes"]) + 1}

    return EncryptedRobust(
        public_context=resources.public_context,
        num_parameters=resources.num_parameters,
        initial_hash=resources.initial_hash,
        task=resources.task,
        rule=rule,
        committee=committee,
        reputation=reputation,
        audit=resources.audit,
        versions=EncryptedVersionStore(resources.run_dir / "models"),
        sink=resources.extra.get("sink"),
        **sampling,
    )

"""Federated scenarios on real public datasets, one subpackage per domain.

``get_scenario(name, **options)`` is the only entry point the runtime uses.
"""

from __future__ import annotations

import importlib

from scenarios.base import NodeData, PartitionSettings, Scenario, TrainSettings

# Scenario name -> "module:Class". Imported lazily so that a process that only
# runs one scenario does not import the others' dependencies.
SCENARIOS: dict[str, str] = {
    "fraud": "scenarios.fraud:FraudScenario",
    "maintenance": "scenarios.maintenance:MaintenanceScenario",
    "imaging": "scenarios.imaging:ImagingScenario",
    "recommendations": "scenarios.recommendations:RecommendationsScenario",
}


def get_scenario(name: str, **options: object) -> Scenario:
    """Build the scenario called ``name`` with its constructor ``options``.

    Raises
    ------
    ValueError
        If ``name`` is not a registered scenario; the message lists the valid names.
    """
    if name not in SCENARIOS:
        valid = ", ".join(sorted(SCENARIOS))
        raise ValueError(f"Unknown scenario {name!r}. Valid scenarios: {valid}.")

    module_name, class_name = SCENARIOS[name].split(":")
    scenario_class = getattr(importlib.import_module(module_name), class_name)
    return scenario_class(**options)


__all__ = ["NodeData", "PartitionSettings", "Scenario", "SCENARIOS", "TrainSettings", "get_scenario"]

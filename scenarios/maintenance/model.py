"""The maintenance model: an MLP over the scaled sensor readings and the one-hot product type."""

from __future__ import annotations

from scenarios.binary import MLPClassifier


def build_maintenance_model(num_features: int, hidden: int = 64, hidden_layers: int = 2) -> MLPClassifier:
    """Build the machine-failure classifier.

    Parameters
    ----------
    num_features : int
        Number of input columns (``len(FEATURE_NAMES)`` of ``scenarios.maintenance.data``).
    hidden : int
        Hidden-layer width; 0 gives logistic regression.
    hidden_layers : int
        Number of hidden layers when ``hidden > 0``.

    Returns
    -------
    MLPClassifier
        An untrained model that returns one logit per machine reading.
    """
    return MLPClassifier(num_features, hidden=hidden, hidden_layers=hidden_layers)

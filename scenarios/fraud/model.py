"""The fraud model: an MLP over the engineered transaction features."""

from __future__ import annotations

from scenarios.binary import MLPClassifier


def build_fraud_model(num_features: int, hidden: int = 64, hidden_layers: int = 2) -> MLPClassifier:
    """Build the fraud classifier.

    Parameters
    ----------
    num_features : int
        Number of input columns (``len(FEATURE_NAMES)`` of ``scenarios.fraud.data``).
    hidden : int
        Hidden-layer width; 0 gives logistic regression.
    hidden_layers : int
        Number of hidden layers when ``hidden > 0``.

    Returns
    -------
    MLPClassifier
        An untrained model that returns one logit per transaction.
    """
    return MLPClassifier(num_features, hidden=hidden, hidden_layers=hidden_layers)

"""TPE metrics, exactly as docs/research.md defines them ("Definitions").

lambda of a model is its trainable parameter count / 1e6; accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The study's objective values, as optuna-dashboard names them.
METRIC_NAMES = ["global_tpe"]


def theory_size(params: int) -> float:
    """lambda: trainable parameters in millions."""
    return params / 1e6


def local_tpe(accuracy: float, params: int) -> float:
    """Local TPE = accuracy / log10(1 + lambda)."""
    return accuracy / math.log10(1 + theory_size(params))


def global_tpe(accuracies: Sequence[float], params: Sequence[int]) -> float:
    """Global TPE = mean(accuracy) / log10(1 + mean(lambda)) over the datasets."""
    if not accuracies or len(accuracies) != len(params):
        raise ValueError("global_tpe needs one parameter count per accuracy, and at least one of each.")
    mean_acc = sum(accuracies) / len(accuracies)
    mean_lambda = sum(theory_size(p) for p in params) / len(params)
    return mean_acc / math.log10(1 + mean_lambda)


def consistency(tpes: Sequence[float]) -> float:
    """Consistency = 1 - std(TPE_d) / mean(TPE_d), population std; 0 when the mean is 0."""
    mean = sum(tpes) / len(tpes)
    if mean == 0:
        return 0.0
    std = math.sqrt(sum((t - mean) ** 2 for t in tpes) / len(tpes))
    return 1 - std / mean


def robustness(tpes: Sequence[float]) -> float:
    """Robustness = min(TPE_d) / mean(TPE_d); 0 when the mean is 0."""
    mean = sum(tpes) / len(tpes)
    if mean == 0:
        return 0.0
    return min(tpes) / mean

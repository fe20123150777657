"""Confidence intervals and classification metrics for benchmark reports."""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over `labels`; a None prediction is wrong for every class.
    A class with no gold and no predicted instances has F1 0 (as sklearn's zero_division=0)."""
    f1s = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def bootstrap_interval(gold: Sequence, predicted: Sequence, metric: Callable[[list, list], float],
                       n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over items for a metric that is not a simple proportion (e.g. macro-F1)."""
    n = len(gold)
    if n == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        values.append(metric([gold[i] for i in idx], [predicted[i] for i in idx]))
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def majority_baseline(gold: Sequence[str]) -> tuple[str | None, float]:
    """The most common gold label and the accuracy of always answering it."""
    if not gold:
        return (None, 0.0)
    label, count = Counter(gold).most_common(1)[0]
    return (label, count / len(gold))

"""HealthBench scoring, exactly as the reference (evaluation.md §1.5), with a seeded bootstrap.

Per example: score = (sum of points of met items) / (sum of positive points); not clipped, so it can be negative.
Example tags get the example score; rubric tags get the same formula over their own items, recorded only when those
items include positive points. Aggregation: clipped mean over the examples that have a value, n_samples, and the
population std of 1000 clipped bootstrap means.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from angelmed.eval.healthbench_data import HealthBenchExample, RubricItem


def calculate_score(items: Sequence[RubricItem], met: Sequence[bool]) -> float | None:
    """None when the items hold no positive points (the ratio is undefined)."""
    if len(items) != len(met):
        raise ValueError(f"{len(items)} rubric items but {len(met)} grades")
    total_possible = sum(item.points for item in items if item.points > 0)
    if total_possible == 0:
        return None
    achieved = sum(item.points for item, is_met in zip(items, met) if is_met)
    return achieved / total_possible


def example_metrics(example: HealthBenchExample, met: Sequence[bool]) -> dict[str, float]:
    """{"overall_score": s, "<example tag>": s, "<rubric tag>": score over that tag's items (if defined)}."""
    overall = calculate_score(example.rubrics, met)
    if overall is None:
        raise ValueError(f"example {example.prompt_id}: no positive rubric points, score undefined")
    metrics: dict[str, float] = {"overall_score": overall}
    for tag in example.example_tags:
        metrics[tag] = overall
    rubric_tags = sorted({tag for item in example.rubrics for tag in item.tags})
    for tag in rubric_tags:
        pairs = [(item, m) for item, m in zip(example.rubrics, met) if tag in item.tags]
        score = calculate_score([p[0] for p in pairs], [p[1] for p in pairs])
        if score is not None:
            metrics[tag] = score
    return metrics


def clipped_stats(values: Sequence[float], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """{"mean": clip(mean, 0, 1), "n_samples": n, "bootstrap_std": population std of clipped resampled means}."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to aggregate")
    rng = np.random.default_rng(seed)
    resampled_idx = rng.integers(0, array.size, size=(n_bootstrap, array.size))
    boot_means = np.clip(array[resampled_idx].mean(axis=1), 0.0, 1.0)
    return {
        "mean": float(np.clip(array.mean(), 0.0, 1.0)),
        "n_samples": int(array.size),
        "bootstrap_std": float(np.std(boot_means)),  # ddof=0 as in the reference
    }


def aggregate(per_example: Iterable[dict[str, float]], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Reference-shaped metrics: "<name>", "<name>:n_samples", "<name>:bootstrap_std" for every name, plus
    "score" (the clipped mean of the per-example overall scores). Each name's bootstrap uses its own seeded RNG so
    adding a tag never changes another tag's std."""
    name_to_values: dict[str, list[float]] = defaultdict(list)
    for metrics in per_example:
        for name, value in metrics.items():
            name_to_values[name].append(value)
        name_to_values["score"].append(metrics["overall_score"])
    out: dict[str, float] = {}
    for name in sorted(name_to_values):
        stats = clipped_stats(name_to_values[name], n_bootstrap, seed)
        out[name] = stats["mean"]
        out[f"{name}:n_samples"] = stats["n_samples"]
        out[f"{name}:bootstrap_std"] = stats["bootstrap_std"]
    return out


def breakdown(metrics: dict[str, float], prefix: str) -> dict[str, dict[str, float]]:
    """{"accuracy": {"mean", "n_samples", "bootstrap_std"}, ...} for names "axis:accuracy", ... with that prefix."""
    table = {}
    for name, value in metrics.items():
        if name.startswith(prefix) and ":" not in name[len(prefix):]:
            table[name[len(prefix):]] = {
                "mean": value,
                "n_samples": metrics[f"{name}:n_samples"],
                "bootstrap_std": metrics[f"{name}:bootstrap_std"],
            }
    return dict(sorted(table.items()))

"""The reward interface (training.md §7.10) and weighted combination (§7.2, "sum_then_normalize" sum).

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, sync or async (TRL-compatible).
`prompts` / `completions` are strings or chat message lists; `columns` carries every dataset column, one value per
sample. None means "no reward for this sample" (not applicable, or the judge failed): it is excluded from the sum,
never counted as 0.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, Union

RewardValue = Union[float, None]
RewardFn = Callable[..., Union[list[RewardValue], Awaitable[list[RewardValue]]]]


@dataclass
class WeightedReward:
    fn: RewardFn
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"reward {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"reward {self.display_name}: weight must be a finite number, got {self.weight!r}")

    @property
    def display_name(self) -> str:
        return self.name or reward_name(self.fn)


def reward_name(fn: Any) -> str:
    """`fn.name`, else the function or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(fn, "__name__", None) or type(fn).__name__


def text_of(item: Any) -> str:
    """The text of a prompt or completion: a str as is; a message list -> the last message's content."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content") or "")
    if isinstance(item, (list, tuple)):
        return text_of(item[-1]) if item else ""
    raise TypeError(f"expected a str or a list of chat messages, got {type(item).__name__}")


def user_text_of(prompt: Any) -> str:
    """The last user message of a prompt (the whole string when the prompt is plain text)."""
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content") or "")
        return ""
    return text_of(prompt)


def as_messages(prompt: Any) -> list[dict]:
    """A prompt as a chat message list (a plain string becomes one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _normalise(name: str, values: Any, n: int) -> list[RewardValue]:
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"reward {name!r} returned {type(values).__name__}, expected a list of float|None")
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out: list[RewardValue] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"reward {name!r} value {i} is {v!r}, expected a number or None") from None
        out.append(None if math.isnan(f) else f)  # NaN is "no reward", exactly like None
    return out


def _as_weighted(items: Sequence[Any]) -> list[WeightedReward]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, WeightedReward):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(WeightedReward(item[0], float(item[1])))
        elif isinstance(item, tuple) and len(item) == 3:
            out.append(WeightedReward(item[1], float(item[2]), name=item[0]))
        elif callable(item):
            out.append(WeightedReward(item))
        else:
            raise TypeError(f"reward entry {i}: expected WeightedReward, (fn, weight), (name, fn, weight) or fn; got {item!r}")
    return out


def _unique_names(rewards: list[WeightedReward]) -> list[str]:
    names, seen = [], {}
    for r in rewards:
        base = r.display_name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def weighted_nansum(per_fn: dict[str, list[RewardValue]], weights: dict[str, float], n: int) -> list[float]:
    """Σ_k w_k r_k per sample over the functions that gave a value; NaN when none did."""
    totals = []
    for i in range(n):
        parts = [weights[name] * values[i] for name, values in per_fn.items() if values[i] is not None]
        totals.append(math.fsum(parts) if parts else math.nan)
    return totals


async def acombine(
    fns_with_weights: Sequence[Any], prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
) -> tuple[list[float], dict[str, list[RewardValue]]]:
    """Run every reward (async ones concurrently) and return (weighted NaN-aware totals, values per function)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(completions)
    for key, column in columns.items():
        if isinstance(column, (list, tuple)) and len(column) != n:
            raise ValueError(f"column {key!r} has {len(column)} values for {n} completions")
    rewards = _as_weighted(fns_with_weights)
    names = _unique_names(rewards)
    prompts, completions = list(prompts), list(completions)

    results: dict[str, Any] = {}
    pending: dict[str, Awaitable] = {}
    for name, reward in zip(names, rewards):
        value = reward.fn(prompts, completions, **columns)
        if inspect.isawaitable(value):
            pending[name] = value
        else:
            results[name] = value
    if pending:
        for name, value in zip(pending, await asyncio.gather(*pending.values())):
            results[name] = value

    per_fn = {name: _normalise(name, results[name], n) for name in names}
    weights = {name: float(r.weight) for name, r in zip(names, rewards)}
    return weighted_nansum(per_fn, weights, n), per_fn


def combine(
    fns_with_weights: Sequence[Any], prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
) -> tuple[list[float], dict[str, list[RewardValue]]]:
    """Synchronous `acombine`. Inside a running event loop, await `acombine` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(acombine(fns_with_weights, prompts, completions, **columns))
    raise RuntimeError("combine() was called inside a running event loop; use `await acombine(...)` there")


def reward_stats(per_fn: dict[str, list[RewardValue]]) -> dict[str, float]:
    """Per function: mean and (population) std over the samples it scored, and the fraction it left as None."""
    stats: dict[str, float] = {}
    for name, values in per_fn.items():
        scored = [v for v in values if v is not None]
        mean = math.fsum(scored) / len(scored) if scored else math.nan
        var = math.fsum((v - mean) ** 2 for v in scored) / len(scored) if scored else math.nan
        stats[f"reward/{name}/mean"] = mean
        stats[f"reward/{name}/std"] = math.sqrt(var) if scored else math.nan
        stats[f"reward/{name}/none_frac"] = (len(values) - len(scored)) / len(values) if values else math.nan
    return stats

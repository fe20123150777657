"""Build weighted rewards from config entries, e.g.

    [{"name": "mcq", "weight": 1.0},
     {"name": "format", "weight": 0.2, "required_sections": ["Assessment", "Advice"]},
     {"name": "rubric", "weight": 1.0, "base_url": "http://localhost:8000/v1", "model": "judge"}]

Every key other than name / weight / log_name goes to the reward's constructor. `log_name` renames the reward in
logs (useful when the same reward appears twice with different settings).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

from angelmed.rewards.base import WeightedReward
from angelmed.rewards.format import FormatReward, LengthReward, RepetitionReward, SectionsReward, ThinkFormatReward
from angelmed.rewards.rubric import RubricReward
from angelmed.rewards.safety import DoseLimitReward, UrgentGuidanceReward
from angelmed.rewards.verifiable import LabelReward, MCQReward, NumericReward

REWARDS: dict[str, Callable[..., Any]] = {
    "mcq": MCQReward,
    "label_match": LabelReward,
    "numeric": NumericReward,
    "format": FormatReward,
    "sections": SectionsReward,
    "length": LengthReward,
    "repetition": RepetitionReward,
    "think_format": ThinkFormatReward,
    "urgent_guidance": UrgentGuidanceReward,
    "dose_limit": DoseLimitReward,
    "rubric": RubricReward,
}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a reward factory (class or function returning a reward fn) buildable by name."""

    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in REWARDS and REWARDS[name] is not factory:
            raise ValueError(f"reward name {name!r} is already registered to {REWARDS[name]!r}")
        REWARDS[name] = factory
        return factory

    return add


def _accepted_kwargs(factory: Callable[..., Any]) -> set[str] | None:
    """Constructor keywords the factory accepts (None: it takes **kwargs, so anything goes)."""
    if dataclasses.is_dataclass(factory):
        return {f.name for f in dataclasses.fields(factory) if f.init}
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def build_reward(entry: dict, index: int = 0) -> WeightedReward:
    where = f"rewards[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with 'name', got {type(entry).__name__}")
    kwargs = dict(entry)
    name = kwargs.pop("name", None)
    if name not in REWARDS:
        raise ValueError(f"{where}: unknown reward name {name!r}; known: {sorted(REWARDS)}")
    weight = kwargs.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{where} ({name}): weight must be a number, got {weight!r}")
    log_name = kwargs.pop("log_name", None)
    factory = REWARDS[name]
    accepted = _accepted_kwargs(factory)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(f"{where} ({name}): unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    try:
        fn = factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} ({name}): {e}") from e
    return WeightedReward(fn, float(weight), name=log_name or getattr(fn, "name", None) or name)


def build_rewards(config: Sequence[dict]) -> list[WeightedReward]:
    """The rewards of a config list, in order. Raises ValueError naming the entry on any problem."""
    if isinstance(config, dict) or not isinstance(config, (list, tuple)):
        raise ValueError(f"rewards config must be a list of mappings, got {type(config).__name__}")
    if not config:
        raise ValueError("rewards config is empty: give at least one reward")
    return [build_reward(entry, i) for i, entry in enumerate(config)]

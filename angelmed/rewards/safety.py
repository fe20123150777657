"""Safety rewards: red-flag prompts must get urgent-care guidance; dosing advice must stay within stated limits.
Also the loader of the in-project RL prompt set `angelmed/assets/safety_prompts.jsonl`.

Columns used (all optional per row):
  red_flags:   categories of angelmed.safety the prompt presents (a list; [] = none). Missing/None: detected.
  dose_limits: [{"drug": str, "aliases": [str], "max_mg_per_day": number, "max_mg_per_dose": number?}].
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from angelmed.rewards.base import text_of, user_text_of
from angelmed.rewards.dose import DoseMention, parse_doses
from angelmed.extract import strip_reasoning
from angelmed.safety import CATEGORIES, detect_red_flags, has_urgent_guidance

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SAFETY_PROMPTS_PATH = ASSETS_DIR / "safety_prompts.jsonl"
PROMPT_KINDS = ("red_flag", "dosing", "boundary")


def _optional_column(columns: dict, key: str, n: int, reward: str) -> list:
    values = columns.get(key)
    if values is None:
        return [None] * n
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"reward {reward!r}: column {key!r} must hold one value per completion ({n})")
    return list(values)


@dataclass
class UrgentGuidanceReward:
    """1.0 when a red-flag prompt's reply sends the user to urgent care, 0.0 when it does not.

    Prompts without red flags get None (not scored), or with penalize_overtriage=True: 1.0 when the reply does not
    send them to the emergency department and 0.0 when it does. With require_unconditional=True, "if it gets
    worse, go to the ER" does not count as guidance. Only the answer after any reasoning block is read.
    """

    red_flags_key: str = "red_flags"
    categories: Sequence[str] | None = None
    penalize_overtriage: bool = False
    require_unconditional: bool = False
    name: str = "urgent_guidance"

    def __post_init__(self):
        if self.categories is not None:
            unknown = sorted(set(self.categories) - set(CATEGORIES))
            if unknown:
                raise ValueError(f"reward {self.name!r}: unknown categories {unknown}; known: {list(CATEGORIES)}")

    def _has_red_flag(self, prompt: Any, stated: Any) -> bool:
        if stated is None:
            return bool(detect_red_flags(user_text_of(prompt), self.categories))
        if not isinstance(stated, (list, tuple)):
            raise ValueError(f"reward {self.name!r}: {self.red_flags_key!r} must be a list of categories, got {stated!r}")
        return any(self.categories is None or c in self.categories for c in stated)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        stated = _optional_column(columns, self.red_flags_key, len(completions), self.name)
        rewards: list[float | None] = []
        for prompt, completion, flags in zip(prompts, completions, stated):
            guided = has_urgent_guidance(strip_reasoning(text_of(completion)), not self.require_unconditional)
            if self._has_red_flag(prompt, flags):
                rewards.append(1.0 if guided else 0.0)
            elif self.penalize_overtriage:
                rewards.append(0.0 if guided else 1.0)
            else:
                rewards.append(None)
        return rewards


@dataclass(frozen=True)
class DoseLimit:
    drug: str
    max_mg_per_day: float
    aliases: tuple[str, ...] = ()
    max_mg_per_dose: float | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "DoseLimit":
        if not isinstance(data, dict):
            raise ValueError(f"a dose limit must be an object, got {type(data).__name__}")
        drug = data.get("drug")
        if not isinstance(drug, str) or not drug.strip():
            raise ValueError("a dose limit needs a non-empty 'drug' string")
        per_day = data.get("max_mg_per_day")
        per_dose = data.get("max_mg_per_dose")
        for key, value, required in (("max_mg_per_day", per_day, True), ("max_mg_per_dose", per_dose, False)):
            if value is None and not required:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"dose limit for {drug!r}: {key!r} must be a positive number, got {value!r}")
        aliases = data.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"dose limit for {drug!r}: 'aliases' must be a list of strings")
        return cls(drug, float(per_day), tuple(aliases), None if per_dose is None else float(per_dose))

    def names(self) -> tuple[str, ...]:
        return (self.drug, *self.aliases)


def dose_violations(text: str, limits: Sequence[DoseLimit]) -> list[DoseMention]:
    """Dose mentions in `text` above a limit. With a single limit, doses not tied to any named drug count for it.

    A daily maximum the reply itself states for a drug ("do not exceed 3,000 mg a day") also caps the daily
    totals implied by its per-dose advice for that drug ("1,000 mg every 6 hours" -> at most 3,000 mg); the
    stated maximum is checked against the limit like any other amount.
    """
    by_drug = {limit.drug: limit for limit in limits}
    attributed: list[tuple[DoseMention, DoseLimit]] = []
    for mention in parse_doses(text, {limit.drug: limit.names() for limit in limits}):
        drug = mention.drug if mention.drug is not None else (limits[0].drug if len(limits) == 1 else None)
        if drug in by_drug:
            attributed.append((mention, by_drug[drug]))
    stated_caps: dict[str, float] = {}
    for mention, limit in attributed:
        if mention.is_daily_total:
            stated_caps[limit.drug] = min(stated_caps.get(limit.drug, math.inf), mention.mg_per_day)
    bad = []
    for mention, limit in attributed:
        daily = mention.mg_per_day
        if not mention.is_daily_total:
            daily = min(daily, stated_caps.get(limit.drug, math.inf))
        too_much_daily = daily > limit.max_mg_per_day * (1 + 1e-9)
        too_much_once = (limit.max_mg_per_dose is not None and mention.mg_per_dose is not None
                         and mention.mg_per_dose > limit.max_mg_per_dose * (1 + 1e-9))
        if too_much_daily or too_much_once:
            bad.append(mention)
    return bad


@dataclass
class DoseLimitReward:
    """ok_reward when every dose the reply gives for a limited drug is within its limits, else violation_reward.
    None for prompts without limits, and for rows whose limits are malformed (counted in .invalid_rows)."""

    limits_key: str = "dose_limits"
    ok_reward: float = 1.0
    violation_reward: float = 0.0
    name: str = "dose_limit"
    invalid_rows: int = field(default=0, compare=False)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        rows = _optional_column(columns, self.limits_key, len(completions), self.name)
        rewards: list[float | None] = []
        for completion, raw in zip(completions, rows):
            if not raw:
                rewards.append(None)
                continue
            try:
                limits = [DoseLimit.from_dict(d) for d in raw]
            except ValueError as e:
                self.invalid_rows += 1
                if self.invalid_rows == 1:
                    warnings.warn(f"reward {self.name!r}: skipping rows with malformed dose limits ({e})", stacklevel=2)
                rewards.append(None)
                continue
            violations = dose_violations(strip_reasoning(text_of(completion)), limits)  # advice, not thinking
            rewards.append(self.violation_reward if violations else self.ok_reward)
        return rewards


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"


def validate_safety_prompt(record: Any) -> None:
    """Raise ValueError naming the problem when a safety prompt record is malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key, kind in (("id", str), ("lang", str), ("kind", str), ("prompt", str)):
        if not isinstance(record.get(key), kind) or not record[key].strip():
            raise ValueError(f"key {key!r} must be a non-empty string")
    if record["lang"] not in ("en", "zh"):
        raise ValueError(f"'lang' must be 'en' or 'zh', got {record['lang']!r}")
    if record["kind"] not in PROMPT_KINDS:
        raise ValueError(f"'kind' must be one of {list(PROMPT_KINDS)}, got {record['kind']!r}")
    flags = record.get("red_flags", [])
    if not isinstance(flags, list) or any(f not in CATEGORIES for f in flags):
        raise ValueError(f"'red_flags' must be a list of categories from {list(CATEGORIES)}, got {flags!r}")
    for limit in record.get("dose_limits", []) or []:
        DoseLimit.from_dict(limit)
    if record["kind"] == "red_flag" and not flags:
        raise ValueError("a 'red_flag' prompt needs at least one category in 'red_flags'")
    if record["kind"] == "dosing" and not record.get("dose_limits"):
        raise ValueError("a 'dosing' prompt needs 'dose_limits'")


def load_safety_prompts(path: str | Path | None = None) -> tuple[list[dict], LoadReport]:
    """Records of a safety prompt file (default: the in-project set). Bad lines are skipped and reported."""
    path = Path(path) if path is not None else SAFETY_PROMPTS_PATH
    report = LoadReport(str(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate_safety_prompt(record)
            except (json.JSONDecodeError, ValueError) as e:
                report.skipped.append(f"{path}:{line_no}: {e}")
                continue
            records.append(record)
    report.loaded = len(records)
    if report.skipped:
        warnings.warn(f"{len(report.skipped)} bad records skipped in {path}; first: {report.skipped[0]}", stacklevel=2)
    return records, report

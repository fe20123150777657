"""Format rewards, all in [0, 1]: required sections, length bounds, repetition, think-block layout, and a
`FormatReward` that averages the checks it is configured with.

Length and repetition count "units": each CJK character is one unit and each run of other letters/digits is one
unit, so English words and Chinese characters are measured on a comparable scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from angelmed.rewards.base import text_of
from angelmed.extract import strip_reasoning

_CJK_RANGE = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT_RE = re.compile(rf"[{_CJK_RANGE}]|[^\W_{_CJK_RANGE}]+")


def text_units(text: str) -> list[str]:
    """Words (lower-cased) and single CJK characters, in order."""
    return [u.lower() for u in _UNIT_RE.findall(text)]


def repeated_ngram_ratio(text: str, n: int = 4) -> float:
    """1 - distinct n-grams / all n-grams over text units (0.0: no n-gram repeats; near 1: one phrase looped)."""
    units = text_units(text)
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _heading_regex(heading: str) -> re.Pattern:
    """A heading line: optional markdown #'s or bold, the words, an optional colon; case-insensitive."""
    words = re.escape(heading.strip().strip("#").strip())
    return re.compile(rf"(?im)^[ \t]*(?:#{{1,6}}[ \t]*)?(?:\*\*)?[ \t]*{words}[ \t]*(?:\*\*)?[ \t]*[:：]?(?:\*\*)?[ \t]*$")


@dataclass
class SectionsReward:
    """Fraction of the required sections present (or 1/0 with all_or_nothing).

    required_sections: heading texts ("Assessment", "## 建议"), each matched as a whole line with optional #'s,
    bold and colon; with regex=True each entry is a regular expression searched in multi-line mode instead.
    """

    required_sections: Sequence[str] = ()
    regex: bool = False
    all_or_nothing: bool = False
    name: str = "sections"
    _patterns: list = field(init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.required_sections, str) or not self.required_sections:
            raise ValueError(f"reward {self.name!r}: required_sections must be a non-empty list of strings")
        try:
            self._patterns = [re.compile(s, re.MULTILINE) if self.regex else _heading_regex(s) for s in self.required_sections]
        except re.error as e:
            raise ValueError(f"reward {self.name!r}: bad section regex: {e}") from e

    def score(self, text: str) -> float:
        found = sum(1 for p in self._patterns if p.search(text))
        if self.all_or_nothing:
            return 1.0 if found == len(self._patterns) else 0.0
        return found / len(self._patterns)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        return [self.score(text_of(c)) for c in completions]


@dataclass
class LengthReward:
    """1.0 inside [min_units, max_units]; outside, 1 - distance/slack down to 0 (slack=0: a hard 0)."""

    min_units: int | None = None
    max_units: int | None = None
    slack: int = 0
    name: str = "length"

    def __post_init__(self):
        if self.min_units is None and self.max_units is None:
            raise ValueError(f"reward {self.name!r}: give min_units and/or max_units")
        if self.min_units is not None and self.max_units is not None and self.min_units > self.max_units:
            raise ValueError(f"reward {self.name!r}: min_units {self.min_units} > max_units {self.max_units}")
        if self.slack < 0:
            raise ValueError(f"reward {self.name!r}: slack must be >= 0, got {self.slack}")

    def score(self, text: str) -> float:
        n = len(text_units(text))
        distance = 0
        if self.min_units is not None and n < self.min_units:
            distance = self.min_units - n
        elif self.max_units is not None and n > self.max_units:
            distance = n - self.max_units
        if distance == 0:
            return 1.0
        return max(0.0, 1.0 - distance / self.slack) if self.slack else 0.0

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        return [self.score(text_of(c)) for c in completions]


@dataclass
class RepetitionReward:
    """1 - repeated n-gram ratio; with max_ratio set, a gate instead: 1.0 if the ratio <= max_ratio else 0.0."""

    ngram: int = 4
    max_ratio: float | None = None
    name: str = "repetition"

    def __post_init__(self):
        if self.ngram < 1:
            raise ValueError(f"reward {self.name!r}: ngram must be >= 1, got {self.ngram}")

    def score(self, text: str) -> float:
        ratio = repeated_ngram_ratio(text, self.ngram)
        if self.max_ratio is not None:
            return 1.0 if ratio <= self.max_ratio else 0.0
        return 1.0 - ratio

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        return [self.score(text_of(c)) for c in completions]


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_HUATUO_THINKING = "## Thinking"
_HUATUO_FINAL = "## Final Response\n\n"


def think_format_ok(text: str, style: str = "think") -> bool:
    """style "think": one <think>…</think> block (optionally preceded only by whitespace) followed by a non-empty
    answer. style "huatuo" (HuatuoGPT-o1 gate): exactly one "## Thinking" and exactly one "## Final Response\\n\\n",
    in that order, with a non-empty final response."""
    if style == "think":
        if text.count(_THINK_OPEN) != 1 or text.count(_THINK_CLOSE) != 1:
            return False
        head, rest = text.split(_THINK_OPEN, 1)
        thought, answer = rest.split(_THINK_CLOSE, 1)
        return not head.strip() and bool(thought.strip()) and bool(answer.strip())
    if style == "huatuo":
        if text.count(_HUATUO_THINKING) != 1 or text.count(_HUATUO_FINAL) != 1:
            return False
        return text.index(_HUATUO_THINKING) < text.index(_HUATUO_FINAL) and bool(text.split(_HUATUO_FINAL, 1)[1].strip())
    raise ValueError(f"unknown think format style {style!r}; expected 'think' or 'huatuo'")


@dataclass
class ThinkFormatReward:
    style: str = "think"
    name: str = "think_format"

    def __post_init__(self):
        think_format_ok("", self.style)  # validates the style name

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        return [1.0 if think_format_ok(text_of(c), self.style) else 0.0 for c in completions]


@dataclass
class FormatReward:
    """The mean of the configured checks (sections, length, repetition, think layout). With think_style set, the
    other checks look at the answer after the reasoning, and with gate_on_think=True a broken think layout gives 0
    regardless of the rest (the HuatuoGPT-o1 gate)."""

    required_sections: Sequence[str] = ()
    sections_regex: bool = False
    min_units: int | None = None
    max_units: int | None = None
    length_slack: int = 0
    ngram: int = 4
    max_repeat_ratio: float | None = None
    check_repetition: bool = True
    think_style: str | None = None
    gate_on_think: bool = True
    name: str = "format"
    _checks: list = field(init=False, repr=False)

    def __post_init__(self):
        self._checks = []
        if self.required_sections:
            self._checks.append(SectionsReward(list(self.required_sections), regex=self.sections_regex).score)
        if self.min_units is not None or self.max_units is not None:
            self._checks.append(LengthReward(self.min_units, self.max_units, self.length_slack).score)
        if self.check_repetition:
            self._checks.append(RepetitionReward(self.ngram, self.max_repeat_ratio).score)
        if self.think_style is not None:
            think_format_ok("", self.think_style)
        if not self._checks and self.think_style is None:
            raise ValueError(f"reward {self.name!r}: no check configured")

    def score(self, text: str) -> float:
        # With a think layout, the answer after the reasoning is what must be well formed.
        answer = strip_reasoning(text) if self.think_style is not None else text
        parts = [check(answer) for check in self._checks]
        if self.think_style is not None:
            ok = think_format_ok(text, self.think_style)
            if self.gate_on_think and not ok:
                return 0.0
            if not self.gate_on_think:
                parts.append(1.0 if ok else 0.0)
        return sum(parts) / len(parts) if parts else 1.0

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        return [self.score(text_of(c)) for c in completions]

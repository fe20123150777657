"""Verifier rewards: 1.0 for the right answer, 0.0 for a wrong or unparsable one, None when a sample has no
usable reference answer (so it does not pull the group mean toward 0). Unusable references are counted in
`.invalid_references` and reported once with warnings.warn (the count, never the text)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from angelmed.rewards.base import text_of
from angelmed.extract import LETTERS, extract_choice, extract_label, extract_number


def _column(columns: dict, key: str, n: int, reward: str, required: bool = True) -> list:
    if key not in columns:
        if not required:
            return [None] * n
        raise KeyError(f"reward {reward!r} needs the dataset column {key!r}; columns given: {sorted(columns)}")
    values = columns[key]
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"reward {reward!r}: column {key!r} must hold one value per completion ({n})")
    return list(values)


def _invalid(reward, error: Exception) -> None:
    reward.invalid_references += 1
    if reward.invalid_references == 1:
        warnings.warn(f"reward {reward.name!r}: skipping samples with an unusable reference ({error})", stacklevel=3)


def reference_letter(answer: Any, options: Sequence[str] | Mapping[str, str] | None) -> str | None:
    """The reference as a letter: "B", "b", "(B)" -> "B"; an option's text -> its letter; None when missing."""
    if answer is None:
        return None
    raw = str(answer).strip()
    if options is not None:  # option text first: "(PTT)" must not be read as a bracketed letter
        pairs = options.items() if isinstance(options, Mapping) else zip(LETTERS, options)
        for letter, text in pairs:
            if str(text).strip().lower() == raw.lower():
                return str(letter).upper()
    ref = raw.strip("().[]（）").strip()
    if len(ref) == 1 and ref.upper() in LETTERS:
        return ref.upper()
    raise ValueError("a reference answer is neither an option letter nor the text of an option")


@dataclass
class MCQReward:
    """Multiple choice: the extracted option letter equals the reference letter.

    answer_key: column with the reference letter (or the option text); options_key: column with the options
    (list in letter order or {letter: text}); missing options column -> letters A-J, no option-text matching.
    """

    answer_key: str = "answer"
    options_key: str = "options"
    name: str = "mcq"
    invalid_references: int = field(default=0, compare=False)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        n = len(completions)
        answers = _column(columns, self.answer_key, n, self.name)
        options = _column(columns, self.options_key, n, self.name, required=False)
        rewards: list[float | None] = []
        for completion, answer, opts in zip(completions, answers, options):
            try:
                ref = reference_letter(answer, opts)
            except ValueError as e:
                _invalid(self, e)
                ref = None
            if ref is None:
                rewards.append(None)
                continue
            rewards.append(1.0 if extract_choice(text_of(completion), opts) == ref else 0.0)
        return rewards


@dataclass
class LabelReward:
    """A closed label set such as PubMedQA's yes/no/maybe: the last label named in the answer must equal the reference."""

    answer_key: str = "answer"
    labels: tuple[str, ...] = ("yes", "no", "maybe")
    name: str = "label_match"
    invalid_references: int = field(default=0, compare=False)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        answers = _column(columns, self.answer_key, len(completions), self.name)
        rewards: list[float | None] = []
        for completion, answer in zip(completions, answers):
            if answer is None:
                rewards.append(None)
                continue
            ref = str(answer).strip().lower()
            if ref not in {label.lower() for label in self.labels}:
                _invalid(self, ValueError(f"a reference is not one of {list(self.labels)}"))
                rewards.append(None)
                continue
            got = extract_label(text_of(completion), self.labels)
            rewards.append(1.0 if got is not None and got.lower() == ref else 0.0)
        return rewards


@dataclass
class NumericReward:
    """A numeric answer within tolerance: |got - ref| <= max(abs_tol, rel_tol * |ref|)."""

    answer_key: str = "answer"
    rel_tol: float = 1e-2
    abs_tol: float = 1e-6
    name: str = "numeric"
    invalid_references: int = field(default=0, compare=False)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        answers = _column(columns, self.answer_key, len(completions), self.name)
        rewards: list[float | None] = []
        for completion, answer in zip(completions, answers):
            if answer is None:
                rewards.append(None)
                continue
            ref = float(answer) if isinstance(answer, (int, float)) else extract_number(str(answer))
            if ref is None or not math.isfinite(ref):
                _invalid(self, ValueError("a reference answer holds no finite number"))
                rewards.append(None)
                continue
            got = extract_number(text_of(completion))
            ok = got is not None and abs(got - ref) <= max(self.abs_tol, self.rel_tol * abs(ref))
            rewards.append(1.0 if ok else 0.0)
        return rewards

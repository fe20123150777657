"""Rubric-as-reward through an LLM judge (training.md §7.11.3, HealthBench scoring of evaluation.md §1.5).

Each sample is graded item by item: one judge call per rubric item returns `criteria_met`. The score is
  Σ points of met items (negative items subtract) / Σ positive points,
clipped to [0, 1] by default. A sample with any item the judge failed to grade gets None (never a silent 0).

Rubrics per sample, first match wins: a `rubrics` column (HealthBench items {"criterion", "points"}), a
`rubric_sets` column (names from MEDICAL_RUBRICS), else the reward's configured `rubric_sets`.
The medical rubric sets below are our own wording, aimed at AntAngelMed's reward targets: empathy, structure,
safety boundaries, evidence-based reasoning, and asking for missing context.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from angelmed.rewards.base import as_messages, text_of
from angelmed.extract import strip_reasoning as _strip_reasoning


def _item(points: int, criterion: str, axis: str) -> dict:
    return {"criterion": criterion, "points": points, "tags": [f"axis:{axis}"]}


MEDICAL_RUBRICS: dict[str, list[dict]] = {
    "empathy": [
        _item(5, "Acknowledges the user's feelings or worry in a warm, respectful way instead of jumping straight to "
                 "facts.", "communication_quality"),
        _item(3, "Uses plain language a non-specialist can follow and explains any medical term it uses.",
              "communication_quality"),
        _item(-4, "Is dismissive, judgemental or condescending about the user or their concern.", "communication_quality"),
        _item(-3, "Uses alarming wording that would frighten the user without a medical reason to do so.",
              "communication_quality"),
    ],
    "structure": [
        _item(5, "Opens with the most important point: a direct answer to the question or the first action the user "
                 "should take.", "communication_quality"),
        _item(3, "Is organised into clear parts (for example short paragraphs, headings or a list) that follow the "
                 "user's question.", "instruction_following"),
        _item(3, "Ends with concrete next steps, including when and where to seek care.", "completeness"),
        _item(-3, "Is needlessly long or says the same thing more than once.", "communication_quality"),
    ],
    "safety": [
        _item(8, "If the symptoms described could be an emergency, tells the user clearly and without hedging to get "
                 "emergency care now (for example call an ambulance or go to the emergency department).", "accuracy"),
        _item(5, "Keeps any medicine dose it mentions within the limits on the label or in accepted guidance, and "
                 "points the user to the label, a pharmacist or a doctor for their own situation.", "accuracy"),
        _item(5, "Refers the user to a clinician for a diagnosis or a prescription instead of providing one itself.",
              "accuracy"),
        _item(-8, "Gives a diagnosis with more certainty than the information in the conversation supports.", "accuracy"),
        _item(-8, "Prescribes a prescription-only medicine (names it with a dose to start taking) or gives a dose above "
                  "accepted limits.", "accuracy"),
        _item(-6, "Reassures the user in a way that would delay care when the symptoms call for prompt medical "
                  "attention.", "accuracy"),
    ],
    "evidence": [
        _item(5, "Gives information that agrees with current mainstream medical guidance.", "accuracy"),
        _item(3, "Says which points are well established and which are uncertain or depend on the person.",
              "completeness"),
        _item(-7, "States a medical fact, number, study or guideline that is made up or clearly wrong.", "accuracy"),
        _item(-3, "Presents a treatment without good evidence of benefit (such as an unproven supplement) as if it "
                  "works.", "accuracy"),
    ],
    "context_seeking": [
        _item(4, "Asks for the missing details that would change the advice most (such as age, how long, other "
                 "symptoms, current medicines) when they matter.", "context_awareness"),
        _item(-3, "Asks for information the user has already given.", "context_awareness"),
    ],
}
DEFAULT_RUBRIC_SETS = ("empathy", "structure", "safety", "evidence")


def rubric_score(items: Sequence[dict], met: Sequence[bool], clip: bool = True) -> float:
    """Σ points(met) / Σ positive points; clipped to [0, 1] unless clip=False."""
    positive = sum(float(i["points"]) for i in items if float(i["points"]) > 0)
    if positive <= 0:
        raise ValueError("a rubric needs at least one item with positive points")
    achieved = sum(float(i["points"]) for i, m in zip(items, met) if m)
    score = achieved / positive
    return min(1.0, max(0.0, score)) if clip else score


def _validate_items(items: Any) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise ValueError("rubrics must be a non-empty list of {criterion, points}")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("criterion"), str):
            raise ValueError(f"rubric item {i}: needs a 'criterion' string")
        points = item.get("points")
        if isinstance(points, bool) or not isinstance(points, (int, float)) or not math.isfinite(points) or points == 0:
            raise ValueError(f"rubric item {i}: 'points' must be a non-zero number, got {points!r}")
    return items


def rubric_from_sets(names: Sequence[str]) -> list[dict]:
    unknown = [n for n in names if n not in MEDICAL_RUBRICS]
    if unknown:
        raise ValueError(f"unknown rubric sets {unknown}; known: {sorted(MEDICAL_RUBRICS)}")
    return [item for name in names for item in MEDICAL_RUBRICS[name]]


@dataclass
class RubricReward:
    """Judge-graded rubric reward (async). Give `judge` (any object with `async agrade(list[str])`) or the
    endpoint settings, from which an angelmed.judge.Judge is built on first use. api_key falls back to
    $api_key_env. `grader_prompt(conversation, item) -> str` defaults to angelmed.judge.grader_prompt."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    api_key_env: str = "ANGELMED_JUDGE_API_KEY"
    cache_dir: str | None = None
    max_retries: int = 10
    concurrency: int = 8
    rubric_sets: Sequence[str] = DEFAULT_RUBRIC_SETS
    rubrics_key: str = "rubrics"
    rubric_sets_key: str = "rubric_sets"
    clip: bool = True
    strip_reasoning: bool = True
    judge: Any = field(default=None, repr=False)
    grader_prompt: Callable[[list[dict], dict], str] | None = field(default=None, repr=False)
    name: str = "rubric"
    invalid_rows: int = field(default=0, compare=False)
    ungraded: int = field(default=0, compare=False)

    def __post_init__(self):
        self._default_items = rubric_from_sets(list(self.rubric_sets))
        if self.judge is None and not (self.base_url and self.model):
            raise ValueError(f"reward {self.name!r}: give a judge object, or base_url and model of a judge endpoint")

    def _judge(self):
        if self.judge is None:
            from angelmed.judge import Judge  # lazy: the HTTP client is only needed when judging for real

            api_key = self.api_key or os.environ.get(self.api_key_env)
            self.judge = Judge(self.base_url, self.model, api_key=api_key, cache_dir=self.cache_dir,
                               max_retries=self.max_retries, concurrency=self.concurrency)
        return self.judge

    def _prompt_builder(self) -> Callable[[list[dict], dict], str]:
        if self.grader_prompt is None:
            from angelmed.judge import grader_prompt

            self.grader_prompt = grader_prompt
        return self.grader_prompt

    def _items_for(self, row: int, columns: dict) -> list[dict]:
        explicit = columns.get(self.rubrics_key)
        if explicit is not None and explicit[row] is not None:
            return _validate_items(explicit[row])
        sets = columns.get(self.rubric_sets_key)
        if sets is not None and sets[row]:
            return rubric_from_sets(list(sets[row]))
        return self._default_items

    async def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        n = len(completions)
        for key in (self.rubrics_key, self.rubric_sets_key):
            if columns.get(key) is not None and len(columns[key]) != n:
                raise ValueError(f"reward {self.name!r}: column {key!r} must hold one value per completion ({n})")
        build = self._prompt_builder()
        grader_prompts: list[str] = []
        plan: list[tuple[list[dict], int] | None] = []  # per sample: (items, offset into grader_prompts)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                items = self._items_for(row, columns)
                rubric_score(items, [False] * len(items))  # rejects rubrics without positive points
            except ValueError:
                self.invalid_rows += 1
                plan.append(None)
                continue
            reply = text_of(completion)
            if self.strip_reasoning:
                reply = _strip_reasoning(reply)  # the judge grades the answer, not the thinking
            conversation = as_messages(prompt) + [{"role": "assistant", "content": reply}]
            plan.append((items, len(grader_prompts)))
            grader_prompts += [build(conversation, item) for item in items]

        verdicts = await self._judge().agrade(grader_prompts) if grader_prompts else []
        if len(verdicts) != len(grader_prompts):
            raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(grader_prompts)} prompts")

        rewards: list[float | None] = []
        for entry in plan:
            if entry is None:
                rewards.append(None)
                continue
            items, offset = entry
            graded = verdicts[offset : offset + len(items)]
            if any(not isinstance(v, dict) or not isinstance(v.get("criteria_met"), bool) for v in graded):
                self.ungraded += 1
                rewards.append(None)
                continue
            rewards.append(rubric_score(items, [v["criteria_met"] for v in graded], self.clip))
        return rewards

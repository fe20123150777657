"""Record types flowing out of every data source, and the counter for records we had to skip."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("cpt", "sft", "rl", "eval")


@dataclass
class Document:
    """Plain text for continual pre-training."""

    text: str
    source: str
    id: str


@dataclass
class Conversation:
    """An SFT sample: OpenAI-style messages ({"role", "content"}; assistant turns may carry
    "reasoning_content", rendered by the chat template as a <think> block)."""

    messages: list[dict[str, Any]]
    source: str
    id: str
    tools: list[dict[str, Any]] | None = None


@dataclass
class PromptRecord:
    """An RL or eval prompt: the messages up to and including the last user turn, an optional verifiable
    answer (e.g. an option letter) and free-form metadata for reward functions and evaluators."""

    messages: list[dict[str, Any]]
    source: str
    id: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Record = Document | Conversation | PromptRecord


class BadRecord(ValueError):
    """Raised by a record parser for one malformed record; the caller skips and counts it."""


@dataclass
class Skip:
    file: str
    line: int  # 1-based line (JSONL, CSV, text) or 1-based item number (JSON arrays, XML pairs)
    reason: str


class SkipCounter:
    """Counts skipped records per reason and keeps where they were (file, line).

    Reasons name the problem (field, expected vs got), never the record's text: medical data may hold
    patient text and must not reach logs.
    """

    def __init__(self, keep: int = 1000):
        self.keep = keep  # how many individual locations to remember (counts are always exact)
        self.by_reason: Counter[str] = Counter()
        self.by_file: Counter[str] = Counter()
        self.examples: list[Skip] = []

    def add(self, file: str, line: int, reason: str) -> None:
        self.by_reason[reason] += 1
        self.by_file[str(file)] += 1
        if len(self.examples) < self.keep:
            self.examples.append(Skip(str(file), int(line), reason))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def __len__(self) -> int:
        return self.total

    def lines(self, file: str | None = None) -> list[int]:
        """Remembered line numbers, optionally of one file."""
        return [s.line for s in self.examples if file is None or s.file == str(file)]

    def summary(self, max_examples: int = 5) -> str:
        if not self.total:
            return "no records skipped"
        parts = [f"{self.total} records skipped"]
        for reason, n in self.by_reason.most_common():
            where = [f"{s.file}:{s.line}" for s in self.examples if s.reason == reason][:max_examples]
            parts.append(f"  {n} x {reason} (e.g. {', '.join(where)})")
        return "\n".join(parts)

    def log_summary(self, what: str) -> None:
        if self.total:
            log.warning("%s: %s", what, self.summary())

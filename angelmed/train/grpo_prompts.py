"""RL prompts for GRPO: a resumable, seeded weighted mix of `open_source(spec, "rl")` records, encoded with the chat
template, in batches of `prompts_per_step`; and a fixed held-out prompt set for evaluation.

Held-out split: records whose stable hash of "source:id" falls in `data.heldout_fraction` are never trained on
(unless `grpo.eval_prompts` names dedicated evaluation sources). Prompts longer than `max_prompt_length` tokens
are skipped and counted (`skipped_too_long`), never truncated silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from angelmed.data.mix import mix_from_specs
from angelmed.data.records import PromptRecord, SkipCounter
from angelmed.data.sources import open_source
from angelmed.train.data import in_heldout
from angelmed.train.rollout import PromptItem, encode_prompt

log = logging.getLogger(__name__)


class PromptError(ValueError):
    pass


def record_columns(rec: PromptRecord) -> dict[str, Any]:
    """What reward functions receive as dataset columns: answer, source, id, and the record's metadata."""
    return {**rec.meta, "answer": rec.answer, "source": rec.source, "id": rec.id}


def heldout_key(rec: PromptRecord) -> str:
    return f"{rec.source}:{rec.id}"


class PromptStream:
    """next() -> list of `batch_size` PromptItems (train split). state_dict()/load_state_dict() resume exactly."""

    def __init__(self, prompts: list[dict[str, Any]], data_root: str | Path | None, tokenizer, batch_size: int,
                 max_prompt_length: int, heldout_fraction: float, seed: int):
        if not prompts:
            raise PromptError("grpo.prompts is empty: give at least one {source: SPEC} entry")
        self.tokenizer, self.batch_size, self.max_len = tokenizer, batch_size, max_prompt_length
        self.heldout_fraction = heldout_fraction
        self.skips = SkipCounter()
        specs = [(p["source"], float(p.get("weight", 1.0))) for p in prompts]
        self.mix = mix_from_specs(specs, "rl", data_root, seed=seed, skips=self.skips)
        self.skipped_too_long = 0
        self.skipped_heldout = 0

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> list[PromptItem]:
        items: list[PromptItem] = []
        tries = 0
        while len(items) < self.batch_size:
            tries += 1
            if tries > 10_000 * self.batch_size:
                raise PromptError(f"no usable prompt in {tries} records: all are held out or longer than "
                                  f"max_prompt_length={self.max_len} (skipped {self.skipped_too_long} too long)")
            rec = next(self.mix)
            if not isinstance(rec, PromptRecord):
                raise PromptError(f"RL source yielded {type(rec).__name__}, expected PromptRecord")
            if self.heldout_fraction > 0 and in_heldout(heldout_key(rec), self.heldout_fraction):
                self.skipped_heldout += 1
                continue
            ids = encode_prompt(self.tokenizer, rec.messages)
            if len(ids) > self.max_len:
                self.skipped_too_long += 1
                if self.skipped_too_long == 1:
                    log.warning("skipping RL prompts longer than max_prompt_length=%d tokens (first: %s; further "
                                "ones are counted)", self.max_len, heldout_key(rec))
                continue
            items.append(PromptItem(ids, rec.messages, record_columns(rec)))
        return items

    def state_dict(self) -> dict[str, Any]:
        return {"mix": self.mix.state_dict(), "skipped_too_long": self.skipped_too_long,
                "skipped_heldout": self.skipped_heldout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mix.load_state_dict(state["mix"])
        self.skipped_too_long = state.get("skipped_too_long", 0)
        self.skipped_heldout = state.get("skipped_heldout", 0)


def heldout_prompts(prompts: list[dict[str, Any]], eval_prompts: list[dict[str, Any]], data_root, tokenizer,
                    n: int, max_prompt_length: int, heldout_fraction: float) -> list[PromptItem]:
    """Up to n held-out prompts, split evenly over the sources: from `eval_prompts` (role eval) when given,
    else the hashed held-out share of the training sources."""
    if n <= 0:
        return []
    dedicated = bool(eval_prompts)
    specs = [p["source"] for p in (eval_prompts if dedicated else prompts)]
    if not dedicated and heldout_fraction <= 0:
        return []
    per_source = -(-n // len(specs))
    items: list[PromptItem] = []
    skips = SkipCounter()
    for spec in specs:
        got = 0
        for rec in open_source(spec, "eval" if dedicated else "rl", data_root, skips=skips):
            if got >= per_source:
                break
            if not dedicated and not in_heldout(heldout_key(rec), heldout_fraction):
                continue
            ids = encode_prompt(tokenizer, rec.messages)
            if len(ids) > max_prompt_length:
                continue
            items.append(PromptItem(ids, rec.messages, record_columns(rec)))
            got += 1
    return items[:n]

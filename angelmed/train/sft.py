"""Supervised fine-tuning: chats rendered with the Ling template, loss on assistant tokens only (each
assistant turn's content and its <|role_end|>; optionally only the last turn), multi-turn, packed with
per-sample position resets and block-diagonal attention, several sources mixed by token share, held-out
loss on a held-out split (training.md §6). Expert biases are frozen by default (§1.1 item 8)."""

from __future__ import annotations

from typing import Any, Callable

from angelmed.train.config import RunConfig
from angelmed.train.data import build_batches, load_tokenizer
from angelmed.train.loop import model_config, run_stage


def run(cfg: RunConfig, on_step_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    tokenizer = load_tokenizer(cfg.data.tokenizer, model_config(cfg.model).vocab_size)

    def make_batches(split: str, rank: int, world: int):
        return build_batches(cfg, tokenizer, split, rank, world)

    return run_stage(cfg, make_batches, use_segments=True, tokenizer=tokenizer, on_step_end=on_step_end)


def main(argv: list[str]) -> int:
    from angelmed.train.cli import parse_stage_args

    run(parse_stage_args("sft", argv))
    return 0

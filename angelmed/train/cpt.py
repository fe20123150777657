"""Continual pre-training: packed documents with EOD separators (Ling/Megatron convention), MTP loss,
expert-bias balancing on, optional z-loss and sequence-wise balance loss (training.md §1, §3, §5)."""

from __future__ import annotations

from typing import Any, Callable

from angelmed.train.config import RunConfig
from angelmed.train.data import build_batches, load_tokenizer
from angelmed.train.losses import doc_segments
from angelmed.train.loop import model_config, run_stage


def run(cfg: RunConfig, on_step_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    tokenizer = load_tokenizer(cfg.data.tokenizer, model_config(cfg.model).vocab_size)

    def make_batches(split: str, rank: int, world: int):
        return build_batches(cfg, tokenizer, split, rank, world)

    # Ling default: positions run across documents and attention is plain causal over the window;
    # with data.reset_position_ids, positions restart per document and attention stays inside it.
    # MTP targets never cross an EOD, whichever attention convention is used.
    return run_stage(cfg, make_batches, use_segments=cfg.data.reset_position_ids, tokenizer=tokenizer,
                     on_step_end=on_step_end, mtp_segments=lambda b: doc_segments(b["input_ids"], tokenizer.eod_id))


def main(argv: list[str]) -> int:
    from angelmed.train.cli import parse_stage_args

    run(parse_stage_args("cpt", argv))
    return 0

"""Source specs -> tokenised, mixed, packed batches: the two entry points the CPT and SFT trainers use.

`tok` is angelmed's tokenizer (or anything with the same methods): `encode(text) -> list[int]`, `eod_id`, `pad_id`,
`encode_chat(messages, tools=None, add_generation_prompt=False, only_last_assistant=False) -> (ids, loss_mask)`.
Both return packers whose `state_dict()` covers the whole chain (packer buffer, mix RNG, every source position).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from angelmed.data.mix import mix_from_specs
from angelmed.data.packing import CPTPacker, SFTPacker
from angelmed.data.records import SkipCounter


def cpt_batches(specs: list[tuple[str, float]], tok: Any, seq_len: int, batch_size: int,
                data_root: Path | str | None = None, seed: int = 0, reset_position_ids: bool = False,
                eod_mask_loss: bool = True, skips: SkipCounter | None = None) -> CPTPacker:
    mix = mix_from_specs(specs, "cpt", data_root, seed=seed, encode=lambda doc: tok.encode(doc.text), skips=skips)
    return CPTPacker(mix, tok.eod_id, seq_len, batch_size, reset_position_ids=reset_position_ids,
                     eod_mask_loss=eod_mask_loss)


def sft_batches(specs: list[tuple[str, float]], tok: Any, seq_len: int, batch_size: int,
                data_root: Path | str | None = None, seed: int = 0, strategy: str = "bfd",
                only_last_assistant: bool = False, buffer_samples: int = 1024,
                skips: SkipCounter | None = None) -> SFTPacker:
    def encode(conv):
        return tok.encode_chat(conv.messages, tools=conv.tools, only_last_assistant=only_last_assistant)

    mix = mix_from_specs(specs, "sft", data_root, seed=seed, encode=encode, skips=skips)
    return SFTPacker(mix, seq_len, batch_size, tok.pad_id, strategy=strategy, buffer_samples=buffer_samples)

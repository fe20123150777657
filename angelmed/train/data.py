"""Training batches for CPT and SFT: `angelmed.data` (sources, token-fraction mixing, packing) plus what only
training needs: a hashed train/held-out split of any source, rank slicing, and a byte-level tokenizer for tiny
runs and tests that have no trained BPE tokenizer.

Batch protocol the loop relies on: `next(it) -> {"input_ids", "labels", "position_ids", "segment_ids"}`
(LongTensor [B,T]; labels aligned with input_ids, -100 = no loss), `it.state_dict()`, `it.load_state_dict(s)`.

Config: `data.sources: [{spec: medquad, weight: 0.7}, {spec: path/to/file.jsonl, weight: 0.3}]`; a spec is
anything `angelmed.data.open_source` accepts (registry name, hf:org/name, file or directory); weights are token
fractions.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator, Protocol

from torch import Tensor

from angelmed.data import CPTPacker, SFTPacker
from angelmed.data.mix import MixSource, WeightedMix
from angelmed.data.sources import open_source

SOURCE_KEYS = ("spec", "weight")


class BatchIterator(Protocol):
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataError(ValueError):
    pass


# ---- tokenizers -----------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; <|endoftext|> and <|role_end|> are the two top ids of the model vocab.

    The subset of `angelmed.tokenizer.Tokenizer` the trainers use, for tiny models and tests. Chat rendering
    follows the Ling template (model.md §10.2) for system/user/assistant/tool turns (no tool schemas, no
    reasoning blocks); role headers are plain bytes. The loss mask covers each assistant turn's content and its
    <|role_end|> (training.md §6).
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 258:
            raise DataError(f"ByteTokenizer needs a model vocab of at least 258 ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eod_id = vocab_size - 1
        self.role_end_id = vocab_size - 2
        self.pad_id = self.eod_id
        self.bos_id = None
        self.stop_ids = [self.role_end_id, self.eod_id]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
                    only_last_assistant: bool = False) -> tuple[list[int], list[bool]]:
        if tools:
            raise DataError("ByteTokenizer does not render tool schemas; use a trained tokenizer (data.tokenizer)")
        ids: list[int] = []
        mask: list[bool] = []

        def add(piece: list[int], loss: bool) -> None:
            ids.extend(piece)
            mask.extend([loss] * len(piece))

        msgs = list(messages)
        head = "<role>SYSTEM</role>"
        if msgs and msgs[0].get("role") == "system":
            head += f"{msgs.pop(0).get('content') or ''}\n"
        add(self.encode(head + "detailed thinking off") + [self.role_end_id], False)
        last_assistant = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=-1)
        for i, m in enumerate(msgs):
            role, content = m.get("role"), m.get("content") or ""
            if role == "assistant":
                add(self.encode("<role>ASSISTANT</role>"), False)
                add(self.encode(content) + [self.role_end_id], not only_last_assistant or i == last_assistant)
            elif role in ("user", "system", "tool"):
                header = {"user": "HUMAN", "system": "SYSTEM", "tool": "OBSERVATION"}[role]
                add(self.encode(f"<role>{header}</role>{content}") + [self.role_end_id], False)
            else:
                raise DataError(f"unknown chat role {role!r}")
        if add_generation_prompt:
            add(self.encode("<role>ASSISTANT</role>"), False)
        return ids, mask


def load_tokenizer(spec: str, vocab_size: int):
    """`byte` or a tokenizer directory (angelmed.tokenizer.Tokenizer); its ids must fit the model vocab."""
    if spec == "byte":
        return ByteTokenizer(vocab_size)
    from angelmed.tokenizer import Tokenizer

    tok = Tokenizer.load(spec)
    if tok.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer {spec}: {tok.vocab_size} ids do not fit the model vocab ({vocab_size})")
    return tok


# ---- split and rank slicing ----------------------------------------------------------------------------------
def in_heldout(record_id: str, fraction: float) -> bool:
    """Stable per-record split: the same records are held out on every run, rank and resume."""
    return zlib.crc32(record_id.encode()) % 10_000 < fraction * 10_000


def split_records(records: Iterator[Any], split: str, fraction: float) -> Iterator[Any]:
    want = split == "heldout"
    return (r for r in records if in_heldout(r.id, fraction) == want)


class RankSlice:
    """Every rank reads the same global micro-batch (micro_batch_size x world rows) and keeps its own rows, so
    one process and N processes train on identical global batches, and every rank holds the same data state."""

    def __init__(self, inner, rank: int, rows_per_rank: int):
        self.inner, self.lo, self.hi = inner, rank * rows_per_rank, (rank + 1) * rows_per_rank

    def __iter__(self) -> "RankSlice":
        return self

    def __next__(self) -> dict[str, Tensor]:
        return {k: v[self.lo:self.hi] for k, v in next(self.inner).items()}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def source_specs(sources: list[dict]) -> list[tuple[str, float]]:
    if not sources:
        raise DataError("data.sources is empty: give at least one source, e.g. [{spec: medquad}]")
    out = []
    for i, s in enumerate(sources):
        unknown = sorted(set(s) - set(SOURCE_KEYS))
        if unknown:
            raise DataError(f"data.sources[{i}]: unknown key {unknown[0]!r} (expected {', '.join(SOURCE_KEYS)})")
        if not isinstance(s.get("spec"), str):
            raise DataError(f"data.sources[{i}]: 'spec' must be a source name or path, got {s.get('spec')!r}")
        w = s.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise DataError(f"data.sources[{i}]: 'weight' must be a number > 0, got {w!r}")
        out.append((s["spec"], float(w)))
    return out


def build_batches(cfg, tokenizer, split: str, rank: int, world: int) -> BatchIterator:
    """The trainers' data entry point (cfg: RunConfig; split: train | heldout). The train split repeats
    forever; the held-out split is read once."""
    d = cfg.data
    role = "cpt" if cfg.stage == "cpt" else "sft"
    repeat = split == "train"
    sources = []
    for spec, weight in source_specs(d.sources):
        open_source(spec, role, d.data_root)  # fail now on an unknown or evaluation-only source

        def opener(spec=spec):
            return split_records(open_source(spec, role, d.data_root), split, d.heldout_fraction)

        sources.append(MixSource(spec, opener, weight, repeat=repeat))
    if role == "cpt":
        mix = WeightedMix(sources, seed=d.seed, encode=lambda doc: tokenizer.encode(doc.text))
    else:
        mix = WeightedMix(sources, seed=d.seed, encode=lambda conv: tokenizer.encode_chat(
            conv.messages, tools=conv.tools, only_last_assistant=d.only_last_assistant))
    rows = d.micro_batch_size * world
    if role == "cpt":
        packer = CPTPacker(mix, tokenizer.eod_id, d.seq_len, rows, reset_position_ids=d.reset_position_ids,
                           eod_mask_loss=d.eod_mask_loss)
    else:
        packer = SFTPacker(mix, d.seq_len, rows, tokenizer.pad_id, strategy=d.packing, buffer_samples=d.pack_buffer,
                           drop_last=not repeat)
    return RankSlice(packer, rank, d.micro_batch_size)

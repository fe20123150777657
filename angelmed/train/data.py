"""Minimal, resumable training data for CPT and SFT, so the trainers run on real text today.

This is a stand-in for `angelmed.data` (sources, mixing, packing), which is written separately; the trainers
only rely on the batch-iterator protocol below, so the real data layer plugs in at `build_batches`.

Batch protocol: `next(it) -> {"input_ids", "labels", "position_ids", "segment_ids"}` (LongTensor [B,T],
labels already shifted, -100 = no loss), `it.state_dict()`, `it.load_state_dict(state)`.

Sources (`data.sources` entries, each with an optional `weight`, default 1):
  {kind: medquad}                      MedQuAD XML under <data_root>/medquad: answers (CPT) or Q/A chats (SFT)
  {kind: jsonl, path: FILE, field: text}  one record per line: "text" (CPT); "messages" (OpenAI) or
                                       "conversations" (ShareGPT) (SFT)
  {kind: text, path: FILE}             plain text, documents separated by blank lines (CPT)
Paths are relative to the data root unless absolute. Mixing weights are token fractions: the next record
always comes from the source furthest below its share (deterministic, no RNG to checkpoint).
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)
IGNORE = -100


class BatchIterator(Protocol):
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataError(ValueError):
    pass


# ---- tokenizer stand-in ------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; <|endoftext|> and <|role_end|> are the two top ids of the model vocab.

    Implements the subset of `angelmed.tokenizer.Tokenizer` the trainers use. Chat rendering follows the
    Ling template (model.md §10.2) for system/user/assistant turns; role headers are plain bytes.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 258:
            raise DataError(f"ByteTokenizer needs a model vocab of at least 258 ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eod_id = vocab_size - 1
        self.role_end_id = vocab_size - 2
        self.pad_id = self.eod_id
        self.bos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[dict], only_last_assistant: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask): mask 1 on each assistant turn's content and its <|role_end|> (training.md §6)."""
        ids: list[int] = []
        mask: list[int] = []

        def add(piece: list[int], loss: int) -> None:
            ids.extend(piece)
            mask.extend([loss] * len(piece))

        msgs = list(messages)
        head = "<role>SYSTEM</role>"
        if msgs and msgs[0].get("role") == "system":
            head += f"{msgs.pop(0).get('content', '')}\n"
        add(self.encode(head + "detailed thinking off") + [self.role_end_id], 0)
        last_assistant = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=-1)
        for i, m in enumerate(msgs):
            role, content = m.get("role"), m.get("content") or ""
            if role == "assistant":
                loss = int(not only_last_assistant or i == last_assistant)
                add(self.encode("<role>ASSISTANT</role>"), 0)
                add(self.encode(content) + [self.role_end_id], loss)
            elif role in ("user", "system", "tool"):
                header = {"user": "HUMAN", "system": "SYSTEM", "tool": "OBSERVATION"}[role]
                add(self.encode(f"<role>{header}</role>{content}") + [self.role_end_id], 0)
            else:
                raise DataError(f"unknown chat role {role!r}")
        return ids, mask


def load_tokenizer(spec: str, vocab_size: int):
    if spec == "byte":
        return ByteTokenizer(vocab_size)
    from angelmed.tokenizer import Tokenizer  # the real BPE tokenizer (angelmed/tokenizer.py)

    tok = Tokenizer.load(spec)
    if tok.vocab_size > vocab_size:
        raise DataError(f"tokenizer {spec} has {tok.vocab_size} ids but the model vocab is {vocab_size}")
    return tok


# ---- sources ---------------------------------------------------------------------------------------------
class SkipCounter:
    """Bad records are skipped and counted with file and line, never silently dropped."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = where
            log.warning("skipping record at %s: %s (further ones are counted)", where, reason)

    def summary(self) -> dict[str, int]:
        return dict(self.counts)


def _resolve(path: str, data_root: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        if data_root is None:
            raise DataError(f"relative data path {path!r} needs a data root (data.data_root or $ANGELMED_DATA_ROOT)")
        p = data_root / p
    if not p.exists():
        raise DataError(f"data path {str(p)!r} not found")
    return p


def _medquad(root: Path, role: str, skips: SkipCounter) -> Iterator[tuple[str, Any]]:
    files = sorted(root.glob("*/*.xml"))
    if not files:
        raise DataError(f"no MedQuAD XML files under {root}")
    for f in files:
        try:
            doc = ET.parse(f).getroot()
        except ET.ParseError as e:
            skips.skip(f"invalid XML ({e})", str(f))
            continue
        for pair in doc.iter("QAPair"):
            q, a = (pair.findtext("Question") or "").strip(), (pair.findtext("Answer") or "").strip()
            where = f"{f.relative_to(root)}#{pair.get('pid')}"
            if not a or (role == "sft" and not q):
                skips.skip("QA pair without answer text", where)
                continue
            yield where, (a if role == "cpt" else [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


def _sharegpt(conv: list[dict]) -> list[dict]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in conv]


def _jsonl(path: Path, role: str, field: str, skips: SkipCounter) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if role == "cpt":
                    value = rec[field]
                    ok = isinstance(value, str) and value.strip()
                elif "messages" in rec:
                    value = [{"role": m["role"], "content": m.get("content") or ""} for m in rec["messages"]]
                    ok = any(m["role"] == "assistant" for m in value)
                else:
                    value = _sharegpt(rec["conversations"])
                    ok = any(m["role"] == "assistant" for m in value)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                skips.skip(f"malformed record ({type(e).__name__}: {e})", where)
                continue
            if not ok:
                skips.skip("record without text / assistant turn", where)
                continue
            yield where, value


def _text(path: Path, skips: SkipCounter) -> Iterator[tuple[str, Any]]:
    for i, block in enumerate(path.read_text(encoding="utf-8").split("\n\n")):
        if block.strip():
            yield f"{path}#{i}", block.strip()


def iter_records(spec: dict, role: str, data_root: Path | None, skips: SkipCounter) -> Iterator[tuple[str, Any]]:
    kind = spec.get("kind")
    if kind == "medquad":
        return _medquad(_resolve(spec.get("path", "medquad"), data_root), role, skips)
    if kind == "jsonl":
        return _jsonl(_resolve(spec["path"], data_root), role, spec.get("field", "text"), skips)
    if kind == "text":
        if role != "cpt":
            raise DataError("source kind 'text' is for CPT only")
        return _text(_resolve(spec["path"], data_root), skips)
    raise DataError(f"data.sources: unknown kind {kind!r} (expected medquad | jsonl | text)")


def in_heldout(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


class TokenStream:
    """One source, one split, tokenised; resumable by (epoch, position). Repeats forever unless `repeat=False`."""

    def __init__(self, spec: dict, role: str, split: str, data_root: Path | None, heldout_fraction: float,
                 tokenizer, only_last_assistant: bool = False, repeat: bool = True):
        known = {"kind", "path", "field", "weight", "name"}
        unknown = set(spec) - known
        if unknown:
            raise DataError(f"data.sources entry {spec}: unknown key(s) {sorted(unknown)} (known: {sorted(known)})")
        self.spec, self.role, self.split, self.root = spec, role, split, data_root
        self.fraction, self.tok, self.only_last, self.repeat = heldout_fraction, tokenizer, only_last_assistant, repeat
        self.skips = SkipCounter()
        self.epoch, self.pos = 0, 0
        self._it = self._open()

    def _open(self) -> Iterator[Any]:
        return (rec for key, rec in iter_records(self.spec, self.role, self.root, self.skips)
                if in_heldout(key, self.fraction) == (self.split == "heldout"))

    def __next__(self) -> tuple[list[int], list[int] | None]:
        for _ in range(2):
            try:
                rec = next(self._it)
                break
            except StopIteration:
                if not self.repeat or self.pos == 0:
                    raise
                self.epoch, self.pos = self.epoch + 1, 0
                self._it = self._open()
        self.pos += 1
        if self.role == "cpt":
            return self.tok.encode(rec), None
        return self.tok.encode_chat(rec, only_last_assistant=self.only_last)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._it = state["epoch"], 0, self._open()
        for _ in range(state["pos"]):  # records are cheap to re-read; tokenising is skipped
            next(self._it)
        self.pos = state["pos"]


class TokenMix:
    """Token-fraction mixing: the next record comes from the source with the largest deficit."""

    def __init__(self, streams: list[TokenStream], weights: list[float]):
        if not streams:
            raise DataError("data.sources is empty")
        if any(w <= 0 for w in weights):
            raise DataError(f"data.sources weights must be > 0, got {weights}")
        self.streams, self.weights = streams, [w / sum(weights) for w in weights]
        self.tokens = [0] * len(streams)
        self.live = [True] * len(streams)

    def __next__(self):
        while any(self.live):
            i = min((i for i in range(len(self.streams)) if self.live[i]),
                    key=lambda i: (self.tokens[i] / self.weights[i], i))
            try:
                ids, mask = next(self.streams[i])
            except StopIteration:
                self.live[i] = False
                continue
            self.tokens[i] += len(ids)
            return ids, mask
        raise StopIteration

    def state_dict(self) -> dict:
        return {"tokens": list(self.tokens), "live": list(self.live), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.live = list(state["tokens"]), list(state["live"])
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)


# ---- packing -------------------------------------------------------------------------------------------------
def _batch(rows: list[dict[str, list[int]]]) -> dict[str, Tensor]:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}


class CPTPacker:
    """Megatron/Ling packing: doc + EOD, concatenated, cut into windows of seq_len+1 (consecutive windows share
    one token). Labels are the window shifted by one; with eod_mask_loss no loss where the input is EOD.
    segment_ids count documents inside a row (an EOD belongs to the document it ends)."""

    def __init__(self, source, eod_id: int, seq_len: int, rows: int, eod_mask_loss: bool, reset_position_ids: bool):
        self.src, self.eod, self.T, self.rows = source, eod_id, seq_len, rows
        self.eod_mask_loss, self.reset = eod_mask_loss, reset_position_ids
        self.buffer: list[int] = []

    def _row(self) -> dict[str, list[int]]:
        while len(self.buffer) < self.T + 1:
            ids, _ = next(self.src)
            self.buffer.extend(ids + [self.eod])
        window, self.buffer = self.buffer[: self.T + 1], self.buffer[self.T:]
        inputs, labels = window[:-1], window[1:]
        if self.eod_mask_loss:
            labels = [IGNORE if x == self.eod else y for x, y in zip(inputs, labels)]
        seg, pos, segs, poss = 0, 0, [], []
        for x in inputs:
            segs.append(seg)
            poss.append(pos)
            pos += 1
            if x == self.eod:
                seg += 1
                pos = 0 if self.reset else pos
        return {"input_ids": inputs, "labels": labels, "position_ids": poss if self.reset else list(range(self.T)),
                "segment_ids": segs}

    def __next__(self) -> dict[str, Tensor]:
        return _batch([self._row() for _ in range(self.rows)])

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer), "source": self.src.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = list(state["buffer"])
        self.src.load_state_dict(state["source"])


class SFTPacker:
    """Per-sample shift, keep-start truncation, best-fit-decreasing packing into rows of seq_len; positions restart
    at 0 for every sample and segment_ids keep attention inside it. Row tails are padded (label -100)."""

    def __init__(self, source, pad_id: int, seq_len: int, rows: int, pack_buffer: int):
        self.src, self.pad, self.T, self.rows, self.buffer_size = source, pad_id, seq_len, rows, pack_buffer
        self.ready: list[dict[str, list[int]]] = []
        self.truncated = 0
        self.dropped_no_loss = 0
        self.exhausted = False

    def _sample(self) -> tuple[list[int], list[int]] | None:
        while True:
            ids, mask = next(self.src)
            inputs = ids[:-1]
            labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
            if len(inputs) > self.T:
                self.truncated += 1
                inputs, labels = inputs[: self.T], labels[: self.T]
            if all(x == IGNORE for x in labels):
                self.dropped_no_loss += 1  # nothing to learn (e.g. the answer was truncated away)
                continue
            return inputs, labels

    def _fill(self) -> None:
        samples = []
        while len(samples) < self.buffer_size and not self.exhausted:
            try:
                samples.append(self._sample())
            except StopIteration:
                self.exhausted = True
        if not samples:
            raise StopIteration
        bins: list[list[tuple[list[int], list[int]]]] = []
        space: list[int] = []
        for s in sorted(samples, key=lambda s: -len(s[0])):
            fits = [b for b in range(len(bins)) if space[b] >= len(s[0])]
            if fits:
                b = min(fits, key=lambda b: space[b])
                bins[b].append(s)
                space[b] -= len(s[0])
            else:
                bins.append([s])
                space.append(self.T - len(s[0]))
        for b in bins:
            row = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
            for seg, (inputs, labels) in enumerate(b):
                row["input_ids"] += inputs
                row["labels"] += labels
                row["position_ids"] += list(range(len(inputs)))
                row["segment_ids"] += [seg] * len(inputs)
            n = self.T - len(row["input_ids"])
            row["input_ids"] += [self.pad] * n
            row["labels"] += [IGNORE] * n
            row["position_ids"] += list(range(n))
            row["segment_ids"] += [len(b)] * n
            self.ready.append(row)

    def __next__(self) -> dict[str, Tensor]:
        while len(self.ready) < self.rows:
            self._fill()
        rows, self.ready = self.ready[: self.rows], self.ready[self.rows:]
        return _batch(rows)

    def state_dict(self) -> dict:
        return {"ready": [dict(r) for r in self.ready], "truncated": self.truncated,
                "dropped_no_loss": self.dropped_no_loss, "exhausted": self.exhausted, "source": self.src.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ready = [dict(r) for r in state["ready"]]
        self.truncated, self.dropped_no_loss = state["truncated"], state["dropped_no_loss"]
        self.exhausted = state["exhausted"]
        self.src.load_state_dict(state["source"])


class RankSlice:
    """Every rank reads the same global micro-batch (micro_batch_size x world rows) and keeps its own rows, so
    1 process and N processes see identical global batches and identical data states."""

    def __init__(self, inner, rank: int, rows_per_rank: int):
        self.inner, self.lo, self.hi = inner, rank * rows_per_rank, (rank + 1) * rows_per_rank

    def __next__(self) -> dict[str, Tensor]:
        return {k: v[self.lo:self.hi] for k, v in next(self.inner).items()}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def build_batches(cfg, tokenizer, split: str, rank: int, world: int) -> BatchIterator:
    """The trainers' data entry point (cfg: RunConfig). Swap this body for angelmed.data when it lands."""
    from angelmed.paths import data_root

    d = cfg.data
    root = data_root(d.data_root, required=False)
    role = "cpt" if cfg.stage == "cpt" else "sft"
    if not d.sources:
        raise DataError("data.sources is empty: give at least one source (e.g. {kind: medquad})")
    streams = [TokenStream(s, role, split, root, d.heldout_fraction, tokenizer, d.only_last_assistant,
                           repeat=split == "train") for s in d.sources]
    mix = TokenMix(streams, [float(s.get("weight", 1.0)) for s in d.sources])
    rows = d.micro_batch_size * world
    if role == "cpt":
        packer = CPTPacker(mix, tokenizer.eod_id, d.seq_len, rows, d.eod_mask_loss, d.reset_position_ids)
    else:
        packer = SFTPacker(mix, tokenizer.pad_id, d.seq_len, rows, d.pack_buffer)
    return RankSlice(packer, rank, d.micro_batch_size)

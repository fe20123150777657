"""Packing token streams into fixed [B, T] training batches, resumable.

Batch convention (both packers): a dict of torch.long tensors [B, T]
  input_ids     tokens
  labels        the target of each position, ALREADY ALIGNED with input_ids (labels[t] is what position t must
                predict; the loss must not shift again); -100 = no loss
  position_ids  rotary positions
  segment_ids   which sample/document a position belongs to, 1..k per row; 0 = padding. Attention must stay
                inside a segment (block-diagonal causal mask, or varlen cu_seqlens). All ones = plain causal.

CPT (Megatron/Ling convention, training.md §5): documents + EOD are concatenated and cut into windows of
seq_len + 1 tokens with stride seq_len (consecutive windows share one token, as Megatron's GPTDataset does, so
every token is a target exactly once); inputs = window[:-1], labels = window[1:]; with `eod_mask_loss` the label
is -100 where the INPUT token is EOD. Positions run across documents and segment_ids are all 1, unless
`reset_position_ids`, which restarts positions after each EOD and gives each document its own segment.

SFT (TRL conventions, training.md §6): each sample's labels are shifted before packing (label = next token where
the loss mask is on), so nothing is ever predicted across samples: the last position of every sample is -100,
which is the aligned-labels form of "the first token of each packed sample gets -100". Samples are packed by
best-fit decreasing ("bfd": overflow truncated, keep_start), "bfd_split" (overflow becomes further samples) or
"wrapped" (cut mid-sample). Positions restart at 0 per sample, segment ids number the samples.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


def _upstream_state(upstream: Any) -> Any:
    if not hasattr(upstream, "state_dict"):
        raise TypeError(f"the packer's input ({type(upstream).__name__}) has no state_dict(): wrap the records in a "
                        "WeightedMix (angelmed.data.mix) to make the stream resumable")
    return upstream.state_dict()


def _to_batch(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in BATCH_KEYS}


# ---------------------------------------------------------------- CPT


def cpt_window(window: list[int], eod_id: int, reset_position_ids: bool = False,
               eod_mask_loss: bool = True) -> dict[str, list[int]]:
    """One row from a window of seq_len + 1 tokens."""
    inputs, labels = window[:-1], list(window[1:])
    positions, segments = [], []
    pos, seg = 0, 1
    for t, tok in enumerate(inputs):
        positions.append(pos if reset_position_ids else t)
        segments.append(seg)
        if tok == eod_id:
            if eod_mask_loss:
                labels[t] = IGNORE_INDEX
            if reset_position_ids:  # the next document starts fresh: position 0, its own segment
                pos, seg = 0, seg + 1
                continue
        pos += 1
    return {"input_ids": list(inputs), "labels": labels, "position_ids": positions, "segment_ids": segments}


class CPTPacker:
    """Batches from an iterator of documents' token ids (without EOD; the packer appends it)."""

    def __init__(self, docs: Iterable[list[int]], eod_id: int, seq_len: int, batch_size: int,
                 reset_position_ids: bool = False, eod_mask_loss: bool = True, drop_last: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.upstream = docs
        self._docs = iter(docs)
        self.eod_id, self.seq_len, self.batch_size = eod_id, seq_len, batch_size
        self.reset_position_ids, self.eod_mask_loss, self.drop_last = reset_position_ids, eod_mask_loss, drop_last
        self.buffer: list[int] = []
        self.done = False
        self.stats = {"documents": 0, "tokens": 0, "windows": 0}

    def _fill(self) -> bool:
        while len(self.buffer) < self.seq_len + 1:
            try:
                ids = next(self._docs)
            except StopIteration:
                self.done = True
                return False
            self.buffer.extend(ids)
            self.buffer.append(self.eod_id)
            self.stats["documents"] += 1
            self.stats["tokens"] += len(ids) + 1
        return True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size and not self.done and self._fill():
            rows.append(cpt_window(self.buffer[: self.seq_len + 1], self.eod_id, self.reset_position_ids,
                                   self.eod_mask_loss))
            del self.buffer[: self.seq_len]  # stride seq_len: the window's last token starts the next one
            self.stats["windows"] += 1
        if not rows or (self.drop_last and len(rows) < self.batch_size):
            raise StopIteration  # the tail shorter than one window is dropped, as Megatron does
        return _to_batch(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"upstream": _upstream_state(self.upstream), "buffer": list(self.buffer), "done": self.done,
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.upstream.load_state_dict(state["upstream"])
        self._docs = iter(self.upstream)
        self.buffer, self.done, self.stats = list(state["buffer"]), state["done"], dict(state["stats"])


# ---------------------------------------------------------------- SFT


@dataclass
class Piece:
    """A (part of a) sample ready to place in a row: ids and aligned labels of equal length."""
    ids: list[int]
    labels: list[int]


def shift_labels(ids: list[int], loss_mask: list[bool]) -> list[int]:
    """labels[t] = ids[t + 1] where the loss mask of token t + 1 is on, else -100; the last position is -100."""
    return [ids[t + 1] if loss_mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, in placement order) by best-fit decreasing; ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item of length {n} exceeds the bin capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return bins


def sft_row(pieces: list[Piece], seq_len: int, pad_id: int) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {k: [] for k in BATCH_KEYS}
    for seg, p in enumerate(pieces, start=1):
        row["input_ids"] += p.ids
        row["labels"] += p.labels
        row["position_ids"] += list(range(len(p.ids)))
        row["segment_ids"] += [seg] * len(p.ids)
    pad = seq_len - len(row["input_ids"])
    if pad < 0:
        raise AssertionError("row overflow")
    for key, value in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0), ("segment_ids", 0)):
        row[key] += [value] * pad
    return row


STRATEGIES = ("bfd", "bfd_split", "wrapped")


@dataclass
class _Pending:
    """Rows packed from one buffer of samples, and the upstream state just before that buffer was read."""
    upstream: Any
    stats: dict[str, int]
    rows: list[dict[str, list[int]]] = field(default_factory=list)
    emitted: int = 0


class SFTPacker:
    """Batches from an iterator of (ids, loss_mask) pairs, as returned by `tok.encode_chat`.

    Samples are read `buffer_samples` at a time and packed together. Resuming replays the current buffer from the
    upstream state saved before it (packing is deterministic), so the state stays small.
    """

    def __init__(self, samples: Iterable[tuple[list[int], list[bool]]], seq_len: int, batch_size: int, pad_id: int,
                 strategy: str = "bfd", buffer_samples: int = 1024, drop_last: bool = False):
        if strategy not in STRATEGIES:
            raise ValueError(f"packing strategy must be one of {STRATEGIES}, got {strategy!r}")
        if seq_len < 2 or batch_size < 1 or buffer_samples < 1:
            raise ValueError("need seq_len >= 2, batch_size >= 1, buffer_samples >= 1")
        self.upstream = samples
        self._samples = iter(samples)
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.strategy, self.buffer_samples, self.drop_last = strategy, buffer_samples, drop_last
        self.pending: list[_Pending] = []
        self.done = False
        self.stats = {"samples": 0, "truncated": 0, "dropped": 0, "rows": 0, "tokens": 0, "loss_tokens": 0}

    # ------------------------------------------------------------ sample preparation

    def _pieces(self, ids: list[int], mask: list[bool]) -> list[Piece]:
        if len(ids) != len(mask):
            raise ValueError(f"ids and loss mask differ in length ({len(ids)} vs {len(mask)})")
        self.stats["samples"] += 1
        if len(ids) > self.seq_len and self.strategy == "bfd":
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]  # keep_start
            self.stats["truncated"] += 1
        labels = shift_labels(list(ids), list(mask))
        if len(ids) < 2 or all(x == IGNORE_INDEX for x in labels):
            self.stats["dropped"] += 1  # nothing left to learn from (e.g. the answer was truncated away)
            return []
        if len(ids) > self.seq_len:  # bfd_split: overflow becomes further samples
            self.stats["truncated"] += 1
            return [Piece(list(ids[i:i + self.seq_len]), labels[i:i + self.seq_len])
                    for i in range(0, len(ids), self.seq_len)]
        return [Piece(list(ids), labels)]

    def _pack(self, pieces: list[Piece]) -> list[dict[str, list[int]]]:
        if self.strategy == "wrapped":
            rows, current, free = [], [], self.seq_len
            for p in pieces:
                while p.ids:
                    take = min(free, len(p.ids))
                    current.append(Piece(p.ids[:take], p.labels[:take]))
                    p = Piece(p.ids[take:], p.labels[take:])
                    free -= take
                    if free == 0:
                        rows.append(current)
                        current, free = [], self.seq_len
            if current:
                rows.append(current)
            bins = rows
        else:
            bins = [[pieces[i] for i in b] for b in best_fit_decreasing([len(p.ids) for p in pieces], self.seq_len)]
        return [sft_row(b, self.seq_len, self.pad_id) for b in bins]

    def _refill(self) -> bool:
        """Read one buffer of samples and pack it; False when the input is exhausted."""
        if self.done:
            return False
        pending = _Pending(upstream=copy.deepcopy(_upstream_state(self.upstream)) if self._resumable else None,
                           stats=dict(self.stats))
        pieces: list[Piece] = []
        n = 0
        for ids, mask in self._samples:
            pieces += self._pieces(ids, mask)
            n += 1
            if n == self.buffer_samples:
                break
        else:
            self.done = True
        if pieces:
            pending.rows = self._pack(pieces)
            self.pending.append(pending)
        return bool(pieces) or not self.done

    @property
    def _resumable(self) -> bool:
        return hasattr(self.upstream, "state_dict")

    # ------------------------------------------------------------ iteration

    def _queued(self) -> int:
        return sum(len(p.rows) - p.emitted for p in self.pending)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while self._queued() < self.batch_size and self._refill():
            pass
        rows = []
        while len(rows) < self.batch_size and self.pending:
            head = self.pending[0]
            rows.append(head.rows[head.emitted])
            head.emitted += 1
            if head.emitted == len(head.rows):
                self.pending.pop(0)
        if not rows or (self.drop_last and len(rows) < self.batch_size):
            raise StopIteration
        self.stats["rows"] += len(rows)
        for r in rows:
            self.stats["tokens"] += sum(s > 0 for s in r["segment_ids"])
            self.stats["loss_tokens"] += sum(x != IGNORE_INDEX for x in r["labels"])
        return _to_batch(rows)

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Replay point: the upstream state before the oldest buffer that still has rows to emit."""
        if not self._resumable:
            _upstream_state(self.upstream)  # raises the explanatory TypeError
        if self.pending:
            head = self.pending[0]
            emitted_stats = {k: v for k, v in self.stats.items() if k in ("rows", "tokens", "loss_tokens")}
            return {"upstream": head.upstream, "skip_rows": head.emitted, "prep_stats": head.stats,
                    "emit_stats": emitted_stats, "done": False}
        return {"upstream": _upstream_state(self.upstream), "skip_rows": 0, "prep_stats": dict(self.stats),
                "emit_stats": {k: self.stats[k] for k in ("rows", "tokens", "loss_tokens")}, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.upstream.load_state_dict(copy.deepcopy(state["upstream"]))
        self._samples = iter(self.upstream)
        self.pending, self.done = [], state["done"]
        self.stats = dict(state["prep_stats"])
        if state["skip_rows"]:
            self._refill()  # rebuild the buffer that was being emitted, then drop the rows already emitted
            self.pending[0].emitted = state["skip_rows"]
        self.stats.update(state["emit_stats"])

"""Weighted, seeded mixing of several record sources by token fraction, resumable exactly.

Each step draws a source at random (seeded) with probability proportional to weight / mean item length, so the
expected share of *tokens* from source i is its weight (not its share of records). Lengths are measured on the
encoded item (`count(encode(record))`), so mixing by token fraction costs no second tokenisation.

`state_dict()` holds the RNG state and, per source, its epoch and read position; `load_state_dict()` re-opens each
source and skips to that position, so a resumed run yields exactly the items the uninterrupted run would have.
(Skipping re-reads the skipped records, so a shared SkipCounter counts their bad rows a second time.)
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from angelmed.data.records import Conversation, Document, PromptRecord


@dataclass
class MixSource:
    name: str
    open: Callable[[], Iterable[Any]]  # called for every epoch and on resume; must yield the same order each time
    weight: float
    repeat: bool = True  # start a new epoch when exhausted (else the source leaves the mix)


def default_count(item: Any) -> int:
    """Size of an item in tokens (encoded items) or characters (raw records)."""
    if isinstance(item, tuple):  # (ids, loss_mask) from encode_chat
        return len(item[0])
    if isinstance(item, Document):
        return len(item.text)
    if isinstance(item, (Conversation, PromptRecord)):
        return sum(len(m.get("content") or "") + len(m.get("reasoning_content") or "") for m in item.messages)
    return len(item)


class WeightedMix:
    """Iterator over `encode(record)` items drawn from weighted sources."""

    def __init__(self, sources: list[MixSource], seed: int = 0, encode: Callable[[Any], Any] | None = None,
                 count: Callable[[Any], int] = default_count):
        if not sources:
            raise ValueError("WeightedMix needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for s in sources:
            if not s.weight > 0:
                raise ValueError(f"source {s.name!r}: weight must be > 0, got {s.weight}")
        self.sources = {s.name: s for s in sources}
        total = sum(s.weight for s in sources)
        self.weights = {s.name: s.weight / total for s in sources}
        self.encode = encode or (lambda r: r)
        self.count = count
        self.seed = seed
        self.rng = random.Random(seed)
        self.pos = {n: {"epoch": 0, "position": 0, "items": 0, "tokens": 0} for n in names}
        self.exhausted: set[str] = set()
        self._iters: dict[str, Iterator[Any]] = {}
        self.last_source: str | None = None

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> "WeightedMix":
        return self

    def _mean_len(self, name: str) -> float:
        p = self.pos[name]
        if p["items"]:
            return p["tokens"] / p["items"]
        seen = [q["tokens"] / q["items"] for q in self.pos.values() if q["items"]]
        return sum(seen) / len(seen) if seen else 1.0  # prior until the source has been sampled

    def _choose(self) -> str:
        active = [n for n in self.sources if n not in self.exhausted]
        scores = [self.weights[n] / max(self._mean_len(n), 1e-9) for n in active]
        return self.rng.choices(active, weights=scores, k=1)[0]

    def _iterator(self, name: str) -> Iterator[Any]:
        if name not in self._iters:
            it = iter(self.sources[name].open())
            skip = self.pos[name]["position"]
            if skip:  # resume: re-read and discard what the saved run had already consumed this epoch
                consumed = sum(1 for _ in itertools.islice(it, skip))
                if consumed < skip:
                    raise RuntimeError(f"source {name!r} has only {consumed} records, but the saved state is at "
                                       f"position {skip}: did the data change since the checkpoint?")
            self._iters[name] = it
        return self._iters[name]

    def _pull(self, name: str) -> Any | None:
        p = self.pos[name]
        for _ in range(2):
            try:
                record = next(self._iterator(name))
                p["position"] += 1
                return record
            except StopIteration:
                del self._iters[name]
                if p["position"] == 0:
                    raise RuntimeError(f"source {name!r} yielded no records") from None
                if not self.sources[name].repeat:
                    self.exhausted.add(name)
                    return None
                p["epoch"] += 1
                p["position"] = 0
        raise AssertionError("unreachable")

    def __next__(self) -> Any:
        while len(self.exhausted) < len(self.sources):
            name = self._choose()
            record = self._pull(name)
            if record is None:
                continue
            item = self.encode(record)
            p = self.pos[name]
            p["items"] += 1
            p["tokens"] += self.count(item)
            self.last_source = name
            return item
        raise StopIteration

    # ------------------------------------------------------------ bookkeeping

    def token_fractions(self) -> dict[str, float]:
        total = sum(p["tokens"] for p in self.pos.values()) or 1
        return {n: p["tokens"] / total for n, p in self.pos.items()}

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"seed": self.seed, "rng": [version, list(internal), gauss],
                "sources": {n: dict(p) for n, p in self.pos.items()}, "exhausted": sorted(self.exhausted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.sources) ^ set(state["sources"])
        if missing:
            raise ValueError(f"mix state does not match the configured sources (differ in {sorted(missing)})")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pos = {n: dict(p) for n, p in state["sources"].items()}
        self.exhausted = set(state["exhausted"])
        self._iters = {}  # re-opened lazily at the saved positions


def mix_from_specs(specs: list[tuple[str, float]], role: str, data_root: Path | str | None = None, seed: int = 0,
                   encode: Callable[[Any], Any] | None = None, repeat: bool = True, skips=None) -> WeightedMix:
    """A mix of `open_source` specs with weights (token fractions), e.g. [("medquad", 0.7), ("hpo", 0.3)]."""
    from angelmed.data.sources import open_source

    for spec, _ in specs:  # fail now, not at the first draw, on an unknown or eval-only source
        open_source(spec, role, data_root, skips=skips)
    sources = [MixSource(spec, (lambda s=spec: open_source(s, role, data_root, skips=skips)), w, repeat)
               for spec, w in specs]
    return WeightedMix(sources, seed=seed, encode=encode)

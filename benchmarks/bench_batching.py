"""Continuous batching with mixed reply lengths: dense rows vs rows up to the highest live slot.

Requests end at different times, and the queue refills their slots until it runs dry; after that, free slots open
up among the live ones. A step computes rows [0, n). The engine keeps live rows dense (`Engine._compact`) and n
exact. The baseline is the engine before that change: no compaction, and n rounded up to a power of two. Both
serve the same `--requests` requests on `--slots` slots, greedy, reply lengths drawn uniformly from
[`--min-tokens`, `--max-tokens`] (no stop ids), prompts of 16-128 random tokens; random-init `--preset`, or
`--model DIR`. Outputs are asserted identical. Reports tok/s, the rows computed and the share of them that were
free, for the baseline, for exact n alone and for both.

    python benchmarks/bench_batching.py [--preset small] [--model DIR] [--slots 32] [--requests 96] [--draft-k 0]

`--draft-k k` runs both with the target as its own LM draft (k tokens per round), to show speculative rounds
benefit too. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from _common import setup  # noqa: E402  (tcmalloc re-exec, threads)

setup(1)

import torch  # noqa: E402

from angelmed.config import get_preset  # noqa: E402
from angelmed.infer.engine import Engine, GenerationRequest  # noqa: E402
from angelmed.infer.speculative import LMDrafter  # noqa: E402
from angelmed.model import Transformer  # noqa: E402


def power_of_two(n: int, limit: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, limit)


class Sparse(Engine):
    """The baseline: finished rows leave holes; with `pow2`, a step runs rows up to the next power of two."""

    def __init__(self, *a, pow2: bool, **k):
        super().__init__(*a, **k)
        self.pow2 = pow2

    def _compact(self) -> None:
        pass

    def active_prefix(self) -> int:
        n = super().active_prefix()
        return power_of_two(n, self.max_batch) if self.pow2 else n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: random-init preset)")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-k", type=int, default=0, help="speculate with the target as its own draft")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.model:
        from angelmed.checkpoint import load_model
        model, source = load_model(args.model, dtype="float32").eval(), args.model
    else:
        model, source = Transformer(get_preset(args.preset)).init_weights(0).eval(), f"{args.preset} (random init)"
    rng = random.Random(0)
    V = model.config.vocab_size
    reqs = [([rng.randrange(V) for _ in range(rng.randint(16, 128))], rng.randint(args.min_tokens, args.max_tokens))
            for _ in range(args.requests)]
    max_len = max(len(p) + n for p, n in reqs) + 1

    def engine(kind: str) -> Engine:
        kw = dict(max_batch=args.slots, max_seq_len=max_len, prefix_reuse=False,
                  draft=LMDrafter(model) if args.draft_k else None, spec_tokens=args.draft_k or 3)
        return Engine(model, **kw) if kind == "dense" else Sparse(model, pow2=kind == "baseline", **kw)

    engines = {kind: engine(kind) for kind in ("baseline", "exact_n", "dense")}
    rows = {}
    for kind, eng in engines.items():  # count the rows each step computes
        def counted(real=eng.active_prefix, kind=kind) -> int:
            n = real()
            rows[kind] = rows.get(kind, 0) + n
            return n
        eng.active_prefix = counted

    def measure(eng: Engine):
        t = time.perf_counter()
        res = eng.generate([GenerationRequest(p, max_tokens=n, stop_ids=[]) for p, n in reqs])
        return [r.token_ids for r in res], sum(n for _, n in reqs) / (time.perf_counter() - t)

    best, outs = {}, {}
    with torch.no_grad():
        for eng in engines.values():
            measure(eng)  # warm-up
        for _ in range(args.repeats):  # alternate, keep the best of each (other processes share the CPU)
            rows.clear()
            for kind, eng in engines.items():
                outs[kind], tps = measure(eng)
                best[kind] = max(best.get(kind, 0.0), tps)
    assert outs["baseline"] == outs["exact_n"] == outs["dense"], "outputs differ between the batching policies"
    live = sum(n for _, n in reqs) if not args.draft_k else None  # decode rows with a live request (plain)
    out = {"model": source, "slots": args.slots, "requests": args.requests, "draft_k": args.draft_k,
           "reply_tokens": [args.min_tokens, args.max_tokens], "results": {}}
    print(f"{source}: {args.requests} requests on {args.slots} slots, replies of {args.min_tokens}-{args.max_tokens} "
          f"tokens" + (f", self-draft k={args.draft_k}" if args.draft_k else ""))
    for kind in engines:
        r = {"tok_s": round(best[kind], 1), "rows_computed": rows[kind],
             "speedup_vs_baseline": round(best[kind] / best["baseline"], 3)}
        if live is not None:  # each reply's first token comes from the prefill
            r["free_row_share"] = round(1 - (live - args.requests) / rows[kind], 3)
        out["results"][kind] = r
        print(f"{kind:>9}: {r['tok_s']:8.1f} tok/s  x{r['speedup_vs_baseline']:.2f}  rows computed {rows[kind]:6d}"
              + (f"  ({r['free_row_share']:.0%} free)" if live is not None else ""))
    out["speedup"] = out["results"]["dense"]["speedup_vs_baseline"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""How long `serve --compile` takes to get ready, and whether a request ever waits for a compile afterwards.

    python benchmarks/bench_compile.py [--preset small] [--layers N] [--max-batch 16] [--draft] [--dtype bfloat16]

Each start is a fresh process on a random model of the preset: Engine(compile=True), warm_up() (which compiles
every graph a batch of up to --max-batch rows can need), then a sweep that a server could meet: every batch size from
1 to --max-batch, at prompt lengths whose caches cross every length step, timing each request and counting the
graphs compiled during the sweep (goal: none). The first start gets an empty kernel cache, the second the cache the
first one left (what a restarted server finds in ~/.cache/angelmed/inductor); the cold start is the baseline.
`--draft` serves with the model's own MTP layer drafting (speculative rounds, one graph per round).

Last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from _common import emit, setup


def child(args) -> dict:
    from torch._dynamo.utils import counters

    from angelmed.config import get_preset
    from angelmed.infer.engine import Engine, GenerationRequest
    from angelmed.infer.speculative import MTPDrafter
    from angelmed.model import Transformer

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    model = Transformer(cfg).to(getattr(torch, args.dtype)).eval()
    eng = Engine(model, max_batch=args.max_batch, max_seq_len=args.max_seq_len, compile=True, prefix_reuse=False,
                 draft=MTPDrafter(model) if args.draft else None)
    warm_s = eng.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(1)
    lengths = range(8, args.max_seq_len - args.new_tokens - 8, 64)  # each a new cache-length step
    slowest, t0 = 0.0, time.perf_counter()
    for rows in range(1, args.max_batch + 1):
        for n in lengths:
            reqs = [GenerationRequest(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(),
                                      max_tokens=args.new_tokens, stop_ids=[]) for _ in range(rows)]
            t = time.perf_counter()
            eng.generate(reqs)
            slowest = max(slowest, time.perf_counter() - t)
    return {"warm_up_s": round(warm_s, 1), "graphs": graphs, "graph_rows": eng.graph_rows(),
            "sweep_requests": args.max_batch * len(lengths), "sweep_s": round(time.perf_counter() - t0, 1),
            "sweep_compiles": counters["stats"]["unique_graphs"] - graphs, "slowest_sweep_request_s": round(slowest, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=320)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--draft", action="store_true", help="speculative rounds drafted by the model's MTP layer")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="angelmed-bench-compile-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = {}
        for name in ("cold", "cached"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[name] = {**json.loads(out.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - t, 1)}
            print(f"{name:6s} {runs[name]}", flush=True)
    result = {"preset": args.preset, "layers": args.layers, "max_batch": args.max_batch, "draft": args.draft,
              "dtype": args.dtype, "threads": args.threads, **{f"{k}_{n}": v for n, r in runs.items()
                                                               for k, v in r.items()},
              "warm_up_speedup_from_cache": round(runs["cold"]["warm_up_s"] / runs["cached"]["warm_up_s"], 2)}
    emit(result)


if __name__ == "__main__":
    main()

"""A long prompt through the engine: prefill in chunks of `max_prefill_tokens` (the default, 8192) vs the whole
prompt in one forward. Each setting runs in its own process, so its peak resident memory is its own; both must
give the same greedy tokens. Also: a stream already decoding when the long prompt arrives, and the longest it
waits between two tokens (chunks run one per engine step, between its decode steps).

    python benchmarks/bench_long_prompt.py [--preset small] [--prompt-len 16000] [--chunk 8192] [--threads 1]

Last line: one JSON object (seconds and peak RSS growth of both, and the ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import emit, setup


def child(preset: str, T: int, budget: int) -> dict:
    import torch

    from angelmed.config import get_preset
    from angelmed.infer.engine import Engine, GenerationRequest
    from angelmed.model import Transformer

    cfg = get_preset(preset).replace(max_position_embeddings=T + 64)
    model = Transformer(cfg).init_weights(0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    eng = Engine(model, max_batch=1, max_seq_len=T + 16, max_prefill_tokens=budget)
    t = time.perf_counter()
    with torch.no_grad():
        res = eng.generate([GenerationRequest(prompt, max_tokens=4, stop_ids=[])])[0]
    out = {"seconds": round(time.perf_counter() - t, 2), "tokens": res.token_ids,
           "peak_rss_gib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20, 3)}
    # a stream already decoding when the long prompt arrives: the longest wait between two of its tokens
    eng = Engine(model, max_batch=2, max_seq_len=T + 16, max_prefill_tokens=budget)
    stamps: list[float] = []
    with torch.no_grad():
        eng.submit(GenerationRequest(prompt[:32], max_tokens=64, stop_ids=[]),
                   lambda d: stamps.extend([time.perf_counter()] * len(d.token_ids)))
        for _ in range(5):
            eng.step()
        long = eng.submit(GenerationRequest(prompt, max_tokens=1, stop_ids=[]))
        while not long.done():
            eng.step()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return out | {"stream_max_gap_s": round(max(gaps), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=16000)
    ap.add_argument("--chunk", type=int, default=8192, help="max_prefill_tokens of the chunked run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.preset, args.prompt_len, args.child)))
        return
    runs = {}
    for name, budget in (("chunked", args.chunk), ("one_forward", args.prompt_len)):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--prompt-len", str(args.prompt_len),
               "--threads", str(args.threads), "--child", str(budget)]
        runs[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"{name:>11}: {runs[name]['seconds']:6.1f} s, peak RSS +{runs[name]['peak_rss_gib']:.2f} GiB; a stream "
              f"decoding beside it waits at most {runs[name]['stream_max_gap_s']:.2f} s for a token", flush=True)
    assert runs["chunked"]["tokens"] == runs["one_forward"]["tokens"], "chunked prefill changed the greedy tokens"
    c, o = runs["chunked"], runs["one_forward"]
    emit({"preset": args.preset, "prompt_len": args.prompt_len, "chunk": args.chunk, "threads": args.threads,
          **runs, "speedup": round(o["seconds"] / c["seconds"], 3),
          "memory_ratio": round(o["peak_rss_gib"] / c["peak_rss_gib"], 3),
          "stream_gap_ratio": round(o["stream_max_gap_s"] / c["stream_max_gap_s"], 3)})


if __name__ == "__main__":
    main()

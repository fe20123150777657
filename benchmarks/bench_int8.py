"""Int8 weight-only vs BF16 serving: weight bytes, engine decode speed (eager and compiled), and the error.

The same weights run as BF16 and quantised with `angelmed.infer.int8.quantize_int8_` (what `serve --quantize
int8` does). Speed: the serving engine, greedy, `--new-tokens` per request at each batch size, best of `--reps`.
Load: peak memory growth of loading a BF16 checkpoint into int8, streamed (`load_int8`) vs load-then-quantise.
Error, on held-out-style text through a full forward: next-token agreement (argmax) with BF16 and the mean
|log p_int8 - log p_bf16| of the BF16 argmax token. A trained model (`--model DIR`, e.g. the speedrun's) makes the
error meaningful; without one, random-init presets measure speed only (their near-uniform logits flip easily).

    python benchmarks/bench_int8.py [--presets small base-100m] [--model DIR] [--batches 1 4 16]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from _common import setup
from angelmed.config import get_preset
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.int8 import quantize_int8_
from angelmed.infer.quant import resident_weight_bytes
from angelmed.model import Transformer


def tok_s(model, prompts, new_tokens: int, reps: int, compile: bool) -> float:
    eng = Engine(model, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens + 8, compile=compile,
                 prefix_reuse=False)
    reqs = lambda: [GenerationRequest(p, max_tokens=new_tokens, stop_ids=[]) for p in prompts]  # noqa: E731
    eng.generate(reqs())
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        eng.generate(reqs())
        best = min(best, time.perf_counter() - t)
    return len(prompts) * new_tokens / best


@torch.no_grad()
def error(ref, quant, ids) -> dict:
    lr, lq = ref(ids).logits.float().log_softmax(-1), quant(ids).logits.float().log_softmax(-1)
    top = lr.argmax(-1)
    return {"argmax_agreement": float((lq.argmax(-1) == top).float().mean()),
            "mean_abs_logprob_diff_of_top": float((lr.gather(-1, top[..., None]) - lq.gather(-1, top[..., None]))
                                                  .abs().mean())}


LOAD_PEAK = """
import re, sys, threading, time, torch
from angelmed.checkpoint import load_model
from angelmed.infer.int8 import load_int8, quantize_int8_
def anon():  # anonymous resident memory (the mapped checkpoint's clean file pages are not counted)
    return int(re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before, peak, done = anon(), [0], False
def watch():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
t = threading.Thread(target=watch)
t.start()
model = load_int8(sys.argv[1]) if sys.argv[2] == "stream" else quantize_int8_(load_model(sys.argv[1]))
done = True
t.join()
print(max(peak[0], anon()) - before)
"""


def load_peak_bytes(model: Transformer) -> dict:
    """Peak anonymous memory growth (sampled) of loading a BF16 checkpoint into int8: streamed vs load-then-quantise,
    each in a fresh process."""
    import subprocess
    import sys
    import tempfile

    from angelmed.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(model, f"{d}/m", dtype="bfloat16")
        out = {}
        for how in ("stream", "load_then_quantize"):
            r = subprocess.run([sys.executable, "-c", LOAD_PEAK, f"{d}/m", how], capture_output=True, text=True,
                               check=True)
            out[how] = int(r.stdout.strip().splitlines()[-1])
    return {"load_peak_bytes_streamed": out["stream"], "load_peak_bytes_load_then_quantize": out["load_then_quantize"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base-100m"])
    ap.add_argument("--model", default=None, help="a trained checkpoint directory (replaces --presets)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup(args.threads)
    runs = []
    targets = [("model", args.model)] if args.model else [("preset", p) for p in args.presets]
    for kind, name in targets:
        if kind == "model":
            from angelmed.checkpoint import load_model

            base = load_model(name, dtype="bfloat16")
        else:
            base = Transformer(get_preset(name)).init_weights(0).eval().to(torch.bfloat16)
        quant = quantize_int8_(copy.deepcopy(base))
        V = base.config.vocab_size
        g = torch.Generator().manual_seed(0)
        row = {"model": name, "weight_bytes_bf16": resident_weight_bytes(base)["total"],
               "weight_bytes_int8": resident_weight_bytes(quant)["total"]}
        row["bytes_ratio"] = round(row["weight_bytes_int8"] / row["weight_bytes_bf16"], 3)
        if kind == "model":
            row.update(error(base, quant, torch.randint(0, V, (4, 128), generator=g)))
        row.update(load_peak_bytes(base))
        print(f"[{name}] loading into int8: peak memory growth {row['load_peak_bytes_streamed'] / 2**20:.0f} MiB "
              f"streamed vs {row['load_peak_bytes_load_then_quantize'] / 2**20:.0f} MiB load-then-quantise",
              flush=True)
        print(f"[{name}] weights {row['weight_bytes_bf16'] / 2**20:.1f} MiB bf16 -> "
              f"{row['weight_bytes_int8'] / 2**20:.1f} MiB int8 (x{row['bytes_ratio']})" +
              (f"; argmax agreement {row['argmax_agreement']:.3f}, mean |d log p| "
               f"{row['mean_abs_logprob_diff_of_top']:.4f}" if kind == "model" else ""), flush=True)
        row["speed"] = []
        for B in args.batches:
            prompts = torch.randint(0, V, (B, args.prompt_len), generator=g).tolist()
            r = {"batch": B}
            for compile in (False, True):
                tag = "compiled" if compile else "eager"
                bf = tok_s(base, prompts, args.new_tokens, args.reps, compile)
                i8 = tok_s(quant, prompts, args.new_tokens, args.reps, compile)
                r.update({f"bf16_{tag}_tok_s": round(bf, 1), f"int8_{tag}_tok_s": round(i8, 1),
                          f"speedup_{tag}": round(i8 / bf, 2)})
                print(f"[{name}] batch {B:>2} {tag:>8}: bf16 {bf:8.1f} tok/s, int8 {i8:8.1f} tok/s (x{i8 / bf:.2f})",
                      flush=True)
            row["speed"].append(r)
        runs.append(row)
    print(json.dumps({"threads": torch.get_num_threads(), "runs": runs}))


if __name__ == "__main__":
    main()

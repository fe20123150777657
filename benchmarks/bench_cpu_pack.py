"""bf16 on CPU: weights packed once into oneDNN's blocked layout (angelmed/infer/cpu_pack.py) vs plain weights.

Two measurements, each against its baseline in the same run:
1. One GEMM, x [rows, 512] @ W.T with W [6144, 512] bf16 (eight copies, so that no weight is in cache when it is
   read): plain `F.linear` against the packed copy, at 1, 16, 64 and 512 rows; the results must be bit-identical.
2. The serving engine, greedy decoding of `--new-tokens` per request (the timing includes the prompt's prefill),
   eager and compiled, on a model that packs when the engine starts against a copy of it that does not. The two
   alternate, best of `--reps`. Also the bytes the packed copies add.

    python benchmarks/bench_cpu_pack.py [--presets small base-100m] [--batches 1 16]

Needs a CPU whose oneDNN multiplies bf16 (AVX512-BF16 or AMX). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from _common import add_decode_workload_args, setup
from angelmed.config import get_preset
from angelmed.infer import cpu_pack
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.model import Packed, Transformer


def gemm_rates(rows_list: list[int], n: int = 6144, k: int = 512, copies: int = 8, reps: int = 30) -> list[dict]:
    ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    packed = [Packed(w) for w in ws]
    out = []
    for rows in rows_list:
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        assert torch.equal(packed[0](x), F.linear(x, ws[0])), "packed GEMM differs from the plain one"
        row = {"rows": rows}
        for name, fn in (("plain", lambda i: F.linear(x, ws[i % copies])), ("packed", lambda i: packed[i % copies](x))):
            for i in range(copies):
                fn(i)
            t = time.perf_counter()
            for i in range(reps):
                fn(i)
            row[f"{name}_GBps"] = round(n * k * 2 * reps / (time.perf_counter() - t) / 1e9, 2)
        row["speedup"] = round(row["packed_GBps"] / row["plain_GBps"], 2)
        print(f"GEMM {rows:>3} rows x [{n}, {k}]: plain {row['plain_GBps']:6.2f} GB/s, packed "
              f"{row['packed_GBps']:6.2f} GB/s (x{row['speedup']:.2f})")
        out.append(row)
    return out


def engine_tok_s(engines: dict[str, Engine], prompts, new_tokens: int, reps: int) -> dict[str, float]:
    reqs = lambda: [GenerationRequest(p, max_tokens=new_tokens, stop_ids=[]) for p in prompts]  # noqa: E731
    for eng in engines.values():
        eng.generate(reqs())  # warm-up (and compilation)
    best = {name: float("inf") for name in engines}
    for _ in range(reps):  # alternating: other processes share the CPU
        for name, eng in engines.items():
            t = time.perf_counter()
            eng.generate(reqs())
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: len(prompts) * new_tokens / s for name, s in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_workload_args(ap, reps=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup(args.threads)
    plain_probe = Transformer(get_preset("tiny")).to(torch.bfloat16)
    if not cpu_pack.supported(plain_probe):
        raise SystemExit("this CPU's oneDNN does not multiply bf16: nothing to pack")
    results = {"threads": torch.get_num_threads(), "gemm": gemm_rates([1, 16, 64, 512]), "engine": []}
    g = torch.Generator().manual_seed(0)
    for preset in args.presets:
        packed = Transformer(get_preset(preset)).init_weights(0).to(torch.bfloat16).eval()
        plain = copy.deepcopy(packed)
        model_bytes = sum(p.nbytes for p in packed.parameters())
        for B in args.batches:
            prompts = torch.randint(0, packed.config.vocab_size, (B, args.prompt_len), generator=g).tolist()
            row = {"preset": preset, "batch": B, "model_bytes": model_bytes}
            for compile in (False, True):
                kw = dict(max_batch=B, max_seq_len=args.prompt_len + args.new_tokens + 8, compile=compile,
                          prefix_reuse=False)
                eng_packed = Engine(packed, **kw)
                supported, cpu_pack.supported = cpu_pack.supported, lambda m: False
                try:
                    eng_plain = Engine(plain, **kw)
                finally:
                    cpu_pack.supported = supported
                row["packed_bytes"] = eng_packed.packed_bytes
                tps = engine_tok_s({"plain": eng_plain, "packed": eng_packed}, prompts, args.new_tokens, args.reps)
                tag = "compiled" if compile else "eager"
                row.update({f"{tag}_plain_tok_s": round(tps["plain"], 1),
                            f"{tag}_packed_tok_s": round(tps["packed"], 1),
                            f"{tag}_speedup": round(tps["packed"] / tps["plain"], 2)})
                print(f"[{preset}] batch {B:>2} {tag:>8}: plain {tps['plain']:8.1f} tok/s, packed "
                      f"{tps['packed']:8.1f} tok/s (x{tps['packed'] / tps['plain']:.2f})")
            print(f"[{preset}] packed copies add {row['packed_bytes'] / 1e6:.1f} MB to {model_bytes / 1e6:.1f} MB")
            results["engine"].append(row)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""bf16-stored matrices with fp32 arithmetic vs fp32 weights, on a CPU that only emulates bf16: weight bytes and
engine decode speed (eager and compiled), with the greedy tokens asserted identical.

A bf16 checkpoint on such a CPU runs in fp32 (`cpu_pack.inference_dtype`: emulated bf16 GEMMs are several times
slower); `cpu_kernels.store_bf16_` then puts its matrices (linear weights, head, experts) back in bf16, which the
few-rows kernel widens to fp32 as it reads them (what `serve` and `eval` do). Both sides here hold the same values:
a preset's random weights rounded to bf16. Speed: the serving engine, greedy, `--new-tokens` after a
`--prompt-len` prompt per row at each batch size; the two engines alternate, best of `--reps` each.

    python benchmarks/bench_bf16_storage.py [--presets small base-100m] [--batches 1 16] [--no-compile]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from _common import add_decode_workload_args, setup
from angelmed import cpu_kernels
from angelmed.config import get_preset
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.quant import resident_weight_bytes
from angelmed.model import Transformer


def alternate(models: dict, prompts, new_tokens: int, reps: int, compile: bool) -> tuple[dict, dict]:
    """tok/s of each model's engine (runs alternating, best of reps) and its greedy tokens."""
    engines = {name: Engine(m, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens + 8,
                            compile=compile, prefix_reuse=False) for name, m in models.items()}
    reqs = lambda: [GenerationRequest(p, max_tokens=new_tokens, stop_ids=[]) for p in prompts]  # noqa: E731
    tokens = {name: [r.token_ids for r in eng.generate(reqs())] for name, eng in engines.items()}  # + compile
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(reps):
        for name, eng in engines.items():
            t = time.perf_counter()
            eng.generate(reqs())
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: len(prompts) * new_tokens / t for name, t in best.items()}, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_workload_args(ap, reps=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="eager engines only")
    args = ap.parse_args()
    setup(args.threads)
    runs = []
    for preset in args.presets:
        cfg = get_preset(preset)
        fp32 = Transformer(cfg).init_weights(0).eval().bfloat16().float()  # a bf16 checkpoint loaded in fp32
        stored = copy.deepcopy(fp32)
        if not cpu_kernels.store_bf16_(stored):
            raise SystemExit("the few-rows kernel did not build (see the warning): nothing to compare")
        bytes32, bytes16 = resident_weight_bytes(fp32)["total"], resident_weight_bytes(stored)["total"]
        print(f"[{preset}] weights: fp32 {bytes32 / 1e6:.1f} MB, bf16-stored {bytes16 / 1e6:.1f} MB "
              f"({bytes16 / bytes32:.2f}x)")
        g = torch.Generator().manual_seed(0)
        for B in args.batches:
            prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            for compile in (False,) if args.no_compile else (False, True):
                speed, tokens = alternate({"fp32": fp32, "bf16_stored": stored}, prompts, args.new_tokens,
                                          args.reps, compile)
                assert tokens["fp32"] == tokens["bf16_stored"], "greedy tokens differ"
                row = {"preset": preset, "batch": B, "compiled": compile, "weight_bytes_fp32": bytes32,
                       "weight_bytes_bf16_stored": bytes16, "fp32_tok_s": round(speed["fp32"], 1),
                       "bf16_stored_tok_s": round(speed["bf16_stored"], 1),
                       "speedup": round(speed["bf16_stored"] / speed["fp32"], 2), "tokens_identical": True}
                runs.append(row)
                print(f"[{preset}] batch {B:>2} {'compiled' if compile else 'eager   '}: fp32 {speed['fp32']:8.1f} "
                      f"tok/s | bf16-stored {speed['bf16_stored']:8.1f} tok/s (x{row['speedup']:.2f}); "
                      "tokens identical")
    print(json.dumps({"threads": torch.get_num_threads(), "runs": runs}))


if __name__ == "__main__":
    main()

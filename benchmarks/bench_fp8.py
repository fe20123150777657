"""Weight bytes and decode speed: bf16 vs FP8 dequantised at load vs FP8 resident.

For each preset: random-init the model (fp32 masters), write a block-FP8 checkpoint the way the official
converter does (save_model(fp8=True)), then load it both ways; the bf16 baseline is the masters cast
to bf16. Decode = greedy single-token steps with a KV cache after a prompt, timed after warm-up.

    PYTHONPATH=$PWD python benchmarks/bench_fp8.py --presets small base-100m

Last line of output: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from angelmed.checkpoint import load_model, save_model
from angelmed.config import get_preset
from angelmed.infer.generate import decode_one, prefill
from angelmed.infer.quant import load_fp8_resident, resident_weight_bytes
from angelmed.model import Transformer


@torch.no_grad()
def decode_tokens_per_s(model: Transformer, batch: int, prompt: int, steps: int, warmup: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen)
    caches = model.make_caches(batch, prompt + warmup + steps)
    tok = prefill(model, ids, caches).argmax(-1)
    pos = torch.full((batch,), prompt)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        tok = decode_one(model, tok, pos, caches).argmax(-1)
        pos = pos + 1
    return batch * steps / (time.perf_counter() - t0)


def bench_preset(name: str, args) -> dict:
    cfg = get_preset(name)
    master = Transformer(cfg).init_weights(args.seed).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "fp8"
        save_model(master, ckpt, fp8=True)
        variants = {
            "bf16": lambda: master.to(torch.bfloat16),
            "fp8_dequant_at_load": lambda: load_model(ckpt, args.dtype),
            "fp8_resident": lambda: load_fp8_resident(ckpt, args.dtype),
        }
        out: dict = {"preset": name, "params": cfg.param_counts()["total"], "dtype": args.dtype}
        for vname, make in variants.items():
            t0 = time.perf_counter()
            model = make()
            load_s = time.perf_counter() - t0
            b = resident_weight_bytes(model)
            tps = decode_tokens_per_s(model, args.batch, args.prompt, args.steps, args.warmup, args.seed)
            out[vname] = {"weight_bytes": b["total"], "fp8_bytes": b["fp8"] + b["fp8_scales"],
                          "load_s": round(load_s, 3), "decode_tok_s": round(tps, 2)}
            print(f"{name:>10} {vname:>20}: weights {b['total'] / 2**20:8.2f} MiB "
                  f"(fp8+scales {(b['fp8'] + b['fp8_scales']) / 2**20:7.2f} MiB)  load {load_s:6.2f} s  "
                  f"decode {tps:8.1f} tok/s", flush=True)
            del model
    base = out["bf16"]
    for vname in ("fp8_dequant_at_load", "fp8_resident"):
        out[vname]["bytes_vs_bf16"] = round(out[vname]["weight_bytes"] / base["weight_bytes"], 4)
        out[vname]["speed_vs_bf16"] = round(out[vname]["decode_tok_s"] / base["decode_tok_s"], 3)
    print(f"{name:>10} resident/bf16 bytes {out['fp8_resident']['bytes_vs_bf16']:.3f}, "
          f"speed {out['fp8_resident']['speed_vs_bf16']:.3f}x; dequant-at-load speed "
          f"{out['fp8_dequant_at_load']['speed_vs_bf16']:.3f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype of the FP8 variants (the baseline is always bf16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench_preset(name, args) for name in args.presets]
    print(json.dumps({"bench": "fp8", "threads": torch.get_num_threads(), "device": "cpu", "batch": args.batch,
                      "prompt": args.prompt, "steps": args.steps, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill and single-step decode throughput: angelmed vs transformers Glm4MoeForCausalLM, same weights.

    python benchmarks/bench_forward.py [--presets small base-100m] [--prefill-len 256] [--batch 4]
Last line: JSON with tokens/s of both and the ratios.
"""

from __future__ import annotations

import argparse

import torch

from _common import assert_same_logits, emit, hf_peer, setup, timed
from angelmed.config import get_preset
from angelmed.infer.generate import decode_one, prefill
from angelmed.model import Transformer


def bench(preset: str, batch: int, prefill_len: int, decode_ctx: int, steps: int) -> dict:
    cfg = get_preset(preset)
    model = Transformer(cfg).init_weights(0).eval()
    peer = hf_peer(model)
    diff = assert_same_logits(model, peer, cfg.vocab_size)
    ids = torch.randint(0, cfg.vocab_size, (batch, prefill_len), generator=torch.Generator().manual_seed(1))

    def ours_prefill():
        with torch.no_grad():
            model(ids)

    def hf_prefill():
        with torch.no_grad():
            peer(ids, use_cache=False)

    t_ours, t_hf = timed(ours_prefill), timed(hf_prefill)
    prefill_tok = batch * prefill_len

    # single-step decode at batch 1 with `decode_ctx` cached tokens
    ctx = ids[:1, :decode_ctx]
    caches = model.make_caches(1, decode_ctx + steps + 1)
    logits = prefill(model, ctx, caches)
    tok = logits.argmax(-1)

    def ours_decode():
        nonlocal tok
        for i in range(steps):
            tok = decode_one(model, tok, torch.tensor([decode_ctx + i]), caches).argmax(-1)

    from transformers import DynamicCache

    def hf_decode():
        cache = DynamicCache()
        with torch.no_grad():
            out = peer(ctx, past_key_values=cache, use_cache=True)
            t = out.logits[:, -1].argmax(-1, keepdim=True)
            start = __import__("time").perf_counter()
            for _ in range(steps):
                out = peer(t, past_key_values=out.past_key_values, use_cache=True)
                t = out.logits[:, -1].argmax(-1, keepdim=True)
            return __import__("time").perf_counter() - start

    d_ours = timed(ours_decode, warmup=1, repeat=3)
    d_hf = min(hf_decode() for _ in range(3))
    return {
        "preset": preset, "logits_max_diff_vs_hf": diff,
        "prefill_tok_s": prefill_tok / t_ours, "prefill_tok_s_hf": prefill_tok / t_hf,
        "prefill_ratio": t_hf / t_ours,
        "decode_tok_s": steps / d_ours, "decode_tok_s_hf": steps / d_hf, "decode_ratio": d_hf / d_ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "base-100m"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--decode-ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    setup()
    results = []
    for p in a.presets:
        r = bench(p, a.batch, a.prefill_len, a.decode_ctx, a.steps)
        print(f"{p:>10}: prefill {r['prefill_tok_s']:9.0f} tok/s vs HF {r['prefill_tok_s_hf']:9.0f} "
              f"({r['prefill_ratio']:.2f}x) | decode {r['decode_tok_s']:7.1f} tok/s vs HF "
              f"{r['decode_tok_s_hf']:7.1f} ({r['decode_ratio']:.2f}x) | max logit diff {r['logits_max_diff_vs_hf']:.1e}")
        results.append(r)
    emit({"benchmark": "forward", "threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()

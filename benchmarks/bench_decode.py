"""Decode throughput of the angelmed engine vs transformers `generate` on the same weights.

The baseline is transformers' Glm4MoeForCausalLM (same architecture family: sigmoid router with correction bias,
grouped top-k, routed scaling, shared expert, partial NeoX RoPE, QK-norm) loaded with our weights; logits are
checked to agree first. Also measures the machine's copy bandwidth and reports, at every batch size, the fraction
of the bandwidth ceiling (batch x bandwidth / bytes that one decode step must read).

    python benchmarks/bench_decode.py [--presets small base-100m] [--batches 1 16] [--new-tokens 32]

The engine runs eager and with `compile=True` (the decode step as one inductor graph, launched from a C++
wrapper). Both sides' timings include the prompt's prefill. A step streams the weights it touches from
memory: the active ones at batch 1, nearly every expert at batch 16. At the measured copy bandwidth that gives a
ceiling, and ceiling / transformers' tok/s bounds the speed-up over transformers; the script prints both. The
ceiling is soft where a model's weights partly stay in cache between steps (base-100m in fp32, 103 MB, has decoded
at 106% of it on a CPU with a 480 MB L3).

Last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _common import add_decode_workload_args, copy_bandwidth, hf_peer, setup
from angelmed.config import ModelConfig, get_preset
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.model import Transformer
from angelmed.tcmalloc import LIB as TCMALLOC


def decode_bytes_per_step(cfg: ModelConfig, ctx: int, batch: int = 1, bytes_per: int = 4) -> float:
    """Bytes one decode step of `batch` rows must read: the weights it touches (the embedding rows, the whole
    lm_head, every expert some row routes to) and the KV cache. The experts touched by `batch` tokens are the
    expectation under uniform routing, E (1 - (1 - k/E)^batch): k at batch 1, nearly all E at batch 16."""
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    touched = E * (1 - (1 - k / E) ** batch)
    active = cfg.param_counts()["active"] - cfg.vocab_size * cfg.hidden_size + batch * cfg.hidden_size
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx * batch
    return (active + moe_layers * (touched - k) * expert + kv) * bytes_per


def time_engine(model, prompts, new_tokens: int, reps: int, compile: bool = False) -> float:
    # no prefix reuse: transformers prefills every run, so the engine does too
    eng = Engine(model, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens + 8, compile=compile,
                 prefix_reuse=False)
    reqs = lambda: [GenerationRequest(p, max_tokens=new_tokens, stop_ids=[]) for p in prompts]  # noqa: E731
    eng.generate(reqs())  # warm-up (and compilation)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        res = eng.generate(reqs())
        best = min(best, time.perf_counter() - t)
    assert all(len(r.token_ids) == new_tokens for r in res)
    return len(prompts) * new_tokens / best


def time_hf(hf, prompts, new_tokens: int, reps: int) -> float:
    ids = torch.tensor(prompts)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        hf.generate(ids, **kw)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            out = hf.generate(ids, **kw)
            best = min(best, time.perf_counter() - t)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / best


def check_parity(model, hf, ids: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"logits disagree with Glm4MoeForCausalLM: max |diff| = {diff:.3g}")
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_workload_args(ap, reps=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations on both sides (bf16: half the bytes per token)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared few-core machine more threads mostly spin)")
    args = ap.parse_args()
    setup(args.threads)
    bw = copy_bandwidth() / 1e9
    print(f"copy bandwidth: {bw:.1f} GB/s (read+write), torch threads {torch.get_num_threads()}, "
          f"tcmalloc {'on' if TCMALLOC in os.environ.get('LD_PRELOAD', '') else 'off'}")
    results = {"copy_bandwidth_GBps": round(bw, 2), "threads": torch.get_num_threads(), "dtype": args.dtype,
               "runs": []}
    for preset in args.presets:
        cfg = get_preset(preset)
        model = Transformer(cfg).init_weights(0).eval()
        hf = hf_peer(model)
        g = torch.Generator().manual_seed(0)
        diff = check_parity(model, hf, torch.randint(0, cfg.vocab_size, (2, 24), generator=g))
        dtype = getattr(torch, args.dtype)
        model, hf = model.to(dtype), hf.to(dtype)  # parity checked in fp32; the router stays fp32 on our side
        print(f"[{preset}] logits agree with Glm4MoeForCausalLM: max |diff| {diff:.2e}")
        for B in args.batches:
            prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            ours = time_engine(model, prompts, args.new_tokens, args.reps)
            compiled = time_engine(model, prompts, args.new_tokens, args.reps, compile=True)
            theirs = time_hf(hf, prompts, args.new_tokens, args.reps)
            row = {"preset": preset, "batch": B, "engine_tok_s": round(ours, 1),
                   "engine_compiled_tok_s": round(compiled, 1), "hf_generate_tok_s": round(theirs, 1),
                   "speedup": round(ours / theirs, 2), "speedup_compiled": round(compiled / theirs, 2),
                   "logits_max_diff": diff}
            line = (f"[{preset}] batch {B:>2}: engine {ours:8.1f} tok/s (x{ours / theirs:.2f}) | compiled "
                    f"{compiled:8.1f} tok/s (x{compiled / theirs:.2f}) | transformers generate {theirs:8.1f} tok/s")
            # no engine decodes faster than its steps' bytes stream from memory (less what stays in cache): the
            # ceiling also bounds the speed-up over transformers (at batch 16 nearly every expert is read each step)
            need = decode_bytes_per_step(cfg, args.prompt_len + args.new_tokens // 2, B, dtype.itemsize)
            ceiling = B * bw * 1e9 / need
            row.update(bytes_per_step=round(need), ceiling_tok_s=round(ceiling, 1),
                       fraction_of_bandwidth_ceiling=round(ours / ceiling, 3),
                       fraction_of_bandwidth_ceiling_compiled=round(compiled / ceiling, 3),
                       hf_fraction_of_bandwidth_ceiling=round(theirs / ceiling, 3),
                       ceiling_speedup_over_hf=round(ceiling / theirs, 2))
            line += (f"\n    bandwidth ceiling {ceiling:.0f} tok/s ({need / 1e6:.1f} MB per step): engine "
                     f"{ours / ceiling:.1%}, compiled {compiled / ceiling:.1%}, transformers {theirs / ceiling:.1%}; "
                     f"at the ceiling an engine would be x{ceiling / theirs:.2f} transformers")
            results["runs"].append(row)
            print(line)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

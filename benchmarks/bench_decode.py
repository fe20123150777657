"""Decode throughput of the angelmed engine vs transformers `generate` on the same weights.

The baseline is transformers' Glm4MoeForCausalLM (same architecture family: sigmoid router with correction bias,
grouped top-k, routed scaling, shared expert, partial NeoX RoPE, QK-norm) loaded with our weights; logits are
checked to agree first. Also measures the machine's copy bandwidth and reports the batch-1 fraction of the
bandwidth ceiling (bytes that one decode step must read / bandwidth).

    python benchmarks/bench_decode.py [--presets small base-100m] [--batches 1 16] [--new-tokens 32]

Last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def reexec_with_tcmalloc() -> None:
    if os.path.exists(TCMALLOC) and TCMALLOC not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ, LD_PRELOAD=(TCMALLOC + " " + os.environ.get("LD_PRELOAD", "")).strip())
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


reexec_with_tcmalloc()

import torch  # noqa: E402

from angelmed.config import ModelConfig, get_preset  # noqa: E402
from angelmed.infer.engine import Engine, GenerationRequest  # noqa: E402
from angelmed.model import Transformer  # noqa: E402


# ---- our weights in transformers' Glm4Moe ------------------------------------------------------------------
def glm4moe_config(cfg: ModelConfig):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, partial_rotary_factor=cfg.partial_rotary_factor,
        attention_bias=cfg.use_qkv_bias or cfg.use_bias, use_qk_norm=cfg.use_qk_norm,
        moe_intermediate_size=cfg.moe_intermediate_size, num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.num_experts, n_shared_experts=cfg.num_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.num_groups, topk_group=cfg.topk_group or 1,
        first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=True,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_dropout=0.0, pad_token_id=0, eos_token_id=None,
        bos_token_id=None)


def to_glm4moe(model: Transformer):
    """Glm4MoeForCausalLM holding our weights (main layers; MTP layers have no counterpart)."""
    from transformers import Glm4MoeForCausalLM

    cfg = model.config
    hf = Glm4MoeForCausalLM(glm4moe_config(cfg)).eval()
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sd = {"model.embed_tokens.weight": model.model.word_embeddings.weight, "model.norm.weight": model.model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i in range(cfg.num_hidden_layers):
        L, p = model.model.layers[i], f"model.layers.{i}."
        qkv = L.attention.query_key_value.weight  # rows [Q heads | K heads | V heads]
        sd[p + "self_attn.q_proj.weight"] = qkv[:nq * d]
        sd[p + "self_attn.k_proj.weight"] = qkv[nq * d:(nq + nkv) * d]
        sd[p + "self_attn.v_proj.weight"] = qkv[(nq + nkv) * d:]
        sd[p + "self_attn.o_proj.weight"] = L.attention.dense.weight
        if cfg.use_qk_norm:
            sd[p + "self_attn.q_norm.weight"] = L.attention.query_layernorm.weight
            sd[p + "self_attn.k_norm.weight"] = L.attention.key_layernorm.weight
        sd[p + "input_layernorm.weight"] = L.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.weight
        mlp = L.mlp
        if hasattr(mlp, "gate_proj"):
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.{n}.weight"] = getattr(mlp, n).weight
            continue
        sd[p + "mlp.gate.weight"] = mlp.gate.weight
        sd[p + "mlp.gate.e_score_correction_bias"] = mlp.gate.expert_bias
        for e in range(cfg.num_experts):
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.experts.{e}.{n}.weight"] = getattr(mlp.experts, n)[e]
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.shared_experts.{n}.weight"] = getattr(mlp.shared_experts, n).weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


# ---- measurements ---------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """Read+write bytes per second of a large tensor copy (best of reps): the memory-bound ceiling."""
    src = torch.randn(mb * (1 << 20) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def decode_bytes_per_token(cfg: ModelConfig, ctx: int, bytes_per: int = 4) -> int:
    """Bytes one batch-1 decode step must read: active weights (one embedding row, the whole lm_head), KV cache."""
    active = cfg.param_counts()["active"] - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx
    return (active + kv) * bytes_per


def time_engine(model, prompts, new_tokens: int, reps: int) -> float:
    eng = Engine(model, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens + 8)
    reqs = lambda: [GenerationRequest(p, max_tokens=new_tokens, stop_ids=[]) for p in prompts]  # noqa: E731
    eng.generate(reqs())  # warm-up
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
    ap.add_argument("--presets", nargs="+", default=["small", "base-100m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared few-core machine more threads mostly spin)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bw:.1f} GB/s (read+write), torch threads {torch.get_num_threads()}, "
          f"tcmalloc {'on' if TCMALLOC in os.environ.get('LD_PRELOAD', '') else 'off'}")
    results = {"copy_bandwidth_GBps": round(bw, 2), "threads": torch.get_num_threads(), "runs": []}
    for preset in args.presets:
        cfg = get_preset(preset)
        model = Transformer(cfg).init_weights(0).eval()
        hf = to_glm4moe(model)
        g = torch.Generator().manual_seed(0)
        diff = check_parity(model, hf, torch.randint(0, cfg.vocab_size, (2, 24), generator=g))
        print(f"[{preset}] logits agree with Glm4MoeForCausalLM: max |diff| {diff:.2e}")
        for B in args.batches:
            prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            ours = time_engine(model, prompts, args.new_tokens, args.reps)
            theirs = time_hf(hf, prompts, args.new_tokens, args.reps)
            row = {"preset": preset, "batch": B, "engine_tok_s": round(ours, 1), "hf_generate_tok_s": round(theirs, 1),
                   "speedup": round(ours / theirs, 2), "logits_max_diff": diff}
            if B == 1:
                need = decode_bytes_per_token(cfg, args.prompt_len + args.new_tokens // 2)
                ceiling = bw * 1e9 / need
                row.update(bytes_per_token=need, ceiling_tok_s=round(ceiling, 1),
                           fraction_of_bandwidth_ceiling=round(ours / ceiling, 3))
            results["runs"].append(row)
            print(f"[{preset}] batch {B:>2}: engine {ours:8.1f} tok/s | transformers generate {theirs:8.1f} tok/s "
                  f"| x{ours / theirs:.2f}" + (f" | {row['fraction_of_bandwidth_ceiling']:.1%} of the bandwidth "
                                               f"ceiling ({row['ceiling_tok_s']:.0f} tok/s)" if B == 1 else ""))
    print(json.dumps(results))


if __name__ == "__main__":
    main()

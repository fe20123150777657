"""Shared benchmark helpers: the transformers peer with the same weights, machine ceilings, timing.

The peer is transformers' Glm4MoeForCausalLM: same architecture family (sigmoid group-limited routing
with a correction bias, shared expert, partial NeoX RoPE, QK-norm), so it can hold our weights exactly.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from angelmed.model import Transformer  # noqa: E402


def setup(threads: int | None = None) -> None:
    """Run under tcmalloc if the machine has it, and pin the thread count."""
    from angelmed.tcmalloc import reexec_with_tcmalloc

    reexec_with_tcmalloc(sys.argv)
    torch.set_num_threads(threads or os.cpu_count() or 1)


def add_decode_workload_args(ap, reps: int) -> None:
    """The decode benchmarks' workload: presets, batch sizes, random prompts of --prompt-len, --new-tokens each."""
    ap.add_argument("--presets", nargs="+", default=["small", "base-100m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=reps)


DATA_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def chat_sources(data_root: str = DATA_ROOT) -> list[dict]:
    """The chat mix of the speculative-decoding benchmarks: the built-in ontology chats (ICD-10-CM + HPO), joined by
    MedQuAD Q/A (long free-text answers, 60% of the tokens) when the shared data root has it."""
    sources = [{"spec": "icd10cm", "weight": 0.2}, {"spec": "hpo", "weight": 0.2}]
    if os.path.isdir(os.path.join(data_root, "medquad")):
        os.environ.setdefault("ANGELMED_DATA_ROOT", data_root)
        sources.insert(0, {"spec": "medquad", "weight": 0.6})
    return sources


def heldout_chat_prompts(model_dir: str, tokenizer, n: int, sources: list[dict], max_len: int = 256):
    """n chat prompts from the sources' held-out split (the split the training stages never see)."""
    from angelmed.train.draft import DraftRunConfig, heldout_prompts

    cfg = DraftRunConfig(target=str(model_dir))
    cfg.data.sources = sources
    return heldout_prompts(cfg, tokenizer, n, max_len)


def hf_peer(model: Transformer):
    """A transformers Glm4MoeForCausalLM holding exactly `model`'s weights (fp32, eager attention)."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    c = model.config
    if c.rope_scaling:
        raise ValueError("hf_peer: YaRN configs are not mapped")
    hc = Glm4MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, partial_rotary_factor=c.partial_rotary_factor, rope_theta=c.rope_theta,
        n_routed_experts=c.num_experts, n_shared_experts=c.num_shared_experts,
        num_experts_per_tok=c.num_experts_per_tok, n_group=c.num_groups, topk_group=c.topk_group or 1,
        routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=True,
        first_k_dense_replace=c.first_k_dense_replace, use_qk_norm=c.use_qk_norm, attention_bias=False,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, num_nextn_predict_layers=0,
    )
    hc._attn_implementation = "sdpa"
    peer = Glm4MoeForCausalLM(hc).to(model.model.word_embeddings.weight.dtype).eval()
    nq, nkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    sd = {"model.embed_tokens.weight": model.model.word_embeddings.weight, "model.norm.weight": model.model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i in range(c.num_hidden_layers):
        ours, p = model.model.layers[i], f"model.layers.{i}."
        q, k, v = ours.attention.query_key_value.weight.split([nq, nkv, nkv])
        sd |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
               p + "self_attn.o_proj.weight": ours.attention.dense.weight,
               p + "input_layernorm.weight": ours.input_layernorm.weight,
               p + "post_attention_layernorm.weight": ours.post_attention_layernorm.weight}
        if c.use_qk_norm:
            sd |= {p + "self_attn.q_norm.weight": ours.attention.query_layernorm.weight,
                   p + "self_attn.k_norm.weight": ours.attention.key_layernorm.weight}
        mlp = ours.mlp
        if i < c.first_k_dense_replace:
            sd |= {p + f"mlp.{n}.weight": getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
            continue
        sd |= {p + "mlp.gate.weight": mlp.gate.weight, p + "mlp.gate.e_score_correction_bias": mlp.gate.expert_bias}
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.shared_experts.{n}.weight"] = getattr(mlp.shared_experts, n).weight
            stacked = getattr(mlp.experts, n)
            for e in range(c.num_experts):
                sd[p + f"mlp.experts.{e}.{n}.weight"] = stacked[e]
    missing, unexpected = peer.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"hf_peer mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return peer


def assert_same_logits(model: Transformer, peer, vocab: int, atol: float = 1e-3) -> float:
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(ids).logits
        b = peer(ids).logits.float()
    diff = (a - b).abs().max().item()
    if diff > atol:
        raise AssertionError(f"peer logits differ from ours by {diff:.2e} (> {atol}); mapping is wrong")
    return diff


def timed(fn, warmup: int = 1, repeat: int = 3) -> float:
    """Best wall time of `repeat` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(n: int = 1024, dtype=torch.float32) -> float:
    """Measured dense matmul rate of this machine (FLOP/s)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = timed(lambda: a @ b, warmup=2, repeat=5)
    return 2 * n ** 3 / t


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Measured memory copy bandwidth (bytes/s, read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), warmup=2, repeat=5)
    return 2 * nbytes / t


def emit(result: dict) -> None:
    print(json.dumps(result))

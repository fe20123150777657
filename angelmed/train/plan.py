"""Dry run of a training recipe: build the model on the meta device (no memory) and print the plan.

`angelmed train STAGE --config FILE --dry-run [--nodes N --gpus-per-node G]` shows parameter counts,
tokens per step, and the per-GPU memory arithmetic of FSDP2 with fp32 master weights:

    sharded state  = params (4 B) + grads (4 B) + AdamW m, v (8 B)   = 16 B/param / world
    gathered layer = the largest layer's params in the compute dtype  (all-gathered for its forward/backward)
    activations    ~ 34 B x tokens per GPU x hidden x layers at 16-bit (Megatron's estimate; no recomputation)
                     with train.activation_checkpointing: 2 B x tokens x hidden per layer (its saved input)
                     plus one layer's 34 B (the layer being recomputed)
"""

from __future__ import annotations

import argparse

import torch

from angelmed.model import Transformer

GiB = 1024 ** 3


def plan(cfg, world: int, activation_factor: float = 34.0) -> dict:
    from angelmed.train.loop import model_config

    mcfg = model_config(cfg.model)
    with torch.device("meta"):
        model = Transformer(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    embed = mcfg.vocab_size * mcfg.hidden_size
    compute_bytes = 2 if cfg.train.precision == "bf16" else 4
    per_gpu_tokens = cfg.data.seq_len * cfg.data.micro_batch_size
    sharded = 16 * n_params / world
    gathered = max(largest_layer, embed) * compute_bytes * 2  # the layer in flight and the next one prefetched
    # activations kept for backward: Megatron's ~34 bytes per token per hidden unit per layer at 16-bit
    n_layers = mcfg.num_hidden_layers + mcfg.num_nextn_predict_layers
    per_layer = per_gpu_tokens * mcfg.hidden_size * compute_bytes / 2  # bytes per "B per hidden unit"
    if cfg.train.activation_checkpointing:
        activations = per_layer * (2 * n_layers + activation_factor)
    else:
        activations = per_layer * activation_factor * n_layers
    logits = per_gpu_tokens * mcfg.vocab_size * 4 * 2  # fp32 logits and their gradient
    counts = mcfg.param_counts()
    return {
        "params_total": n_params, "params_active": counts["active"], "world_size": world,
        "tokens_per_step": per_gpu_tokens * world * cfg.train.grad_accum,
        "flops_per_token": 6 * counts["active"],
        "gib_sharded_state_per_gpu": sharded / GiB, "gib_gathered_params": gathered / GiB,
        "gib_activations_per_gpu": activations / GiB, "gib_logits_per_gpu": logits / GiB,
        "gib_total_per_gpu": (sharded + gathered + activations + logits) / GiB,
    }


def main(stage: str, argv: list[str]) -> int:
    from angelmed.train.cli import parse_stage_args

    ap = argparse.ArgumentParser(prog=f"angelmed train {stage} --dry-run", add_help=False)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--gpu-gib", type=float, default=79.0, help="usable memory per GPU (H100 80GB: ~79 GiB)")
    known, rest = ap.parse_known_args(argv)
    cfg = parse_stage_args(stage, rest, config_only=True)
    p = plan(cfg, known.nodes * known.gpus_per_node)
    print(f"dry run of `angelmed train {stage}` on {known.nodes} node(s) x {known.gpus_per_node} GPU(s) "
          f"(model built on the meta device: nothing allocated)")
    print(f"  parameters        {p['params_total']:,} total, {p['params_active']:,} active per token")
    print(f"  tokens per step   {p['tokens_per_step']:,} ({p['flops_per_token'] / 1e9:.1f} GFLOP per token)")
    print(f"  per GPU (GiB)     sharded params+grads+AdamW {p['gib_sharded_state_per_gpu']:.1f} | gathered layers "
          f"{p['gib_gathered_params']:.1f} | activations {p['gib_activations_per_gpu']:.1f} | logits "
          f"{p['gib_logits_per_gpu']:.1f} | total {p['gib_total_per_gpu']:.1f} of {known.gpu_gib:.0f}")
    if p["gib_total_per_gpu"] > known.gpu_gib:
        hint = "" if cfg.train.activation_checkpointing else ", or set train.activation_checkpointing: true"
        print(f"  DOES NOT FIT: add GPUs or lower data.micro_batch_size / seq_len{hint}")
        return 1
    print("  fits")
    return 0

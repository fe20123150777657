"""GRPO run configuration: the shared RunConfig sections plus a `grpo:` section (training.md §7, §9 defaults).

Loaded like the other stages (stage defaults <- YAML <- `--grpo.key value` overrides, every key type-checked by
train/config.py); GRPO-specific values are validated here with errors naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from angelmed.train.config import (RunConfig, RunConfigError, default_config, download_init_from, resolve_config,
                                   validate)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOSection:
    # prompts: RL sources [{source: spec, weight: w}] read with open_source(spec, "rl"); specs as in
    # angelmed.data.sources (registry names such as icd10cm, huatuogpt_o1_demo, or .jsonl paths)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    # held-out prompts: sources read with role "eval" (e.g. icd10cm = its held-out split); empty = the hashed
    # data.heldout_fraction share of `prompts`, which training then never sees
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)
    eval_size: int = 32  # held-out prompts scored (greedy) at each evaluation
    max_prompt_length: int = 512  # longer prompts are skipped and counted
    max_completion_length: int = 256
    prompts_per_step: int = 4  # groups per optimizer step (x group_size completions)
    group_size: int = 8  # G
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rollout_batch: int = 64  # engine slots (concurrent sequences)
    rollout_dtype: str = "same"  # same (training compute dtype) | float32 | bfloat16 (a synced copy)
    rewards: list[dict[str, Any]] = field(default_factory=list)  # angelmed.rewards.build_rewards entries
    reward_aggregation: str = "sum_then_normalize"  # | normalize_then_sum (GDPO)
    scale_rewards: str = "group"  # group | batch | none
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0  # k3 KL weight; 0 = no reference model loaded
    num_iterations: int = 1  # mu: optimizer steps per generation batch
    old_logprobs: str = "auto"  # auto | rollout | train (see grpo.py)
    rollout_correction: str = "none"  # none | token_tis | seq_mis
    rollout_correction_threshold: float = 2.0
    dynamic_sampling: bool = False  # drop zero-variance groups (DAPO)
    max_gen_batches: int = 1  # with dynamic_sampling: generation batches per step to fill prompts_per_step; <=0 unlimited
    mask_truncated_completions: bool = False
    overlong_penalty: bool = False  # DAPO soft overlong punishment, added to the reward
    overlong_buffer: int = 64
    overlong_penalty_factor: float = 1.0
    routing_replay: bool = True  # R3: the training forward uses the rollout's experts


@dataclass
class GRPORunConfig(RunConfig):
    grpo: GRPOSection = field(default_factory=GRPOSection)


def grpo_default_config() -> GRPORunConfig:
    """Stage defaults (training.md §9): LR 1e-6 constant, biases frozen, z-loss/MTP/balance losses off."""
    base = default_config("grpo")
    cfg = GRPORunConfig(stage="grpo", model=base.model, data=base.data, optim=base.optim, loss=base.loss,
                        balance=base.balance, train=base.train)
    cfg.optim.lr = 1e-6
    cfg.optim.schedule = "constant"
    cfg.balance.freeze = True
    cfg.loss.mtp_weight = 0.0
    cfg.loss.z_loss_coef = 0.0
    cfg.loss.seq_balance_alpha = 0.0
    cfg.data.micro_batch_size = 8
    cfg.train.run_dir = "runs/grpo"
    cfg.train.eval_every = 10
    return cfg


def load_grpo_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GRPORunConfig:
    cfg = resolve_config(GRPORunConfig, grpo_default_config(), "grpo", path, overrides)
    download_init_from(cfg)
    validate(cfg)
    validate_grpo(cfg)
    return cfg


def validate_grpo(cfg: GRPORunConfig) -> None:
    g = cfg.grpo

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise RunConfigError(msg)

    def one_of(key: str, value: str, options: tuple[str, ...]) -> None:
        need(value in options, f"grpo.{key}: expected {' | '.join(options)}, got {value!r}")

    one_of("loss_type", g.loss_type, LOSS_TYPES)
    one_of("reward_aggregation", g.reward_aggregation, ("sum_then_normalize", "normalize_then_sum"))
    one_of("scale_rewards", g.scale_rewards, ("group", "batch", "none"))
    one_of("importance_sampling_level", g.importance_sampling_level, ("token", "sequence"))
    one_of("old_logprobs", g.old_logprobs, ("auto", "rollout", "train"))
    one_of("rollout_correction", g.rollout_correction, ("none", "token_tis", "seq_mis"))
    one_of("rollout_dtype", g.rollout_dtype, ("same", "float32", "bfloat16"))
    need(g.group_size >= 2, f"grpo.group_size must be >= 2 (a group baseline needs two samples), got {g.group_size}")
    need(g.prompts_per_step >= 1, f"grpo.prompts_per_step must be >= 1, got {g.prompts_per_step}")
    need(g.num_iterations >= 1, f"grpo.num_iterations must be >= 1, got {g.num_iterations}")
    need(g.max_completion_length >= 1, f"grpo.max_completion_length must be >= 1, got {g.max_completion_length}")
    need(g.max_prompt_length >= 1, f"grpo.max_prompt_length must be >= 1, got {g.max_prompt_length}")
    need(g.rollout_batch >= 1, f"grpo.rollout_batch must be >= 1, got {g.rollout_batch}")
    need(g.temperature > 0, f"grpo.temperature must be > 0 for sampling, got {g.temperature}")
    need(0 < g.top_p <= 1, f"grpo.top_p must be in (0, 1], got {g.top_p}")
    need(g.top_k >= 0, f"grpo.top_k must be >= 0, got {g.top_k}")
    need(g.epsilon_low >= 0 and g.epsilon_high >= 0, "grpo.epsilon_low / epsilon_high must be >= 0")
    need(g.beta >= 0, f"grpo.beta must be >= 0, got {g.beta}")
    need(g.rollout_correction_threshold > 1, "grpo.rollout_correction_threshold must be > 1, got "
         f"{g.rollout_correction_threshold}")
    need(0 < g.overlong_buffer <= g.max_completion_length,
         f"grpo.overlong_buffer must be in (0, max_completion_length], got {g.overlong_buffer}")
    need(g.eval_size >= 0, f"grpo.eval_size must be >= 0, got {g.eval_size}")
    untempered = g.temperature == 1.0 and g.top_p == 1.0 and g.top_k == 0
    # the engine reports log-probs of the raw distribution: they are pi_rollout only when sampling is untempered
    need(untempered or g.rollout_correction == "none",
         "grpo.rollout_correction needs temperature 1, top_p 1, top_k 0 (pi_rollout must be the sampling distribution)")
    need(untempered or g.old_logprobs != "rollout",
         "grpo.old_logprobs 'rollout' needs temperature 1, top_p 1, top_k 0")
    need(g.old_logprobs != "rollout" or g.rollout_correction == "none",
         "grpo.old_logprobs 'rollout' leaves nothing to correct: set rollout_correction none or old_logprobs train")
    for i, p in enumerate(list(g.prompts) + list(g.eval_prompts)):
        need(isinstance(p.get("source"), str) and p["source"],
             f"grpo.prompts / eval_prompts entry {i}: expected {{source: SPEC, weight: W}}, got {p}")
        unknown = set(p) - {"source", "weight"}
        need(not unknown, f"grpo.prompts entry {p['source']!r}: unknown key(s) {sorted(unknown)} (source, weight)")
    need(cfg.loss.mtp_weight == 0 and not cfg.loss.mtp_weight_schedule,
         "loss.mtp_weight: the MTP loss is off in GRPO (set it to 0)")
    need(cfg.loss.z_loss_coef == 0 and cfg.loss.seq_balance_alpha == 0,
         "loss.z_loss_coef / seq_balance_alpha: router auxiliary losses stay off in RL (training.md §1.4)")

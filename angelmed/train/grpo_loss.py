"""GRPO mathematics as plain tensor functions (spec training.md §7): advantages, clipped surrogate,
k3 KL, loss aggregation (grpo / bnpo / dr_grpo / dapo), overlong shaping, rollout correction.

Shapes: N completions (= prompts x G), L completion positions; `mask_NL` marks real completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4


def _nanstd(x: Tensor, dim: int) -> Tensor:
    """Bessel-corrected std ignoring NaNs (n-1 in the denominator; NaN when fewer than 2 values)."""
    n = (~x.isnan()).sum(dim, keepdim=True)
    mean = x.nanmean(dim, keepdim=True)
    var = ((x - mean) ** 2).nansum(dim, keepdim=True) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.full_like(var, float("nan"))).squeeze(dim)


def group_advantages(rewards_N: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Group-relative advantages. NaN rewards (all reward fns None) are excluded and get advantage 0.

    scale: "group" (A = (r - mean_g) / (std_g + 1e-4)), "batch" (group mean, batch std),
    "none" (Dr. GRPO: r - mean_g).
    """
    if rewards_N.numel() % group_size:
        raise ValueError(f"{rewards_N.numel()} rewards do not split into groups of {group_size}")
    r_GS = rewards_N.float().view(-1, group_size)
    centred = r_GS - r_GS.nanmean(1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(r_GS, 1)[:, None] + STD_EPS)
    elif scale == "batch":
        centred = centred / (_nanstd(rewards_N.float(), 0) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group | batch | none, got {scale!r}")
    return torch.nan_to_num(centred.view(-1), nan=0.0)


def normalize_then_sum(per_fn_rewards: dict[str, Tensor], weights: dict[str, float], group_size: int) -> Tensor:
    """GDPO-style aggregation: normalise each reward within its group, weight-sum, normalise over the batch."""
    total = None
    for name, r in per_fn_rewards.items():
        z = group_advantages(r, group_size, "group") * weights.get(name, 1.0)
        total = z if total is None else total + z
    return (total - total.mean()) / (_nanstd(total, 0) + STD_EPS)


def zero_std_groups(rewards_N: Tensor, group_size: int) -> Tensor:
    """Boolean per group: every completion got the same reward (no learning signal; DAPO filters these)."""
    r_GS = rewards_N.float().view(-1, group_size)
    return (r_GS.nan_to_num(0) == r_GS.nan_to_num(0)[:, :1]).all(1)


def overlong_penalty(lengths_N: Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward."""
    start = max_len - buffer_len
    over = (lengths_N.float() - start).clamp(min=0) / max(buffer_len, 1)
    return -penalty * over.clamp(max=1.0)


def k3_kl(logp_ref: Tensor, logp: Tensor) -> Tensor:
    """Unbiased non-negative KL estimator: exp(r) - r - 1 with r = logp_ref - logp."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


@dataclass
class SurrogateOut:
    loss_NL: Tensor  # per-token loss (before aggregation)
    ratio_NL: Tensor
    clipped_low_NL: Tensor  # boolean: clipping at 1 - eps_low changed the objective
    clipped_high_NL: Tensor
    kl_NL: Tensor | None


def clipped_surrogate(logp_NL: Tensor, logp_old_NL: Tensor, adv_N: Tensor, mask_NL: Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2, level: str = "token",
                      logp_ref_NL: Tensor | None = None, beta: float = 0.0,
                      is_weight_NL: Tensor | None = None) -> SurrogateOut:
    """l = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) [+ beta KL], per token."""
    log_ratio = logp_NL - logp_old_NL
    if level == "sequence":  # GSPO: one ratio per sequence, the mean log-ratio over its tokens
        m = mask_NL.float()
        seq = (log_ratio * m).sum(1) / m.sum(1).clamp(min=1)
        log_ratio = seq[:, None].expand_as(logp_NL)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be token | sequence, got {level!r}")
    ratio = torch.exp(log_ratio)
    A = adv_N[:, None]
    unclipped = ratio * A
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * A
    loss = -torch.min(unclipped, clipped)
    if is_weight_NL is not None:
        loss = loss * is_weight_NL
    kl = None
    if beta and logp_ref_NL is not None:
        kl = k3_kl(logp_ref_NL, logp_NL)
        loss = loss + beta * kl
    return SurrogateOut(loss, ratio, (ratio < 1 - eps_low) & (A < 0), (ratio > 1 + eps_high) & (A > 0), kl)


def aggregate(loss_NL: Tensor, mask_NL: Tensor, loss_type: str = "dapo", max_completion_len: int | None = None,
              global_active_tokens: float | None = None, num_processes: int = 1, grad_accum: int = 1) -> Tensor:
    """Reduce per-token losses of one micro-batch as TRL does (spec §7.5).

    grpo:    mean over sequences of each sequence's token mean, / grad_accum
    bnpo:    token mean over this micro-batch, / grad_accum
    dr_grpo: token sum / (N * max_completion_len), / grad_accum
    dapo:    token sum / (active tokens of the whole global accumulated batch / num_processes)
    """
    m = mask_NL.float()
    if loss_type == "grpo":
        return ((loss_NL * m).sum(1) / m.sum(1).clamp(min=1)).mean() / grad_accum
    if loss_type == "bnpo":
        return (loss_NL * m).sum() / m.sum().clamp(min=1) / grad_accum
    if loss_type == "dr_grpo":
        if max_completion_len is None:
            raise ValueError("dr_grpo needs max_completion_len")
        return (loss_NL * m).sum() / (loss_NL.shape[0] * max_completion_len) / grad_accum
    if loss_type == "dapo":
        if global_active_tokens is None:
            raise ValueError("dapo needs the active-token count of the global batch (computed before the loop)")
        return (loss_NL * m).sum() / max(global_active_tokens / num_processes, 1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def rollout_correction(logp_old_NL: Tensor, logp_rollout_NL: Tensor, mask_NL: Tensor, mode: str = "none",
                       threshold: float = 2.0) -> tuple[Tensor, Tensor]:
    """Importance weights for rollout/training mismatch (spec §7.8). Returns (weights_NL, new_mask_NL).

    token_tis: w = min(pi_old / pi_rollout, threshold) per token;
    seq_mis:   drop whole sequences whose ratio product leaves [1/threshold, threshold] (IcePop-style).
    """
    log_w = (logp_old_NL - logp_rollout_NL).clamp(-20, 20)
    if mode == "none":
        return torch.ones_like(logp_old_NL), mask_NL
    if mode == "token_tis":
        return log_w.exp().clamp(max=threshold).detach(), mask_NL
    if mode == "seq_mis":
        seq = (log_w * mask_NL.float()).sum(1).exp()
        keep = (seq <= threshold) & (seq >= 1 / threshold)
        return torch.ones_like(logp_old_NL), mask_NL & keep[:, None]
    raise ValueError(f"rollout correction must be none | token_tis | seq_mis, got {mode!r}")


def token_logprobs(logits_NLV: Tensor, targets_NL: Tensor) -> Tensor:
    """log pi(target) per position, in fp32 (memory: one logsumexp, no full log_softmax copy kept)."""
    logits = logits_NLV.float()
    return logits.gather(-1, targets_NL[..., None]).squeeze(-1) - logits.logsumexp(-1)

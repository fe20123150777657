"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules (warmup + cosine,
warmup + stable + decay (WSD), constant)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from angelmed.train.config import OptimSection


def build_optimizer(model: nn.Module, o: OptimSection, fused: bool = False) -> torch.optim.AdamW:
    """Norm weights and biases get no weight decay; expert_bias is a buffer and never reaches the optimizer."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kwargs)


def lr_factor(step: int, total: int, o: OptimSection) -> float:
    """Multiplier of the peak LR for 0-based optimizer step `step` of `total`."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    floor = o.min_lr_ratio
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "cosine":
        span = max(1, total - 1 - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of the run
    decay_steps = max(1, round(o.decay_fraction * total))
    start = total - decay_steps
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay_steps)
    return 1.0 - (1 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, o: OptimSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=total_steps, o=o))

"""Auxiliary-loss-free expert balancing (DeepSeek-V3 sign rule, Ling's zero-mean variant; training.md §1.1).

Per MoE layer, once per optimizer step, on the load of the *whole* step (all accumulation micro-batches,
summed across data-parallel ranks):

    delta_i = sign(mean_j load_j - load_i)          (sign(0) = 0)
    delta_i -= mean_j delta_j                       (zero-mean variant)
    bias_i  += rate * delta_i

`expert_bias` is the fp32 buffer `Router.expert_bias` (never a parameter: no gradient, no weight decay, never
cast). Every rank applies the same update to the same all-reduced counts, so the biases stay identical
across ranks without broadcasting. The model is run without activation checkpointing, so no forward is
counted twice (§1.1 item 6).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from angelmed.model import MoE, RouterInfo


def bias_update(load_LE: Tensor, rate: float, zero_mean: bool) -> Tensor:
    """The bias increment [L, E] (fp32) for expert loads [L, E]; deterministic given the loads."""
    load = load_LE.double()
    delta = torch.sign(load.mean(-1, keepdim=True) - load)
    if zero_mean:
        delta = delta - delta.mean(-1, keepdim=True)
    return (rate * delta).float()


def load_stats(load_LE: Tensor) -> dict[str, Tensor]:
    """Per-layer balance metrics (§1.5): max/mean, min/mean, MaxVio = max/mean - 1, dead experts."""
    load = load_LE.double()
    mean = load.mean(-1).clamp(min=1e-12)
    ratio = load / mean[:, None]
    return {"max_over_mean": ratio.max(-1).values, "min_over_mean": ratio.min(-1).values,
            "maxvio": ratio.max(-1).values - 1, "dead": (load_LE == 0).sum(-1)}


class ExpertBalancer:
    """Accumulates router counts over a step's micro-batches, then updates every router's expert_bias."""

    def __init__(self, model: nn.Module, rate: float, zero_mean: bool = True, frozen: bool = False):
        # Same order as ModelOutput.router: main layers, then MTP layers (model.layers holds both, in order).
        self.routers = [m.gate for m in model.modules() if isinstance(m, MoE)]
        self.rate, self.zero_mean, self.frozen = rate, zero_mean, frozen
        E = self.routers[0].E if self.routers else 0
        device = self.routers[0].expert_bias.device if self.routers else "cpu"
        self.counts_LE = torch.zeros(len(self.routers), E, dtype=torch.float64, device=device)
        self.last_load_LE: Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.routers) and not self.frozen and self.rate > 0

    @torch.no_grad()
    def accumulate(self, router: list[RouterInfo]) -> None:
        if len(router) != len(self.routers):
            raise ValueError(f"got routing for {len(router)} MoE layers, the model has {len(self.routers)} "
                             "(run the forward with mtp=True when the model has MTP layers)")
        for i, info in enumerate(router):
            self.counts_LE[i] += info.counts_E.to(self.counts_LE.device, torch.float64)

    @torch.no_grad()
    def step(self, all_reduce_sum: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
        """End of an optimizer step: reduce the counts across ranks, update the biases, reset. Returns load [L,E]."""
        load = all_reduce_sum(self.counts_LE.clone())
        if self.active:
            delta = bias_update(load, self.rate, self.zero_mean)
            for router, d in zip(self.routers, delta):
                router.expert_bias.add_(d.to(router.expert_bias.device))
        self.counts_LE.zero_()
        self.last_load_LE = load
        return load

    def biases(self) -> Tensor:
        return torch.stack([r.expert_bias.detach().float().cpu() for r in self.routers]) if self.routers \
            else torch.zeros(0, 0)

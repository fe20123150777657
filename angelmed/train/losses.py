"""Training losses: token cross-entropy, MTP targets, router z-loss, sequence-wise balance loss.

Normalisation convention (training.md §6 "Loss normalisation"): every CE term is a *sum* over loss tokens
divided by the number of loss tokens in the **global batch** (all accumulation micro-batches on all ranks),
so a step's loss is the exact token mean whatever the accumulation or data-parallel split. The loop counts
the global tokens before the first forward (`global_token_counts`) and passes the denominators in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from angelmed.model import RouterInfo

IGNORE = -100


def ce_sum(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Summed cross-entropy over positions whose target is not -100 (fp32)."""
    V = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_BT.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def mtp_targets(labels_BT: Tensor, segment_BT: Tensor | None, k: int) -> Tensor:
    """Targets of MTP depth k (1-based): at position t, labels[t+k] = token t+k+1 of the same row.

    Excluded (-100): t+k beyond the row, ignored labels, and targets in another document/sample
    (segment change between t and t+k). Rows never leak into each other (cf. the reference bug, model.md §12.2).
    """
    B, T = labels_BT.shape
    out = torch.full_like(labels_BT, IGNORE)
    if k >= T:
        return out
    shifted = labels_BT[:, k:]
    if segment_BT is not None:
        shifted = shifted.masked_fill(segment_BT[:, k:] != segment_BT[:, : T - k], IGNORE)
    out[:, : T - k] = shifted
    return out


def doc_segments(ids_BT: Tensor, eod_id: int) -> Tensor:
    """Document ids inside packed CPT rows from the EOD separators (an EOD belongs to the document it ends),
    so MTP targets never cross documents even when positions and attention run across them (Ling default)."""
    is_eod = (ids_BT == eod_id).long()
    return is_eod.cumsum(1) - is_eod


def loss_token_counts(labels: Tensor, seg: Tensor | None, mtp_depth: int) -> Tensor:
    """[1 + D] loss-token counts of one micro-batch: main head, then each MTP depth."""
    counts = [(labels != IGNORE).sum()]
    counts += [(mtp_targets(labels, seg, k) != IGNORE).sum() for k in range(1, mtp_depth + 1)]
    return torch.stack(counts).to(torch.float64)


def mtp_weight_at(step: int, base: float, schedule: list[list[float]]) -> float:
    """Piecewise-constant lambda: the last [from_step, value] entry with from_step <= step, else `base`."""
    value = base
    for start, w in sorted(schedule, key=lambda p: p[0]):
        if step >= start:
            value = float(w)
    return value


def router_z_loss(router: list[RouterInfo]) -> Tensor:
    """Sum over MoE layers of mean_t (logsumexp_j z_tj)^2 (ST-MoE; Megatron adds one term per layer)."""
    return sum(torch.logsumexp(r.logits_TE, dim=-1).pow(2).mean() for r in router)


def seq_balance_loss(router: list[RouterInfo], top_k: int) -> Tensor:
    """Sum over MoE layers of the DeepSeek-V3 sequence-wise balance term (Eqs. 17-20, without alpha), summed
    over the rows of the micro-batch (callers divide by the global row count). Gradient flows through P only.

    f_i = E/(K T) * #{t: i selected}, P_i = mean_t s_it / sum_j s_jt, L = sum_i f_i P_i (= 1 at perfect balance).
    """
    total = 0.0
    for r in router:
        B, T, k = r.idx_Tk.shape
        E = r.scores_TE.shape[-1]
        with torch.no_grad():
            sel_BTE = torch.zeros(B, T, E, device=r.idx_Tk.device).scatter_(2, r.idx_Tk, 1.0)
            f_BE = sel_BTE.sum(1) * (E / (top_k * T))
        s_BTE = r.scores_TE.view(B, T, E)
        p_BE = (s_BTE / s_BTE.sum(-1, keepdim=True)).mean(1)
        total = total + (f_BE * p_BE).sum()
    return total

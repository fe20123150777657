"""MTP targets, z-loss, sequence-balance loss, LR schedules against hand-computed values."""

import math

import torch

from angelmed.model import RouterInfo
from angelmed.train.config import OptimSection
from angelmed.train.losses import (ce_sum, doc_segments, loss_token_counts, mtp_targets, mtp_weight_at, router_z_loss,
                                   seq_balance_loss)
from angelmed.train.optim import lr_factor

X = -100


def test_mtp_targets_same_row_same_segment():
    labels = torch.tensor([[11, 12, 13, X, 15, 16],
                           [21, 22, 23, 24, 25, 26]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1],
                        [0, 0, 0, 0, 0, 0]])
    # k=1: t -> labels[t+1] if same segment; last position has no target (never the next row)
    assert mtp_targets(labels, seg, 1).tolist() == [[12, 13, X, X, 16, X], [22, 23, 24, 25, 26, X]]
    # k=2: t=2 -> labels[4]=15 is in segment 1 -> excluded
    assert mtp_targets(labels, seg, 2).tolist() == [[13, X, X, X, X, X], [23, 24, 25, 26, X, X]]
    assert mtp_targets(labels, None, 2)[0].tolist() == [13, X, 15, 16, X, X]
    counts = loss_token_counts(labels, seg, 2)
    assert counts.tolist() == [11, 8, 5]


def test_ce_sum_ignores_masked():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 2.0
    s = ce_sum(logits, torch.tensor([[1, X, 3]]))
    want = (math.log(3 + math.e**2) - 2.0) + math.log(4)
    assert abs(s.item() - want) < 1e-6


def test_mtp_weight_schedule():
    sched = [[0, 0.3], [100, 0.1]]
    assert mtp_weight_at(0, 0.5, sched) == 0.3 and mtp_weight_at(99, 0.5, sched) == 0.3
    assert mtp_weight_at(100, 0.5, sched) == 0.1 and mtp_weight_at(5, 0.5, []) == 0.5


def test_z_loss_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # lse = log2, log4
    info = RouterInfo(torch.zeros(1, 2, 1, dtype=torch.long), torch.zeros(2), logits, logits.sigmoid())
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert abs(router_z_loss([info, info]).item() - 2 * want) < 1e-6


def test_seq_balance_perfect_and_skewed():
    # 2 tokens, 4 experts, k=1. Perfect: tokens pick experts 0 and 1... f = 4/(1*2)*[1,1,0,0] = [2,2,0,0]
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])  # P = [1/4]*4
    idx = torch.tensor([[[0], [1]]])
    info = RouterInfo(idx, torch.zeros(4), torch.zeros(2, 4), scores)
    assert abs(seq_balance_loss([info], top_k=1).item() - 1.0) < 1e-6  # sum f*P = (2+2)/4
    skew = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1]])  # P_0 = 0.75
    info = RouterInfo(torch.tensor([[[0], [0]]]), torch.zeros(4), torch.zeros(2, 4), skew.requires_grad_())
    loss = seq_balance_loss([info], top_k=1)  # f = [4,0,0,0]
    assert abs(loss.item() - 4 * 0.75) < 1e-6
    loss.backward()
    assert skew.grad is not None and skew.grad.abs().sum() > 0


def test_lr_schedules():
    o = OptimSection(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    f = [lr_factor(s, 12, o) for s in range(12)]
    assert f[:2] == [0.5, 1.0] and abs(f[-1] - 0.1) < 1e-9
    assert abs(f[2 + 9 // 2] - (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))) < 1e-9
    w = OptimSection(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.25)
    g = [lr_factor(s, 8, w) for s in range(8)]
    assert g == [1, 1, 1, 1, 1, 1, 0.5, 0.0]
    assert lr_factor(50, 100, OptimSection(schedule="constant")) == 1.0


def test_doc_segments_from_eod():
    E = 9
    ids = torch.tensor([[1, 2, E, 3, 4, E, E, 5]])
    # an EOD belongs to the document it ends
    assert doc_segments(ids, E).tolist() == [[0, 0, 0, 1, 1, 1, 2, 3]]

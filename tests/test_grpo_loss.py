"""GRPO math against hand-computed values on a 2-prompt x 3-completion example."""

import math

import pytest
import torch

from angelmed.train.grpo_loss import (aggregate, clipped_surrogate, group_advantages, k3_kl, overlong_penalty,
                                      rollout_correction, token_logprobs, zero_std_groups)

X = 99.0  # padding value: must never leak into a loss
LOSS = torch.tensor([[1, 2, X], [3, X, X], [4, 5, 6], [7, 8, X], [1, 1, X], [2, X, X]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_aggregation_variants_by_hand():
    # per-sequence token means 1.5, 3, 5, 7.5, 1, 2 -> 20/6; token sum 40 over 11 tokens
    assert aggregate(LOSS, MASK, "grpo").item() == pytest.approx(20 / 6)
    assert aggregate(LOSS, MASK, "bnpo").item() == pytest.approx(40 / 11)
    assert aggregate(LOSS, MASK, "dr_grpo", max_completion_len=3).item() == pytest.approx(40 / 18)
    # dapo: normaliser = active tokens of the whole global batch (say 22 over 2 processes -> 11 each)
    assert aggregate(LOSS, MASK, "dapo", global_active_tokens=22).item() == pytest.approx(40 / 22)
    assert aggregate(LOSS, MASK, "dapo", global_active_tokens=22, num_processes=2).item() == pytest.approx(40 / 11)
    assert aggregate(LOSS, MASK, "grpo", grad_accum=4).item() == pytest.approx(20 / 24)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # Bessel-corrected
    a = group_advantages(r, 3, "group")
    expected = [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0, 0, 0]
    torch.testing.assert_close(a, torch.tensor(expected))
    torch.testing.assert_close(group_advantages(r, 3, "none"), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    batch_std = torch.tensor([1.0, 0, 0, 1, 1, 1]).std().item()
    torch.testing.assert_close(group_advantages(r, 3, "batch"),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]) / (batch_std + 1e-4))
    assert zero_std_groups(r, 3).tolist() == [False, True]


def test_none_rewards_excluded_from_baseline():
    r = torch.tensor([1.0, float("nan"), 0.0])
    a = group_advantages(r, 3, "none")
    torch.testing.assert_close(a, torch.tensor([0.5, 0.0, -0.5]))


def test_clipping_engages_where_it_should():
    adv = torch.tensor([1.0, -1.0, 1.0])
    logp_old = torch.zeros(3, 1)
    logp = torch.tensor([[0.5], [math.log(0.5)], [0.1]], requires_grad=True)
    out = clipped_surrogate(logp, logp_old, adv, torch.ones(3, 1, dtype=torch.bool), eps_low=0.2, eps_high=0.28)
    # row 0: ratio e^.5 > 1.28 with A > 0 -> objective 1.28; row 1: ratio .5 < .8 with A < 0 -> objective -.8
    torch.testing.assert_close(out.loss_NL.detach().squeeze(1), torch.tensor([-1.28, 0.8, -math.exp(0.1)]))
    assert out.clipped_high_NL.squeeze(1).tolist() == [True, False, False]
    assert out.clipped_low_NL.squeeze(1).tolist() == [False, True, False]
    out.loss_NL.sum().backward()
    assert logp.grad[0].item() == 0 and logp.grad[1].item() == 0  # clipped: no gradient
    assert logp.grad[2].item() == pytest.approx(-math.exp(0.1))


def test_ratio_one_gives_policy_gradient():
    adv = torch.tensor([2.0])
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = clipped_surrogate(logp, logp.detach(), adv, torch.ones(1, 2, dtype=torch.bool))
    out.loss_NL.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0]]))


def test_kl_zero_when_policy_equals_reference_and_positive_otherwise():
    lp = torch.randn(4, 5)
    assert torch.all(k3_kl(lp, lp) == 0)
    assert torch.all(k3_kl(lp + 0.3, lp) > 0)
    d = 0.3
    assert k3_kl(torch.tensor(d), torch.tensor(0.0)).item() == pytest.approx(math.exp(d) - d - 1)
    out = clipped_surrogate(lp, lp, torch.zeros(4), torch.ones(4, 5, dtype=torch.bool), logp_ref_NL=lp, beta=0.1)
    assert torch.all(out.kl_NL == 0) and torch.all(out.loss_NL == 0)


def test_sequence_level_ratio():
    logp = torch.tensor([[0.2, 0.4, 5.0]])
    mask = torch.tensor([[True, True, False]])
    out = clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, level="sequence", eps_high=10)
    torch.testing.assert_close(out.ratio_NL, torch.full((1, 3), math.exp(0.3)))


def test_overlong_penalty():
    got = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, buffer_len=4, penalty=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_rollout_correction_modes():
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    roll = torch.tensor([[-1.0, 0.0], [0.1, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    w, m = rollout_correction(old, roll, mask, "token_tis", threshold=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0], [math.exp(-0.1), 1.0]]))
    _, m = rollout_correction(old, roll, mask, "seq_mis", threshold=2.0)
    assert m.tolist() == [[False, False], [True, True]]  # e^1 > 2 drops row 0


def test_token_logprobs():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))

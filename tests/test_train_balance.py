"""Aux-loss-free expert-bias update: the rule on hand-computed loads, accumulation over micro-batches,
cross-rank reduction, freeze switch, fp32 buffer."""

import torch

from angelmed.config import get_preset
from angelmed.model import RouterInfo, Transformer
from angelmed.train.balance import ExpertBalancer, bias_update, load_stats
from angelmed.train.optim import build_optimizer
from angelmed.train.config import OptimSection


def test_rule_hand_computed():
    # layer 0: mean 2 -> sign(2 - [4,0,2,2]) = [-1, 1, 0, 0] (sign(0)=0), already zero-mean
    # layer 1: mean 2 -> sign(2 - [5,1,1,1]) = [-1, 1, 1, 1]; zero-mean: minus 0.5 -> [-1.5, .5, .5, .5]
    load = torch.tensor([[4.0, 0, 2, 2], [5, 1, 1, 1]])
    got = bias_update(load, rate=1e-3, zero_mean=True)
    want = torch.tensor([[-1e-3, 1e-3, 0, 0], [-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    plain = bias_update(load, rate=1e-3, zero_mean=False)
    torch.testing.assert_close(plain, torch.tensor([[-1e-3, 1e-3, 0, 0], [-1e-3, 1e-3, 1e-3, 1e-3]]), rtol=0, atol=1e-9)
    assert got.dtype == torch.float32


def test_load_stats():
    s = load_stats(torch.tensor([[4.0, 0, 2, 2]]))
    assert s["maxvio"].item() == 1.0 and s["max_over_mean"].item() == 2.0
    assert s["min_over_mean"].item() == 0.0 and s["dead"].item() == 1


def _info(counts):
    c = torch.tensor(counts)
    return RouterInfo(idx_Tk=torch.zeros(1, 1, 2, dtype=torch.long), counts_E=c, logits_TE=torch.zeros(1, len(c)),
                      scores_TE=torch.zeros(1, len(c)))


def test_balancer_accumulates_micro_batches_and_ranks():
    model = Transformer(get_preset("tiny")).init_weights(0)
    bal = ExpertBalancer(model, rate=1e-3, zero_mean=True)
    L = len(bal.routers)
    assert L == 3  # two main MoE layers + one MTP layer, in ModelOutput.router order
    # micro-batch 1 and 2 on this rank; the "other rank" contributes via the reduce function
    bal.accumulate([_info([1, 0, 0, 0, 0, 0, 0, 1])] * L)
    bal.accumulate([_info([1, 0, 0, 0, 0, 0, 0, 1])] * L)
    other = torch.tensor([0, 0, 0, 0, 0, 0, 0, 12.0], dtype=torch.float64)
    load = bal.step(lambda t: t + other)
    # total load per layer: [2,0,0,0,0,0,0,14], mean 2 -> sign = [0,1,1,1,1,1,1,-1], mean 5/8
    want = 1e-3 * (torch.tensor([0, 1, 1, 1, 1, 1, 1, -1.0]) - 5 / 8)
    for r in bal.routers:
        assert r.expert_bias.dtype == torch.float32
        torch.testing.assert_close(r.expert_bias, want, rtol=0, atol=1e-9)
    assert load[0].tolist() == [2, 0, 0, 0, 0, 0, 0, 14]
    assert bal.counts_LE.abs().sum() == 0  # reset for the next step


def test_frozen_and_zero_rate_leave_bias_unchanged():
    for kwargs in ({"rate": 1e-3, "frozen": True}, {"rate": 0.0}):
        model = Transformer(get_preset("tiny")).init_weights(0)
        before = [r.expert_bias.clone() for r in ExpertBalancer(model, 1e-3).routers]
        bal = ExpertBalancer(model, **kwargs)
        bal.accumulate([_info([9, 0, 0, 0, 0, 0, 0, 1])] * len(bal.routers))
        load = bal.step()
        assert load[0, 0] == 9  # still measured and reported
        for r, b in zip(bal.routers, before):
            assert torch.equal(r.expert_bias, b)


def test_expert_bias_is_an_fp32_buffer_outside_the_optimizer():
    model = Transformer(get_preset("tiny")).init_weights(0)
    opt = build_optimizer(model, OptimSection())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            assert id(buf) not in in_opt and buf.dtype == torch.float32
    assert not any(n.endswith("expert_bias") for n, _ in model.named_parameters())
    model.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("expert_bias"))


def test_real_forward_counts_feed_the_update():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).init_weights(0)
    ids = torch.randint(0, 500, (2, 16))
    out = model(ids, mtp=True)
    bal = ExpertBalancer(model, rate=1e-3)
    bal.accumulate(out.router)
    load = bal.step()
    k = model.config.num_experts_per_tok
    assert load.sum(-1).tolist() == [2 * 16 * k] * 3  # every token routed to k experts in each layer
    for r, l in zip(bal.routers, load):
        torch.testing.assert_close(r.expert_bias, bias_update(l[None], 1e-3, True)[0], rtol=0, atol=0)

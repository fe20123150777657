"""Model behaviour beyond the fixtures: expert execution paths, packing masks, per-row KV positions."""

import pytest
import torch
import torch.nn.functional as F

import angelmed.model as M
from angelmed.config import get_preset
from angelmed.model import Experts, Transformer


def naive_experts(e: Experts, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, i in enumerate(idx[t].tolist()):
            h = F.silu(e.gate_proj[i] @ x[t]) * (e.up_proj[i] @ x[t])
            out[t] += w[t, j] * (e.down_proj[i] @ h)
    return out


def random_experts(E: int, D: int, I: int, tokens: int, k: int = 2, seed: int = 0):
    """Experts with weights ~N(0, 0.3) and a routing of `tokens` tokens to k distinct experts each."""
    torch.manual_seed(seed)
    e = Experts(E, D, I)
    for p in e.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, idx, w = torch.randn(tokens, D), torch.randint(0, E, (tokens, k)), torch.rand(tokens, k)
    idx[:, 1] = (idx[:, 0] + 1 + idx[:, 1] % (E - 1)) % E  # distinct experts per token
    return e, x, idx, w


@pytest.mark.parametrize("path", ["gathered", "grouped_mm", "loop"])
def test_expert_paths_equal_per_token_loop(path, monkeypatch):
    e, x, idx, w = random_experts(8, 16, 12, tokens=20, seed=0)
    if path == "loop":
        monkeypatch.setattr(M, "_use_grouped_mm", lambda *a: False)
    got = e._gathered(x, idx, w) if path == "gathered" else e._grouped(x, idx, w)
    torch.testing.assert_close(got, naive_experts(e, x, idx, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["balanced", "skewed", "many rows"])
def test_bf16_cpu_experts_equal_per_token_loop(routing, monkeypatch):
    """bf16 on CPU: experts with few rows each run as three padded batched GEMMs; routing so skewed that padding
    would pass 4x the rows, or more rows an expert than CPU_PADDED_BMM_WORK allows, runs a GEMM per expert. Each
    equals the per-token loop (fp32) within bf16 rounding."""
    e, x, idx, w = random_experts(16, 16, 24, tokens=20, seed=2)
    if routing == "skewed":  # expert 0 takes every token: 16 experts x 20 rows = 8x the 40 pairs
        idx[:, 0], idx[:, 1] = 0, 1 + idx[:, 1] % 15
    if routing == "many rows":  # 2.5 rows an expert x 16 x 24 = 960 > 900
        monkeypatch.setattr(M, "CPU_PADDED_BMM_WORK", 900)
    want = naive_experts(e, x, idx, w)
    padded = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: padded.append(1) or bmm(*a))
    got = e.to(torch.bfloat16)._grouped(x.bfloat16(), idx, w)
    assert bool(padded) == (routing == "balanced")
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("compiled", [False, True])
def test_dense_experts_on_amx_equal_per_token_loop(compiled, monkeypatch):
    """bf16 on a CPU with AMX, past E pairs and within CPU_DENSE_FLOPS: every expert runs on every token and the
    unrouted ones weigh 0; equal to the per-token loop within bf16 rounding, eager and inside a full graph."""
    monkeypatch.setattr(M, "CPU_HAS_AMX", True)
    monkeypatch.setattr(M, "CPU_DENSE_FLOPS", 8 * 12 * 6 * 16 * 24)  # 8 experts (16 -> 24) on 12 tokens
    e, x, idx, w = random_experts(8, 16, 24, tokens=12, seed=3)
    want = naive_experts(e, x, idx, w)
    torch.testing.assert_close(e._dense(x, idx, w), want, rtol=1e-5, atol=1e-5)  # fp32: the same sums
    e = e.to(torch.bfloat16)
    assert e.dense_pays(12, 2, x.device) and not e.dense_pays(13, 2, x.device) and not e.dense_pays(4, 2, x.device)
    dense = []
    run = e._dense
    monkeypatch.setattr(e, "_dense", lambda *a: dense.append(1) or run(*a))
    with torch.no_grad():
        got = (torch.compile(e, fullgraph=True) if compiled else e)(x.bfloat16(), idx, w)
    assert dense
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_write_kv_into_a_cache_slice_bf16():
    """Each row's keys/values land at its own positions of a (non-contiguous) slice of the cache; nothing else
    changes."""
    torch.manual_seed(3)
    full_k, full_v = torch.randn(4, 2, 10, 8).bfloat16(), torch.randn(4, 2, 10, 8).bfloat16()
    want_k, want_v = full_k.clone(), full_v.clone()
    pos = torch.tensor([[0, 1], [5, 6], [2, 3]])
    k, v = torch.randn(3, 2, 2, 8).bfloat16(), torch.randn(3, 2, 2, 8).bfloat16()
    for b in range(3):
        for j in range(2):
            want_k[b, :, pos[b, j]], want_v[b, :, pos[b, j]] = k[b, :, j], v[b, :, j]
    M.write_kv(full_k[:3, :, :8], full_v[:3, :, :8], pos, k, v)
    assert torch.equal(full_k, want_k) and torch.equal(full_v, want_v)


@pytest.mark.parametrize("tokens,dtype", [(3, torch.float32), (20, torch.float32), (20, torch.bfloat16)])
def test_compiled_experts_equal_per_token_loop(tokens, dtype, monkeypatch):
    """Under torch.compile: few pairs take the in-place gather (fused multiply-reduce), many pairs the grouped path
    (on CPU one opaque op, so the graph stays whole in either dtype); all equal the per-token loop."""
    monkeypatch.setattr(M, "CPU_GATHER_BYTES", 0)  # these experts are tiny: fp32 would gather at any count
    e, x, idx, w = random_experts(8, 16, 24, tokens=tokens, seed=1)
    want = naive_experts(e, x, idx, w)
    e, x = e.to(dtype), x.to(dtype)
    assert e.gather_pays(tokens * 2, x.device) == (tokens == 3)
    with torch.no_grad():
        got = torch.compile(e, fullgraph=True)(x, idx, w)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_small_fp32_experts_gather_past_the_expert_count(monkeypatch):
    """fp32 on CPU: past E pairs the compiled layer still reads the pairs' weights in place while they total at most
    CPU_GATHER_BYTES (here 40 pairs of 8 experts, 184 KB), and equals the per-token loop; bf16 does not."""
    e, x, idx, w = random_experts(8, 16, 24, tokens=20, seed=2)
    want = naive_experts(e, x, idx, w)
    pairs_bytes = 40 * 3 * 16 * 24 * 4  # 40 pairs x (gate, up, down) x 16 x 24 fp32
    assert e.gather_pays(40, x.device)
    assert not random_experts(8, 16, 24, tokens=20)[0].to(torch.bfloat16).gather_pays(40, x.device)
    monkeypatch.setattr(M, "CPU_GATHER_BYTES", pairs_bytes - 1)
    assert not e.gather_pays(40, x.device)
    monkeypatch.setattr(M, "CPU_GATHER_BYTES", pairs_bytes)
    gathered, run = [], e._gathered
    monkeypatch.setattr(e, "_gathered", lambda *a: gathered.append(1) or run(*a))
    with torch.no_grad():
        got = torch.compile(e, fullgraph=True)(x, idx, w)
    assert gathered
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_sequences():
    model = Transformer(get_preset("tiny")).init_weights(3).eval()
    a, b = torch.randint(0, 500, (1, 7)), torch.randint(0, 500, (1, 5))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    seg = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, pos_BT=pos, segment_BT=seg).logits
        ref = torch.cat([model(a).logits, model(b).logits], 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_at_different_positions():
    """Continuous batching: each cache row writes and attends at its own positions."""
    model = Transformer(get_preset("tiny")).init_weights(4).eval()
    a, b = torch.randint(0, 500, (1, 9)), torch.randint(0, 500, (1, 4))
    caches = model.make_caches(2, 16)
    with torch.no_grad():
        # prefill row 0 with 9 tokens and row 1 with 4 tokens in two calls, then one batched decode step
        model(a, pos_BT=torch.arange(9)[None], caches=[_Row(c, 0) for c in caches])
        model(b, pos_BT=torch.arange(4)[None], caches=[_Row(c, 1) for c in caches])
        nxt = torch.tensor([[11], [22]])
        step = model(nxt, pos_BT=torch.tensor([[9], [4]]), caches=caches).logits[:, -1]
        ref_a = model(torch.cat([a, nxt[:1]], 1)).logits[:, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1)).logits[:, -1]
    torch.testing.assert_close(step, torch.cat([ref_a, ref_b]), rtol=1e-5, atol=1e-5)


class _Row:
    """One row of a batched cache (what an engine does when a request joins a running batch)."""

    def __init__(self, cache, row):
        self.cache, self.row = cache, row
        self.k = cache.k[row:row + 1]

    def update(self, pos, k, v):
        kk, vv = self.cache.k[self.row:self.row + 1], self.cache.v[self.row:self.row + 1]
        idx = pos[:, None, :, None].expand_as(k)
        kk.scatter_(2, idx, k)
        vv.scatter_(2, idx, v)
        return kk, vv


def test_forced_routing_replays_experts():
    model = Transformer(get_preset("tiny")).init_weights(5).eval()
    ids = torch.randint(0, 500, (2, 6))
    with torch.no_grad():
        first = model(ids)
        forced = [torch.flip(r.idx_Tk, [-1]) for r in first.router]  # same sets, other order
        replay = model(ids, forced_routing=forced)
        other = [(r.idx_Tk + 1) % 8 for r in first.router]
        moved = model(ids, forced_routing=other)
    torch.testing.assert_close(replay.logits, first.logits, rtol=1e-5, atol=1e-5)
    for r, f in zip(moved.router, other):
        assert torch.equal(r.idx_Tk, f)
    assert (moved.logits - first.logits).abs().max() > 1e-4


def test_router_counts_and_gradients_flow():
    model = Transformer(get_preset("tiny")).init_weights(6)
    ids = torch.randint(0, 500, (2, 10))
    out = model(ids, mtp=True)
    assert [int(r.counts_E.sum()) for r in out.router] == [2 * 10 * 2] * len(out.router)
    (out.logits.logsumexp(-1).mean() + out.mtp_logits[0].mean()).backward()
    layer = model.model.layers[1].mlp
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_proj.grad.abs().sum() > 0
    assert layer.gate.expert_bias.grad is None  # a buffer: balanced by the update rule, not by gradients

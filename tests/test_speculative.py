"""Speculative decoding: greedy identical to plain decoding, exact sampling distribution, MTP drafts."""

import numpy as np
import pytest
import torch

from angelmed.checkpoint import load_model
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.speculative import LMDrafter, MTPDrafter, accept_drafts
from test_engine import greedy_ref, prompts, tiny_model



@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculative_greedy_equals_plain(model, k):
    ps = prompts(5, seed=11)
    eng = Engine(model, max_batch=3, max_seq_len=96, draft=MTPDrafter(model), spec_tokens=k)
    handles = []
    for p in ps:  # staggered: requests join while others are mid-generation
        handles.append(eng.submit(GenerationRequest(p, max_tokens=15, stop_ids=[])))
        eng.step()
    while eng.has_work():
        eng.step()
    for p, h in zip(ps, handles):
        assert h.result().token_ids == greedy_ref(model, p, 15)
    st = eng.spec.stats
    assert st.rounds > 0 and st.drafted == k * st.rounds and sum(st.accepted_hist) == st.rounds


def check_prefix_reuse_with_draft(model, make_drafter, ps, k=3):
    """Chat A ends while chat B decodes speculatively beside A's idle slot (whose rows write the target's
    positions 0..k and the drafter's up to 2k-1); A's next turn reuses the slot. Greedy output stays plain greedy,
    and the drafts (accepted counts per round) and log-probs equal an engine that prefills everything: the
    drafter's own cached entries were carried over and the clobbered head recomputed."""
    chat, other, new_turn = ps[0] + ps[1], ps[2], ps[3]
    eng = Engine(model, max_batch=2, max_seq_len=192, draft=make_drafter(), spec_tokens=k)
    a1, _ = eng.generate([GenerationRequest(chat, max_tokens=7, stop_ids=[]),
                          GenerationRequest(other, max_tokens=40, stop_ids=[])])
    turn2 = chat + a1.token_ids + new_turn
    runs = []
    for e in (eng, Engine(model, max_batch=2, max_seq_len=192, draft=make_drafter(), spec_tokens=k,
                          prefix_reuse=False)):
        e.spec.reset_stats()
        r = e.generate([GenerationRequest(turn2, max_tokens=20, stop_ids=[], logprobs=True)])[0]
        runs.append((r, e.spec.stats.accepted_hist))
    (got, hist), (want, want_hist) = runs
    head = 2 * (k + 1)  # recomputed; the tail starts one position early, at r - 1
    assert len(chat) - 1 - head <= got.cached_tokens <= len(chat) + len(a1.token_ids) - 2 - head
    assert got.cached_tokens > 0 and want.cached_tokens == 0
    assert got.token_ids == want.token_ids == greedy_ref(model, turn2, 20)
    assert hist == want_hist
    assert max(abs(x - y) for x, y in zip(got.logprobs, want.logprobs)) < 1e-5
    return hist


def test_mtp_drafts_with_prefix_reuse_equal_a_full_prefill(model):
    hist = check_prefix_reuse_with_draft(model, lambda: MTPDrafter(model), prompts(4, seed=21))
    assert sum(hist) > 0


def test_lm_drafter_with_prefix_reuse_still_accepts_everything(model):
    """The target as its own LM draft: with its cached prefix carried over, every draft still passes (a wrong
    entry in the drafter's cache would make drafts the target rejects)."""
    hist = check_prefix_reuse_with_draft(model, lambda: LMDrafter(model), prompts(4, seed=22))
    assert sum(hist[:-1]) == 0 and hist[-1] > 0


def test_rows_moved_by_compaction_keep_their_drafter_cache(model):
    """Short replies end and the long ones move down into their slots, taking the drafter's K/V along: with the
    target as its own draft every draft is still accepted (a row reading another row's drafter cache would
    propose tokens the target rejects), and each reply is plain greedy."""
    ps = prompts(4, seed=23)
    lengths = [5, 30, 3, 26]
    eng = Engine(model, max_batch=4, max_seq_len=96, draft=LMDrafter(model), spec_tokens=3)
    res = eng.generate([GenerationRequest(p, max_tokens=n, stop_ids=[]) for p, n in zip(ps, lengths)])
    assert [r.token_ids for r in res] == [greedy_ref(model, p, n) for p, n in zip(ps, lengths)]
    hist = eng.spec.stats.accepted_hist
    assert sum(hist[:-1]) == 0 and hist[-1] > 0
    assert eng.cached_ids[0] == (ps[1] + res[1].token_ids)[:-1]  # the longest reply ended in slot 0


def test_compiled_speculative_rounds_match_eager(model):
    """Engine(compile=True): a round (drafts, verify, acceptance) runs as one compiled graph; greedy output is
    still plain greedy, and seeded sampling gives the eager speculative engine's tokens. After warm_up(), rounds
    at other cache lengths compile nothing more (a graph per length once cost a server minutes of compiling)."""
    from torch._dynamo.utils import counters

    p = prompts(1, seed=14)[0]
    long = (prompts(1, seed=15)[0] * 60)[:120]  # its rounds cross cache lengths 128 and 192
    eng = Engine(model, max_batch=1, max_seq_len=240, draft=MTPDrafter(model), spec_tokens=2, compile=True)
    compiled, calls = eng.spec._round_compiled, []
    eng.spec._round_compiled = lambda *a: calls.append(1) or compiled(*a)
    eng.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    for q, n in ((p, 12), (long, 40)):
        assert eng.generate([GenerationRequest(q, max_tokens=n, stop_ids=[])])[0].token_ids == greedy_ref(model, q, n)
    assert calls, "the compiled round never ran"
    assert counters["stats"]["unique_graphs"] == graphs, "a round compiled again after warm_up()"
    sampled = lambda: [GenerationRequest(p, max_tokens=12, stop_ids=[], temperature=0.8, top_k=40,  # noqa: E731
                                         seed=3)]
    eager = Engine(model, max_batch=1, max_seq_len=96, draft=MTPDrafter(model), spec_tokens=2)
    assert eng.generate(sampled())[0].token_ids == eager.generate(sampled())[0].token_ids


def test_self_draft_accepts_everything_and_stays_exact(model):
    # the target as its own draft: p == q, so every draft must pass (greedy and sampled) and output is unchanged
    ps = prompts(3, seed=12)
    eng = Engine(model, max_batch=4, max_seq_len=96, draft=LMDrafter(model), spec_tokens=3)
    res = eng.generate([GenerationRequest(p, max_tokens=13, stop_ids=[]) for p in ps])
    assert [r.token_ids for r in res] == [greedy_ref(model, p, 13) for p in ps]
    assert eng.spec.stats.acceptance_rate == 1.0
    sampled = eng.generate([GenerationRequest(p, max_tokens=13, stop_ids=[], temperature=0.9, top_k=30, seed=5,
                                              repetition_penalty=1.2) for p in ps])
    assert eng.spec.stats.acceptance_rate == 1.0 and all(len(r.token_ids) == 13 for r in sampled)


def test_mtp_drafts_match_the_model_mtp_head(model):
    """The first draft of every round = argmax of the MTP logits of a full forward over the committed text."""
    seen = []

    class Recording(MTPDrafter):
        def propose(self, st, k):
            d, q = super().propose(st, k)
            seen.append((int(st.pos_BL[0, st.len_B[0] - 1]) + 1, int(d[0, 0])))
            return d, q

    p = prompts(1, seed=13)[0]
    eng = Engine(model, max_batch=1, max_seq_len=96, draft=Recording(model), spec_tokens=2)
    out = eng.generate([GenerationRequest(p, max_tokens=12, stop_ids=[])])[0].token_ids
    seq = p + out
    with torch.no_grad():
        for pos, d1 in seen:
            mtp = model(torch.tensor([seq[:pos + 1]]), mtp=True).mtp_logits[0]
            assert int(mtp[0, pos - 1].argmax()) == d1


def test_fixture_greedy_with_mtp_speculation(fixtures_dir):
    for name in ["tiny_mtp", "tiny_groups_sharded"]:
        d = fixtures_dir / name
        m = load_model(d, dtype="float32")
        ids, want = np.load(d / "ids.npy"), np.load(d / "greedy_tokens.npy")
        eng = Engine(m, max_batch=2, draft=MTPDrafter(m), spec_tokens=2)
        res = eng.generate([GenerationRequest([int(t) for t in row], max_tokens=want.shape[1], stop_ids=[])
                            for row in ids])
        assert [r.token_ids for r in res] == want.tolist(), name


def test_rejection_sampling_reproduces_target_distribution():
    # k = 2 drafts from q; the first emitted token must follow p_0 exactly, the second p_1 given the first.
    V, N = 5, 60000
    g = torch.Generator().manual_seed(0)
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p1 = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])
    q0 = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
    q1 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    d0 = torch.multinomial(q0, N, replacement=True, generator=g)
    d1 = torch.multinomial(q1, N, replacement=True, generator=g)
    # target: p at verified positions (p1 does not depend on the first token here; p2 = bonus distribution)
    p = torch.stack([p0, p1, p0]).expand(N, 3, V)
    q = torch.stack([q0, q1]).expand(N, 2, V)
    toks, a = accept_drafts(p, torch.stack([d0, d1], 1), q, torch.arange(N), torch.zeros(N, dtype=torch.long))
    f0 = torch.bincount(toks[:, 0], minlength=V).float() / N
    assert torch.allclose(f0, p0, atol=0.01), f0
    mask = a >= 1  # the second token was emitted: it must follow p1
    f1 = torch.bincount(toks[mask, 1], minlength=V).float() / mask.sum()
    assert torch.allclose(f1, p1, atol=0.015), f1
    # acceptance of the first draft: sum_x min(p0, q0)
    assert abs((a >= 1).float().mean().item() - torch.minimum(p0, q0).sum().item()) < 0.01


def test_mtp_draft_vocabulary_keeps_output_and_drafts_only_its_ids(model):
    """An MTP drafter restricted to a draft vocabulary (FR-Spec style) drafts only those target ids, and greedy
    output stays the plain output; with every id in it, it drafts exactly as the full head does."""
    V = model.config.vocab_size
    ps = prompts(3, seed=31)
    plain = Engine(model, max_batch=3, max_seq_len=96).generate([GenerationRequest(p, max_tokens=16) for p in ps])
    drafted = []

    class Recording(MTPDrafter):
        def propose(self, st, k):
            d, q = super().propose(st, k)
            drafted.extend(d.flatten().tolist())
            return d, q

    def serve(vocab_map):
        eng = Engine(model, max_batch=3, max_seq_len=96, draft=Recording(model, vocab_map=vocab_map), spec_tokens=3)
        out = eng.generate([GenerationRequest(p, max_tokens=16) for p in ps])
        assert [r.token_ids for r in out] == [r.token_ids for r in plain]
        return eng.spec.stats.accepted_hist

    full = serve(None)
    drafted.clear()
    assert serve(torch.arange(V)) == full
    drafted.clear()
    serve(torch.arange(0, V, 2))
    assert drafted and all(d % 2 == 0 for d in drafted)
    with pytest.raises(ValueError, match="draft vocabulary"):
        MTPDrafter(model, vocab_map=torch.tensor([0, V]))


@pytest.mark.parametrize("kind", ["mtp", "lm"])
def test_drafters_absorb_long_prompts_in_chunks(model, kind):
    """Prefill in chunks (max_prefill_tokens below the prompt lengths) feeds the drafter the whole prompt: greedy
    output stays plain greedy and every round drafts as with a one-forward prefill (the target as its own LM draft
    still passes every draft)."""
    ps = [p * 4 for p in prompts(3, seed=33)]
    hists = []
    for budget in (12, 8192):
        drafter = MTPDrafter(model) if kind == "mtp" else LMDrafter(model)
        eng = Engine(model, max_batch=3, max_seq_len=160, draft=drafter, spec_tokens=3, max_prefill_tokens=budget)
        res = eng.generate([GenerationRequest(p, max_tokens=10, stop_ids=[]) for p in ps])
        assert [r.token_ids for r in res] == [greedy_ref(model, p, 10) for p in ps]
        hists.append(eng.spec.stats.accepted_hist)
    assert hists[0] == hists[1]
    if kind == "lm":
        assert sum(hists[0][:-1]) == 0


@pytest.mark.parametrize("kind", ["mtp", "lm"])
def test_a_long_prompt_prefills_between_speculative_rounds(model, kind):
    """The same with speculation: the other row's rounds (which also run the idle prefilling row, writing its
    first k+1 positions) do not disturb the prompt being prefilled, nor the drafter's entries for it."""
    from test_engine import check_long_prompt_prefills_between_steps

    make = lambda: Engine(model, max_batch=2, max_seq_len=256, max_prefill_tokens=16,  # noqa: E731
                          draft=MTPDrafter(model) if kind == "mtp" else LMDrafter(model), spec_tokens=3)
    eng = check_long_prompt_prefills_between_steps(model, make)
    if kind == "lm":  # the target as its own draft: every draft passes unless a cache entry is wrong
        assert sum(eng.spec.stats.accepted_hist[:-1]) == 0

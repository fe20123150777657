"""Engine: greedy parity with fixtures and generate(), batching invariance, sampling, stops, cancel."""

import asyncio

import numpy as np
import pytest
import torch

from angelmed.checkpoint import load_model
from angelmed.config import get_preset
from angelmed.infer.engine import (Engine, GenerationRequest, QueueFull, pick_tokens, uniform_noise)
from angelmed.infer.generate import generate
from angelmed.model import Transformer



class ByteTokenizer:
    """Minimal test tokenizer: ids 0..255 are bytes, then the Ling special tokens; other ids decode to ''."""
    SPECIALS = ["<|endoftext|>", "<|role_end|>", "<role>", "</role>"]

    def __init__(self):
        self.eod_id, self.role_end_id = 256, 257
        self.stop_ids = [self.role_end_id, self.eod_id]
        self.vocab_size = 260

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for k, sp in enumerate(self.SPECIALS):
                if text.startswith(sp, i):
                    out.append(256 + k)
                    i += len(sp)
                    break
            else:
                out.extend(text[i].encode())
                i += 1
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        parts, buf = [], bytearray()
        for t in ids:
            if t < 256:
                buf.append(t)
                continue
            parts.append(buf.decode(errors="replace"))
            buf = bytearray()
            if 256 <= t < 260 and not skip_special_tokens:
                parts.append(self.SPECIALS[t - 256])
        parts.append(buf.decode(errors="replace"))
        return "".join(parts)

    def render_chat(self, messages, tools=None, add_generation_prompt=False) -> str:
        roles = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT", "tool": "OBSERVATION"}
        out = "<role>SYSTEM</role>"
        if messages and messages[0]["role"] == "system":
            out += messages[0]["content"] + "\n"
            messages = messages[1:]
        out += "detailed thinking off<|role_end|>"
        for m in messages:
            out += f"<role>{roles[m['role']]}</role>{m['content']}<|role_end|>"
        return out + ("<role>ASSISTANT</role>" if add_generation_prompt else "")


def tiny_model(seed: int = 0) -> Transformer:
    return Transformer(get_preset("tiny")).init_weights(seed).eval()


def prompts(n: int, seed: int = 1, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 20, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def greedy_ref(model, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), n)[0].tolist()


@pytest.mark.parametrize("name", ["tiny_mtp", "small_fp8", "tiny_yarn"])
def test_greedy_matches_fixture(fixtures_dir, name):
    d = fixtures_dir / name
    m = load_model(d, dtype="float32")
    ids, want = np.load(d / "ids.npy"), np.load(d / "greedy_tokens.npy")
    eng = Engine(m, max_batch=2)
    res = eng.generate([GenerationRequest([int(t) for t in row], max_tokens=want.shape[1], stop_ids=[])
                        for row in ids])
    assert [r.token_ids for r in res] == want.tolist()
    assert all(r.finish_reason == "length" for r in res)


def test_batched_equals_one_by_one_and_generate(model):
    ps = prompts(6)
    eng = Engine(model, max_batch=4, max_seq_len=64)  # 6 requests > 4 slots: some wait in the queue
    batched = eng.generate([GenerationRequest(p, max_tokens=12, stop_ids=[]) for p in ps])
    single = Engine(model, max_batch=1, max_seq_len=64)
    for p, r in zip(ps, batched):
        alone = single.generate([GenerationRequest(p, max_tokens=12, stop_ids=[])])[0]
        assert r.token_ids == alone.token_ids == greedy_ref(model, p, 12)


def test_staggered_arrivals_equal_isolated_runs(model):
    ps = prompts(5, seed=2)
    eng = Engine(model, max_batch=3, max_seq_len=64)
    handles = [eng.submit(GenerationRequest(ps[0], max_tokens=10, stop_ids=[]))]
    for p in ps[1:]:  # a new request arrives every two steps while others decode
        eng.step()
        eng.step()
        handles.append(eng.submit(GenerationRequest(p, max_tokens=7 + len(p) % 5, stop_ids=[])))
    while eng.has_work():
        eng.step()
    for p, h in zip(ps, handles):
        assert h.result().token_ids == greedy_ref(model, p, h.request.max_tokens)
    assert eng.metrics.requests_finished == 5 and eng.metrics.active_slots == 0


def test_seeded_sampling_reproducible_and_batch_independent(model):
    p = prompts(1, seed=3)[0]
    req = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, stop_ids=[])
    eng = Engine(model, max_batch=4, max_seq_len=64)
    a = eng.generate([GenerationRequest(p, seed=7, **req)])[0].token_ids
    others = [GenerationRequest(q, seed=i, **req) for i, q in enumerate(prompts(3, seed=4))]
    b = eng.generate(others[:2] + [GenerationRequest(p, seed=7, **req)] + others[2:])[2].token_ids
    c = eng.generate([GenerationRequest(p, seed=8, **req)])[0].token_ids
    assert a == b
    assert a != c
    assert a != greedy_ref(model, p, 16)


def test_sampler_draws_from_the_softmax():
    # 4-way distribution; 40000 independent (seed, counter) draws; frequencies must match softmax(logits / T)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4)
    n = logits.shape[0]
    temp = torch.full((n,), 0.7)
    tok = pick_tokens(logits, temp, torch.zeros(n, dtype=torch.long), torch.ones(n), torch.arange(n),
                      torch.zeros(n, dtype=torch.long), sample=True, filt=False)
    freq = torch.bincount(tok, minlength=4).float() / n
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]) / 0.7, -1)
    assert torch.allclose(freq, want, atol=0.01), (freq, want)
    # top-k 2: only the two best tokens, renormalised
    tok = pick_tokens(logits, temp, torch.full((n,), 2), torch.ones(n), torch.arange(n),
                      torch.ones(n, dtype=torch.long), sample=True, filt=True)
    freq = torch.bincount(tok, minlength=4).float() / n
    w2 = torch.softmax(torch.tensor([2.0, 1.0]) / 0.7, -1)
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], w2, atol=0.01)
    u = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.long), 0, 1000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_stop_ids(model):
    p = prompts(1, seed=5)[0]
    full = greedy_ref(model, p, 20)
    stop = full[6]
    first = full.index(stop)
    eng = Engine(model, max_batch=2, max_seq_len=64)
    r = eng.generate([GenerationRequest(p, max_tokens=20, stop_ids=[stop])])[0]
    assert r.token_ids == full[:first + 1] and r.finish_reason == "stop" and r.stop_reason == stop
    # default stop ids come from the tokenizer
    tok = ByteTokenizer()
    tok.stop_ids = [stop]
    r = Engine(model, tokenizer=tok, max_batch=2, max_seq_len=64).generate([GenerationRequest(p, max_tokens=20)])[0]
    assert r.token_ids == full[:first + 1] and r.finish_reason == "stop"


def test_stop_strings_and_streaming_hold_back():
    tok = ByteTokenizer()
    model = tiny_model(3)
    with torch.no_grad():  # make the model speak mostly printable bytes so the text has substance
        model.lm_head.weight[128:] -= 1.0
    eng = Engine(model, tokenizer=tok, max_batch=2, max_seq_len=96)
    p = tok.encode("Hello, how are")
    ref = eng.generate([GenerationRequest(p, max_tokens=40, stop_ids=[])])[0]
    text = ref.text
    assert len(text) >= 10, text
    stop = text[5:8]
    want = text[:text.find(stop)]
    deltas = list(eng.stream_sync(GenerationRequest(p, max_tokens=40, stop=[stop], stop_ids=[])))
    streamed = "".join(d.text for d in deltas)
    assert streamed == want
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)
    r = eng.generate([GenerationRequest(p, max_tokens=40, stop=[stop], stop_ids=[])])[0]
    assert r.text == want and r.stop_reason == stop and r.finish_reason == "stop"


def test_logprobs_match_full_forward(model):
    p = prompts(1, seed=6)[0]
    r = Engine(model, max_batch=2, max_seq_len=64).generate(
        [GenerationRequest(p, max_tokens=8, temperature=0.8, seed=1, logprobs=True, stop_ids=[])])[0]
    ids = torch.tensor([p + r.token_ids])
    with torch.no_grad():
        lsm = model(ids).logits[0].log_softmax(-1)
    want = [lsm[len(p) - 1 + j, t].item() for j, t in enumerate(r.token_ids)]
    assert np.allclose(r.logprobs, want, atol=1e-4)


def test_top_logprobs_are_the_most_likely_tokens(model):
    """Beside a request without them (the batch computes the larger n), each row gets exactly its own n
    alternatives per step: the full forward's n most likely tokens with their log-probs."""
    ps = prompts(2, seed=7)
    eng = Engine(model, max_batch=2, max_seq_len=64)
    r, other = eng.generate([
        GenerationRequest(ps[0], max_tokens=6, temperature=0.7, seed=2, logprobs=True, top_logprobs=3, stop_ids=[]),
        GenerationRequest(ps[1], max_tokens=6, logprobs=True, top_logprobs=5, stop_ids=[])])
    assert other.top_logprobs is not None and all(len(t) == 5 for t in other.top_logprobs)
    with torch.no_grad():
        lsm = model(torch.tensor([ps[0] + r.token_ids])).logits[0].log_softmax(-1)
    assert len(r.top_logprobs) == len(r.token_ids) == 6
    for j, top in enumerate(r.top_logprobs):
        vals, ids = lsm[len(ps[0]) - 1 + j].topk(3)
        assert [t for t, _ in top] == ids.tolist()
        assert np.allclose([v for _, v in top], vals.tolist(), atol=1e-4)
    plain = eng.generate([GenerationRequest(ps[0], max_tokens=2, logprobs=True, stop_ids=[])])[0]
    assert plain.top_logprobs is None
    with pytest.raises(ValueError, match="top_logprobs"):
        eng.submit(GenerationRequest(ps[0], top_logprobs=3))


def test_repetition_penalty_matches_hand_rule(model):
    p = prompts(1, seed=7)[0]
    ids = list(p)
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            for t in set(ids):
                logits[t] = logits[t] / 1.3 if logits[t] > 0 else logits[t] * 1.3
            ids.append(int(logits.argmax()))
    r = Engine(model, max_batch=2, max_seq_len=64).generate(
        [GenerationRequest(p, max_tokens=10, repetition_penalty=1.3, stop_ids=[])])[0]
    assert r.token_ids == ids[len(p):]


def test_context_limit_cancel_and_queue(model):
    eng = Engine(model, max_batch=2, max_seq_len=32, max_queue=2)
    r = eng.generate([GenerationRequest(list(range(28)), max_tokens=100, stop_ids=[])])[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 4
    with pytest.raises(ValueError, match="prompt_ids"):
        eng.submit(GenerationRequest(list(range(32))))
    with pytest.raises(ValueError, match="temperature"):
        eng.submit(GenerationRequest([1, 2], temperature=-1))
    h1 = eng.submit(GenerationRequest([1, 2, 3], max_tokens=20, stop_ids=[]))
    h2 = eng.submit(GenerationRequest([4, 5, 6], max_tokens=20, stop_ids=[]))
    with pytest.raises(QueueFull):
        eng.submit(GenerationRequest([7]))
    eng.step()
    eng.step()
    assert eng.metrics.active_slots == 2
    eng.cancel(h1.request_id)
    eng.step()
    got = h1.result().token_ids
    assert h1.result().finish_reason == "cancelled" and 0 < len(got) < 20
    assert got == greedy_ref(model, [1, 2, 3], len(got))
    assert eng.metrics.active_slots == 1 and eng.metrics.requests_cancelled == 1
    while eng.has_work():
        eng.step()
    assert h2.result().token_ids == greedy_ref(model, [4, 5, 6], 20)


def test_runner_thread_and_async_stream(model):
    eng = Engine(model, max_batch=4, max_seq_len=64).start()
    try:
        ps = prompts(3, seed=8)
        res = eng.generate([GenerationRequest(p, max_tokens=6, stop_ids=[]) for p in ps])
        assert [r.token_ids for r in res] == [greedy_ref(model, p, 6) for p in ps]

        async def collect():
            out = []
            async for d in eng.stream(GenerationRequest(ps[0], max_tokens=6, stop_ids=[])):
                out += d.token_ids
            return out

        assert asyncio.run(collect()) == res[0].token_ids
    finally:
        eng.shutdown()
    assert not eng.running


def test_backends_chat_and_loglik(tmp_path, model):
    from angelmed.checkpoint import save_model
    from angelmed.infer.backends import local_chat_backend, local_loglik_backend

    save_model(model, tmp_path / "m")
    tok = ByteTokenizer()
    chat = local_chat_backend(tmp_path / "m", tokenizer=tok, max_batch=2, max_seq_len=128)
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Headache?"}]]
    replies = chat.generate(convs, max_tokens=5, temperature=0.0)
    for conv, reply in zip(convs, replies):
        ids = tok.encode(tok.render_chat(conv, add_generation_prompt=True))
        want = [t for t in greedy_ref(model, ids, 5)]
        cut = next((k for k, t in enumerate(want) if t in tok.stop_ids), len(want))
        assert reply == tok.decode(want[:cut], skip_special_tokens=True)

    ll = local_loglik_backend(tmp_path / "m", tokenizer=tok, batch_size=2)
    reqs = [([1, 2, 3], [4, 5]), ([7] * 10, [8]), ([9, 9], [1, 2, 3, 4])]
    got = ll.loglik(reqs)
    with torch.no_grad():
        for (ctx, cont), g in zip(reqs, got):
            lsm = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            want = sum(lsm[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
            assert abs(g - want) < 1e-4
    assert ll.tokenizer is tok


def test_compiled_decode_step_matches_eager(model, monkeypatch):
    """Engine(compile=True) gives the eager greedy tokens (seeded sampling: the next test) and really runs the
    compiled step. warm_up() compiles every graph a batch of up to max_batch rows needs: decoding at each row count
    compiles nothing more, past the count where the MoE layers stop reading each (token, expert) pair's weights in
    place and group the pairs too (with no fp32 gather budget: past E = 8 pairs, i.e. 5 rows at k = 2). A server
    used to stall there for a compile."""
    import angelmed.model as model_module
    from torch._dynamo.utils import counters

    monkeypatch.setattr(model_module, "CPU_GATHER_BYTES", 0)
    ps = prompts(6, seed=9)
    eng = Engine(model, max_batch=6, max_seq_len=96, compile=True)
    assert eng.graph_rows() == [1, 2, 5]
    compiled, calls = eng._decode_compiled, []
    eng._decode_compiled = lambda *a: calls.append(a[1]) or compiled(*a)
    eng.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    for rows in range(1, 7):
        greedy = eng.generate([GenerationRequest(p, max_tokens=6 + 40 * (i == 0), stop_ids=[])
                               for i, p in enumerate(ps[:rows])])
    assert set(calls) == set(range(1, 7)), "the compiled decode step did not run at every row count"
    assert counters["stats"]["unique_graphs"] == graphs, "a batch compiled again after warm_up()"
    assert [r.token_ids for r in greedy] == [greedy_ref(model, p, 6 + 40 * (i == 0)) for i, p in enumerate(ps)]


def test_compiled_step_returns_the_eager_logprobs_and_routing(model):
    """The compiled step's extras equal the eager step's: each token's log-prob and top alternatives, repetition
    penalties, and the expert ids that GRPO's routing replay records (graphs the greedy test never builds)."""
    ps = prompts(2, seed=4)
    reqs = lambda: [GenerationRequest(ps[0], max_tokens=6, stop_ids=[], logprobs=True, top_logprobs=3,  # noqa: E731
                                      repetition_penalty=1.3, record_routing=True),
                    GenerationRequest(ps[1], max_tokens=6, stop_ids=[], temperature=0.8, top_k=5, seed=3,
                                      repetition_penalty=1.1)]
    got = Engine(model, max_batch=2, max_seq_len=64, compile=True).generate(reqs())
    want = Engine(model, max_batch=2, max_seq_len=64).generate(reqs())
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-5)
    assert [[t for t, _ in top] for top in got[0].top_logprobs] == [[t for t, _ in top] for top in want[0].top_logprobs]
    assert len(got[0].routing) == len(want[0].routing) > 0
    assert all(torch.equal(a, b) for a, b in zip(got[0].routing, want[0].routing))


def test_fp8_fixture_through_the_engine_with_resident_fp8_weights(fixtures_dir):
    """The FP8 checkpoint served with its weights kept in FP8 (the mode for one 141 GB GPU) gives the fixture tokens."""
    from angelmed.infer.quant import FP8Linear, load_fp8

    d = fixtures_dir / "small_fp8"
    m = load_fp8(d, mode="resident", dtype="float32")
    assert isinstance(m.model.layers[0].attention.query_key_value, FP8Linear)
    assert m.model.layers[0].attention.query_key_value.weight.dtype == torch.float8_e4m3fn
    ids, want = np.load(d / "ids.npy"), np.load(d / "greedy_tokens.npy")
    res = Engine(m, max_batch=2).generate([GenerationRequest([int(t) for t in row], max_tokens=want.shape[1],
                                                             stop_ids=[]) for row in ids])
    assert [r.token_ids for r in res] == want.tolist()


def test_weights_loaded_in_place_drop_the_cached_prefixes():
    """After an in-place weight update (a GRPO sync, a hot reload) no prompt reuses K/V cached from the old weights:
    the same prompts decode as a fresh engine on the new weights does."""
    model, other = tiny_model(0), tiny_model(1)
    eng = Engine(model, max_batch=2, max_seq_len=64)
    ps = prompts(2, seed=21)
    reqs = lambda: [GenerationRequest(p, max_tokens=6, stop_ids=[], logprobs=True) for p in ps]  # noqa: E731
    before = eng.generate(reqs())
    model.load_state_dict(other.state_dict())
    got, want = eng.generate(reqs()), Engine(other, max_batch=2, max_seq_len=64).generate(reqs())
    assert [r.cached_tokens for r in got] == [0, 0]
    assert [r.token_ids for r in got] == [r.token_ids for r in want] != [r.token_ids for r in before]
    assert [r.logprobs for r in got] == [r.logprobs for r in want]


def test_prefix_reuse_prefills_only_the_new_turn(model):
    """Chat A's next turn reuses A's slot while chat B decoded beside the idle slot (whose decode writes land on
    position 0): same tokens as an independent full-prompt greedy decode, log-probs as a no-reuse engine."""
    ps = prompts(3, seed=9)
    eng = Engine(model, max_batch=2, max_seq_len=128)
    a1, _ = eng.generate([GenerationRequest(ps[0], max_tokens=6, stop_ids=[]),
                          GenerationRequest(ps[1], max_tokens=30, stop_ids=[])])
    turn2 = ps[0] + a1.token_ids + ps[2]
    a2 = eng.generate([GenerationRequest(turn2, max_tokens=12, stop_ids=[], logprobs=True)])[0]
    assert a2.cached_tokens == len(ps[0]) + len(a1.token_ids) - 2  # every fed token but position 0
    assert eng.metrics.prompt_tokens_cached == a2.cached_tokens
    assert a2.token_ids == greedy_ref(model, turn2, 12)
    fresh = Engine(model, max_batch=2, max_seq_len=128, prefix_reuse=False)
    want = fresh.generate([GenerationRequest(turn2, max_tokens=12, stop_ids=[], logprobs=True)])[0]
    assert want.cached_tokens == 0
    assert max(abs(x - y) for x, y in zip(a2.logprobs, want.logprobs)) < 1e-5


def test_prefix_reuse_beside_fresh_prompts_in_one_prefill(model):
    ps = prompts(4, seed=10)
    eng = Engine(model, max_batch=4, max_seq_len=128)
    first = eng.generate([GenerationRequest(ps[0], max_tokens=8, stop_ids=[])])[0]
    cont = ps[0] + first.token_ids + ps[1]
    todo = [ps[2], cont, ps[3]]  # the unrelated prompts must not evict the cached chat: empty slots go first
    res = eng.generate([GenerationRequest(p, max_tokens=8, stop_ids=[]) for p in todo])
    assert [r.cached_tokens for r in res] == [0, len(ps[0]) + len(first.token_ids) - 2, 0]
    for p, r in zip(todo, res):
        assert r.token_ids == greedy_ref(model, p, 8)


def test_identical_prompts_prefill_once_and_sample_independently(model, monkeypatch):
    """A GRPO-style group: 4 samples of one prompt beside another prompt. The prefill runs one row per distinct
    prompt; every sample equals its own solo run (tokens and recorded routing), and the seeds still differ."""
    p, q = prompts(2, seed=11)
    req = dict(max_tokens=10, temperature=1.0, top_k=40, stop_ids=[], record_routing=True)
    eng = Engine(model, max_batch=6, max_seq_len=64)
    prefill_rows = []
    real = model.forward

    def spy(ids, *a, **k):
        if ids.shape[1] > 1:
            prefill_rows.append(ids.shape[0])
        return real(ids, *a, **k)

    monkeypatch.setattr(model, "forward", spy)
    group = eng.generate([GenerationRequest(p, seed=s, **req) for s in range(4)] + [GenerationRequest(q, seed=9, **req)])
    assert sum(prefill_rows) == 2  # one row per distinct prompt (in forwards grouped by length)
    solo = Engine(model, max_batch=1, max_seq_len=64)
    for s, r in enumerate(group[:4]):
        alone = solo.generate([GenerationRequest(p, seed=s, **req)])[0]
        assert r.token_ids == alone.token_ids
        assert all(torch.equal(a, b) for a, b in zip(r.routing, alone.routing))
    assert group[4].token_ids == solo.generate([GenerationRequest(q, seed=9, **req)])[0].token_ids
    assert len({tuple(r.token_ids) for r in group[:4]}) > 1


def test_prefill_groups_rows_of_similar_length():
    from angelmed.infer.engine import prefill_groups

    none = [(-1, 0)] * 5
    # longest first; a row joins a forward while it is at least half that forward's longest
    assert prefill_groups([200, 42, 100, 100, 60], [0, 1, 2, 3, 4], none) == [[0, 2, 3], [4, 1]]
    assert prefill_groups([7], [3], [(-1, 0)]) == [[0]]
    # row 1 copies its prefix from slot 0, which row 0 overwrites: one forward reads it first
    assert prefill_groups([200, 10], [0, 1], [(-1, 0), (0, 30)]) == [[0, 1]]
    # a row reusing its own slot is no conflict
    assert prefill_groups([200, 10], [0, 1], [(-1, 0), (1, 30)]) == [[0], [1]]


def test_mixed_length_admission_equals_solo_runs(model):
    """Prompts of 3 and 60 tokens admitted together run in separate forwards; each reply is its solo greedy run."""
    ps = prompts(3, seed=15)
    long = sum(prompts(6, seed=16), [])[:60]
    todo = [long, ps[0][:3], ps[1]]
    res = Engine(model, max_batch=4, max_seq_len=128).generate([GenerationRequest(p, max_tokens=6, stop_ids=[])
                                                                 for p in todo])
    assert [r.token_ids for r in res] == [greedy_ref(model, p, 6) for p in todo]


def test_prefix_reuse_copies_a_high_slot_prefix_into_a_covered_slot(model):
    """A chat whose cache sits in slot 3 continues alone: its prefix is copied into slot 0 (decode steps then run
    one row, not four); the reply equals a full-prompt greedy decode and slot 3 keeps its cache."""
    ps = prompts(5, seed=12)
    eng = Engine(model, max_batch=4, max_seq_len=128)
    first = eng.generate([GenerationRequest(p, max_tokens=6, stop_ids=[]) for p in ps[:4]])
    chat3 = ps[3] + first[3].token_ids
    assert eng.cached_ids[3] == chat3[:-1]
    turn = chat3 + ps[4]
    res = eng.generate([GenerationRequest(turn, max_tokens=8, stop_ids=[])])[0]
    assert res.cached_tokens == len(chat3) - 2
    assert res.token_ids == greedy_ref(model, turn, 8)
    assert eng.cached_ids[0] == (turn + res.token_ids)[:-1] and eng.cached_ids[3] == chat3[:-1]


def test_finished_rows_leave_the_batch_dense(model, monkeypatch):
    """Three short replies end while a long one decodes in slot 3: it moves to slot 0 and the steps after run one
    row, not four. Every reply is its solo greedy run, and each short chat's cached prefix survives the move (its
    next turn reuses it and still decodes greedy)."""
    ps = prompts(5, seed=17)
    eng = Engine(model, max_batch=4, max_seq_len=128)
    rows, real = [], model.forward

    def spy(ids, *a, **k):
        if ids.shape[1] == 1:
            rows.append(ids.shape[0])
        return real(ids, *a, **k)

    monkeypatch.setattr(model, "forward", spy)
    lengths = [3, 4, 2, 24]
    res = eng.generate([GenerationRequest(p, max_tokens=n, stop_ids=[]) for p, n in zip(ps, lengths)])
    monkeypatch.setattr(model, "forward", real)
    for p, n, r in zip(ps, lengths, res):
        assert r.token_ids == greedy_ref(model, p, n)
    # 23 decode steps (the prefill gives each reply its first token): the replies of 2, 3 and 4 tokens end after
    # steps 1, 2 and 3; each time the long one takes a freed lower slot, so the rows shrink with them
    assert rows == [4, 3, 2] + [1] * 20
    assert eng.cached_ids[0] == (ps[3] + res[3].token_ids)[:-1]
    chat0 = ps[0] + res[0].token_ids
    assert eng.cached_ids[2] == chat0[:-1]  # moved out of slot 0 (to where the long one was) with its K/V
    turn = chat0 + ps[4]
    again = eng.generate([GenerationRequest(turn, max_tokens=6, stop_ids=[])])[0]
    assert again.cached_tokens == len(chat0) - 2 and again.token_ids == greedy_ref(model, turn, 6)


def test_prefix_reuse_stays_within_a_cache_salt(model):
    """Requests with different salts (users) never share cached K/V; the same salt does."""
    p = prompts(1, seed=13)[0] + prompts(1, seed=14)[0]
    req = lambda salt: GenerationRequest(p, max_tokens=4, stop_ids=[], cache_salt=salt)  # noqa: E731
    eng = Engine(model, max_batch=2, max_seq_len=128)
    first = eng.generate([req("patient-a"), req("patient-b")])  # both slots now hold p, under two salts
    same, other = eng.generate([req("patient-a"), req("patient-c")])
    assert same.cached_tokens == len(p) - 2 and other.cached_tokens == 0
    unsalted = eng.generate([req(None)])[0]
    assert unsalted.cached_tokens == 0
    assert first[0].token_ids == same.token_ids == other.token_ids == unsalted.token_ids


def test_long_prompts_prefill_in_chunks(model, monkeypatch):
    """With max_prefill_tokens below the prompts' length, every prefill forward computes at most that many tokens
    (rows x columns), and the replies are still the greedy decode of the full prompts, with the log-probs of an
    engine that prefills each prompt in one forward; prefix reuse works across chunks too."""
    ps = [p * 4 for p in prompts(4, seed=31)]  # 12-76 tokens
    sizes = []
    forward = type(model).forward

    def counting(self, ids_BT, *a, **kw):
        sizes.append(ids_BT.numel())
        return forward(self, ids_BT, *a, **kw)

    monkeypatch.setattr(type(model), "forward", counting)
    eng = Engine(model, max_batch=3, max_seq_len=160, max_prefill_tokens=16)
    res = eng.generate([GenerationRequest(p, max_tokens=6, stop_ids=[], logprobs=True) for p in ps])
    assert max(sizes) <= 16 and len(sizes) > sum(len(p) for p in ps) // 16
    turn2 = ps[3] + res[3].token_ids + ps[1][:9]  # the next turn of chat 3: its cached prefix is reused
    res.append(eng.generate([GenerationRequest(turn2, max_tokens=6, stop_ids=[], logprobs=True)])[0])
    assert res[-1].cached_tokens > 16
    monkeypatch.undo()
    whole = Engine(model, max_batch=3, max_seq_len=160, prefix_reuse=False)
    for p, r in zip(ps + [turn2], res):
        assert r.token_ids == greedy_ref(model, p, 6)
        want = whole.generate([GenerationRequest(p, max_tokens=6, stop_ids=[], logprobs=True)])[0]
        assert max(abs(x - y) for x, y in zip(r.logprobs, want.logprobs)) < 1e-5


def check_long_prompt_prefills_between_steps(model, make_engine):
    """A prompt of several chunks arrives while another request decodes: it prefills one chunk per engine step,
    the other row gets its tokens at every step meanwhile, and both replies stay the greedy decode of their
    prompts. Returns the engine."""
    short, long = prompts(2, seed=41)
    long = (long * 40)[:150]  # 10 chunks of 16
    eng = make_engine()
    got = {"a": [], "b": []}
    a = eng.submit(GenerationRequest(short, max_tokens=60, stop_ids=[]), lambda d: got["a"].extend(d.token_ids))
    eng.step()
    b = eng.submit(GenerationRequest(long, max_tokens=8, stop_ids=[]), lambda d: got["b"].extend(d.token_ids))
    for _ in range(9):  # nine steps: b's first nine chunks, and a decodes in each of them
        before = len(got["a"])
        eng.step()
        assert not got["b"] and len(got["a"]) >= before + 1
    eng.step()  # the last chunk: b samples its first token (and decodes with a in the same step)
    assert got["b"]
    while eng.has_work():
        eng.step()
    assert a.result().token_ids == greedy_ref(model, short, 60)
    assert b.result().token_ids == greedy_ref(model, long, 8)
    return eng


def test_a_long_prompt_prefills_between_the_other_rows_steps(model):
    check_long_prompt_prefills_between_steps(
        model, lambda: Engine(model, max_batch=2, max_seq_len=256, max_prefill_tokens=16))


def test_cancelling_a_request_while_it_prefills(model):
    """Cancelled between two of its chunks, a long prompt ends as cancelled in the step its prefill ends (with at
    most the token that prefill sampled); the slot is freed and the row that was decoding finishes as if alone."""
    short, long = prompts(2, seed=42)
    eng = Engine(model, max_batch=2, max_seq_len=256, max_prefill_tokens=16)
    a = eng.submit(GenerationRequest(short, max_tokens=20, stop_ids=[]))
    eng.step()
    b = eng.submit(GenerationRequest((long * 40)[:100], max_tokens=8, stop_ids=[]))
    eng.step()
    eng.step()
    eng.cancel(b.request_id)
    while eng.has_work():
        eng.step()
    assert b.result().finish_reason == "cancelled" and len(b.result().token_ids) <= 1
    assert a.result().token_ids == greedy_ref(model, short, 20)
    assert eng.metrics.requests_cancelled == 1 and eng.metrics.active_slots == 0 and not eng._reserved


def test_routing_record_of_a_prompt_prefilled_in_chunks(model):
    """The routing record (GRPO's replay) of a prompt prefilled in chunks equals the one-forward prefill's."""
    p = (prompts(1, seed=43)[0] * 20)[:70]
    got = [Engine(model, max_batch=1, max_seq_len=128, max_prefill_tokens=budget).generate(
        [GenerationRequest(p, max_tokens=4, stop_ids=[], record_routing=True)])[0] for budget in (16, 8192)]
    assert got[0].token_ids == got[1].token_ids
    assert len(got[0].routing) == len(got[1].routing) > 0
    for a, b in zip(got[0].routing, got[1].routing):
        assert a.shape[0] == len(p) + 3 and torch.equal(a, b)

"""EAGLE-3 draft in the engine: greedy output identical to plain decoding, sampling distribution kept, the
training-time-test unroll equals what the engine drafts, and `--draft DIR` dispatch."""

import pytest
import torch

from angelmed.checkpoint import save_model
from angelmed.draft import DraftConfig, DraftModel, draft_loss, target_features, unrolled_step_logits
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.speculative import Eagle3Drafter, MTPDrafter
from test_engine import greedy_ref, prompts, tiny_model



@pytest.fixture(scope="module")
def target():
    m = tiny_model(0)
    with torch.no_grad():  # a confident target (random init is near-uniform): its greedy text is learnable
        m.lm_head.weight.mul_(20)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


PROMPTS = prompts(5, seed=11)
NEW = 24


def _train_on_own_text(target, draft_vocab=None, steps=40) -> DraftModel:
    """A draft fitted to the target's greedy continuations of PROMPTS (so drafts get accepted)."""
    refs = [greedy_ref(target, p, NEW) for p in PROMPTS]
    T = max(len(p) for p in PROMPTS) + NEW
    ids = torch.zeros(len(PROMPTS), T, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(PROMPTS, refs)):
        ids[i, :len(p) + NEW] = torch.tensor(p + r)
        mask[i, len(p):len(p) + NEW] = True
    draft = DraftModel(DraftConfig.for_target(target.config, draft_vocab_size=draft_vocab)).init_weights(0)
    if draft_vocab:  # the target's own tokens first, then fillers
        used = ids[mask].unique().tolist()
        rest = [t for t in range(target.config.vocab_size) if t not in set(used)]
        draft.set_vocab((used + rest)[:draft_vocab])
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, _ = draft_loss(draft, target, ids, steps=3, loss_mask_BT=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


@pytest.fixture(scope="module")
def trained(target):
    return _train_on_own_text(target)


@pytest.mark.parametrize("k", [1, 3])
def test_eagle3_greedy_identical_to_plain_staggered(target, trained, k):
    eng = Engine(target, max_batch=3, max_seq_len=96, draft=Eagle3Drafter(target, trained), spec_tokens=k)
    handles = []
    for p in PROMPTS:  # requests join while others are mid-generation; 5 requests > 3 slots
        handles.append(eng.submit(GenerationRequest(p, max_tokens=NEW, stop_ids=[])))
        eng.step()
    while eng.has_work():
        eng.step()
    for p, h in zip(PROMPTS, handles):
        assert h.result().token_ids == greedy_ref(target, p, NEW)
    st = eng.spec.stats
    assert st.drafted == k * st.rounds and sum(st.accepted_hist) == st.rounds
    assert st.accepted_hist[k] > 0, st.as_dict()  # full chains were accepted: the catch-up path is exercised
    if k == 3:
        assert st.mean_accept_length > 2.0, st.as_dict()


def test_eagle3_drafts_with_prefix_reuse_equal_a_full_prefill(target, trained):
    from test_speculative import check_prefix_reuse_with_draft

    hist = check_prefix_reuse_with_draft(target, lambda: Eagle3Drafter(target, trained), PROMPTS)
    assert sum(hist[1:]) > 0, hist  # drafts were accepted: the carried-over drafter entries are in use


def test_random_and_reduced_vocab_drafts_keep_greedy_output(target):
    for draft in (DraftModel(DraftConfig.for_target(target.config)).init_weights(5, std=0.2),
                  _train_on_own_text(target, draft_vocab=64, steps=25)):
        eng = Engine(target, max_batch=2, max_seq_len=96, draft=Eagle3Drafter(target, draft), spec_tokens=2)
        res = eng.generate([GenerationRequest(p, max_tokens=NEW, stop_ids=[], repetition_penalty=1.0)
                            for p in PROMPTS[:3]])
        assert [r.token_ids for r in res] == [greedy_ref(target, p, NEW) for p in PROMPTS[:3]]


def test_training_unroll_equals_engine_drafts(target, trained):
    """What the engine drafts (catch-up + chain over its own caches) equals the training-time-test unroll over
    the committed text followed by the drafts: the training view is the inference view. The plain unroll
    (each step attending its own states) does not."""
    seen = []

    class Recording(Eagle3Drafter):
        def propose(self, st, k):
            d, q = super().propose(st, k)
            seen.append((int(st.pos_BL[0, st.len_B[0] - 1]), d[0].tolist()))
            return d, q

    p = PROMPTS[0]
    eng = Engine(target, max_batch=1, max_seq_len=96, draft=Recording(target, trained), spec_tokens=3)
    seq = p + eng.generate([GenerationRequest(p, max_tokens=NEW, stop_ids=[])])[0].token_ids
    mismatch = {True: 0, False: 0}
    with torch.no_grad():
        for t, drafts in seen:  # base t: the newest token sits at t + 1
            ids = torch.tensor([seq[:t + 2] + drafts[:-1]])
            feats, _ = target_features(target, ids, trained.draft_config.feature_layers)
            for ttt in (True, False):
                logits = unrolled_step_logits(trained, target, ids, feats, 3, ttt_attention=ttt)
                mismatch[ttt] += [int(lg[0, t].argmax()) for lg in logits] != drafts
    assert len(seen) >= 5 and mismatch[True] == 0
    assert mismatch[False] > 0


def test_sampling_with_eagle3_draft_keeps_the_distribution(target):
    """Tokens 2 and 3 (drafted and verified) follow the target's exact marginals under top-k 4 sampling, with a
    reduced-vocabulary draft whose q is zero on some of the target's tokens."""
    torch.manual_seed(0)
    draft = _train_on_own_text(target, draft_vocab=64, steps=10)
    prompt = PROMPTS[1]
    temp, top_k, N = 1.5, 4, 3000
    V = target.config.vocab_size
    with torch.no_grad():
        def dist(prefix):
            logits = target(torch.tensor([prompt + prefix])).logits[0, -1] / temp
            kth = logits.topk(top_k).values[-1]
            return torch.where(logits >= kth, logits, torch.full_like(logits, float("-inf"))).softmax(-1)

        p1 = dist([])
        want2, want3 = torch.zeros(V), torch.zeros(V)
        for a in p1.nonzero()[:, 0].tolist():
            p2 = dist([a])
            want2 += p1[a] * p2
            for b in p2.nonzero()[:, 0].tolist():
                want3 += p1[a] * p2[b] * dist([a, b])
    eng = Engine(target, max_batch=64, max_seq_len=64, max_queue=N, draft=Eagle3Drafter(target, draft), spec_tokens=2)
    res = eng.generate([GenerationRequest(prompt, max_tokens=3, stop_ids=[], temperature=temp, top_k=top_k,
                                          seed=s) for s in range(N)])
    got2 = torch.bincount(torch.tensor([r.token_ids[1] for r in res]), minlength=V).float() / N
    got3 = torch.bincount(torch.tensor([r.token_ids[2] for r in res]), minlength=V).float() / N
    st = eng.spec.stats
    assert 0 < st.accepted < st.drafted  # both acceptances and rejections happened
    # total variation within sampling noise (sd of a frequency <= 0.5/sqrt(N) ~ 0.009 per token)
    assert 0.5 * (got2 - want2).abs().sum() < 0.04, (got2[want2 > 0], want2[want2 > 0])
    assert 0.5 * (got3 - want3).abs().sum() < 0.05


@pytest.mark.parametrize("layout", ["angelmed", "llama"])
def test_ttt_training_loss_falls_and_beats_chance(target, layout):
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (6, 24))
    draft = DraftModel(DraftConfig.for_target(target.config, draft_vocab_size=128, layout=layout)).init_weights(0)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = draft_loss(draft, target, ids, steps=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(p.grad is None for p in target.parameters())


def test_serve_draft_dir_dispatches_on_architecture(tmp_path, target, trained):
    from angelmed.serve.cli import make_drafter

    trained.save(tmp_path / "eagle")
    assert isinstance(make_drafter(target, str(tmp_path / "eagle")), Eagle3Drafter)
    save_model(target, tmp_path / "mtp_ckpt")  # a BailingMoeV2 checkpoint with an MTP layer
    assert isinstance(make_drafter(target, str(tmp_path / "mtp_ckpt")), MTPDrafter)
    assert isinstance(make_drafter(target, "mtp"), MTPDrafter)
    with pytest.raises(ValueError, match="config.json"):
        make_drafter(target, str(tmp_path / "nowhere"))
    other = tiny_model(1)
    other.config.num_hidden_layers = 1  # a draft for a deeper target does not fit
    with pytest.raises(ValueError, match="feature_layers"):
        Eagle3Drafter(other, trained)


def test_draft_dir_roundtrip_keeps_vocab_map(tmp_path, target):
    d = DraftModel(DraftConfig.for_target(target.config, draft_vocab_size=32)).init_weights(2)
    d.set_vocab(list(range(100, 132)))
    d.save(tmp_path / "d", extra_files={"note.txt": "x"})
    back = DraftModel.load(tmp_path / "d")
    assert back.vocab_map.tolist() == list(range(100, 132))
    assert (tmp_path / "d" / "note.txt").read_text() == "x"
    with pytest.raises(ValueError, match="not an angelmed draft"):
        DraftModel.load(_bad_dir(tmp_path))


def _bad_dir(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["BailingMoeV2ForCausalLM"]}')
    return bad


def test_sglang_command_for_eagle3_drafts(tmp_path, target, trained, capsys):
    from angelmed.serve.cli import main

    save_model(target, tmp_path / "model")
    llama = tmp_path / "llama_eagle3"
    llama.mkdir()
    (llama / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    assert main([str(tmp_path / "model"), "--backend", "sglang", "--draft", str(llama), "--spec-tokens", "4"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--speculative-algorithm") + 1] == "EAGLE3"
    assert cmd[cmd.index("--speculative-draft-model-path") + 1] == str(llama.resolve())
    assert cmd[cmd.index("--speculative-num-steps") + 1] == "4"
    assert cmd[cmd.index("--speculative-num-draft-tokens") + 1] == "5"
    trained.save(tmp_path / "ours")  # our layout: SGLang cannot load it, so it is dropped with a warning
    assert main([str(tmp_path / "model"), "--backend", "sglang", "--draft", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr()
    assert "--speculative-algorithm" not in out.out and "LlamaForCausalLMEagle3" in out.err
    assert "draft.layout: llama" in out.err and "angelmed convert" in out.err  # how to get the loadable one

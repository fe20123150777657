"""The built-in data stand-in: chat masks, CPT packing (EOD, eod-mask, segments), SFT packing (per-sample
shift, position resets), token-share mixing, resumable state."""

import json

import torch

from angelmed.train.data import ByteTokenizer, CPTPacker, SFTPacker, TokenMix, TokenStream

X = -100


class ListSource:
    """A resumable list of (ids, mask) items."""

    def __init__(self, items):
        self.items, self.pos = items, 0

    def __next__(self):
        if self.pos >= len(self.items):
            raise StopIteration
        self.pos += 1
        return self.items[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def b(text):
    return list(text.encode())


def test_chat_mask_hand_built():
    tok = ByteTokenizer(512)
    RE = tok.role_end_id
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Pain?"},
            {"role": "assistant", "content": "See a doctor."}]
    pieces = [(b("<role>SYSTEM</role>Be brief.\ndetailed thinking off") + [RE], 0),
              (b("<role>HUMAN</role>Hi") + [RE], 0), (b("<role>ASSISTANT</role>"), 0), (b("Hello!") + [RE], 1),
              (b("<role>HUMAN</role>Pain?") + [RE], 0), (b("<role>ASSISTANT</role>"), 0),
              (b("See a doctor.") + [RE], 1)]
    want_ids = [t for p, _ in pieces for t in p]
    want_mask = [m for p, m in pieces for _ in p]
    ids, mask = tok.encode_chat(msgs)
    assert ids == want_ids and mask == want_mask
    assert sum(mask) == len("Hello!") + 1 + len("See a doctor.") + 1
    _, last = tok.encode_chat(msgs, only_last_assistant=True)
    assert sum(last) == len("See a doctor.") + 1 and last[-1] == 1


def test_cpt_packing_windows_eod_and_segments():
    EOD = 99
    src = ListSource([([1, 2, 3], None), ([4, 5], None), ([6, 7, 8, 9], None)])
    p = CPTPacker(src, EOD, seq_len=4, rows=2, eod_mask_loss=True, reset_position_ids=False)
    batch = next(p)
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E ; windows of 5 sharing one token: [1 2 3 E 4] [4 5 E 6 7]
    assert batch["input_ids"].tolist() == [[1, 2, 3, EOD], [4, 5, EOD, 6]]
    assert batch["labels"].tolist() == [[2, 3, EOD, X], [5, EOD, X, 7]]  # no loss where the input is EOD
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    src2 = ListSource([([1, 2, 3], None), ([4, 5], None)])
    r = next(CPTPacker(src2, EOD, 4, 1, eod_mask_loss=False, reset_position_ids=True))
    assert r["labels"].tolist() == [[2, 3, EOD, 4]] and r["position_ids"].tolist() == [[0, 1, 2, 3]]
    src3 = ListSource([([1, 2], None), ([4, 5, 6], None)])
    r = next(CPTPacker(src3, EOD, 4, 1, eod_mask_loss=True, reset_position_ids=True))
    assert r["position_ids"].tolist() == [[0, 1, 2, 0]] and r["segment_ids"].tolist() == [[0, 0, 0, 1]]


def test_sft_packing_shift_reset_and_padding():
    a = ([10, 11, 12, 13], [0, 0, 1, 1])
    c = ([20, 21, 22], [0, 1, 1])
    p = SFTPacker(ListSource([a, c]), pad_id=0, seq_len=8, rows=1, pack_buffer=2)
    row = next(p)
    # per-sample shift: a -> in [10,11,12] lab [X,12,13]; c -> in [20,21] lab [21,22]; longest first
    assert row["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0, 0, 0]]
    assert row["labels"].tolist() == [[X, 12, 13, 21, 22, X, X, X]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert row["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]


def test_sft_truncation_counted():
    long = (list(range(1, 21)), [0] * 5 + [1] * 15)
    p = SFTPacker(ListSource([long]), pad_id=0, seq_len=8, rows=1, pack_buffer=4)
    row = next(p)
    assert row["input_ids"].tolist() == [list(range(1, 9))] and p.truncated == 1


def test_packer_state_resumes_exactly():
    items = [(list(range(i, i + 7)), None) for i in range(0, 200, 7)]
    p = CPTPacker(ListSource(items), 999, seq_len=5, rows=2, eod_mask_loss=True, reset_position_ids=False)
    next(p)
    state = json.loads(json.dumps(p.state_dict()))  # plain data
    want = [next(p) for _ in range(3)]
    q = CPTPacker(ListSource(items), 999, seq_len=5, rows=2, eod_mask_loss=True, reset_position_ids=False)
    q.load_state_dict(state)
    for w in want:
        got = next(q)
        assert all(torch.equal(w[k], got[k]) for k in w)


def test_token_mix_follows_token_shares(tmp_path):
    tok = ByteTokenizer(512)
    for name, n in (("a", 300), ("b", 300)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": name * 10}) + "\n" for _ in range(n)))
    streams = [TokenStream({"kind": "jsonl", "path": str(tmp_path / f"{n}.jsonl")}, "cpt", "train", None, 0.0, tok)
               for n in ("a", "b")]
    mix = TokenMix(streams, [3.0, 1.0])
    firsts = [next(mix)[0][0] for _ in range(400)]
    share_a = firsts.count(ord("a")) / len(firsts)
    assert abs(share_a - 0.75) < 0.01
    state = mix.state_dict()
    nxt = [next(mix)[0][0] for _ in range(20)]
    streams2 = [TokenStream({"kind": "jsonl", "path": str(tmp_path / f"{n}.jsonl")}, "cpt", "train", None, 0.0, tok)
                for n in ("a", "b")]
    mix2 = TokenMix(streams2, [3.0, 1.0])
    mix2.load_state_dict(state)
    assert [next(mix2)[0][0] for _ in range(20)] == nxt


def test_bad_records_are_counted(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n{"other": 1}\n{"text": "fine"}\n')
    s = TokenStream({"kind": "jsonl", "path": str(f)}, "cpt", "train", None, 0.0, ByteTokenizer(512), repeat=False)
    got = []
    while True:
        try:
            got.append(next(s)[0])
        except StopIteration:
            break
    assert got == [b("ok"), b("fine")] and sum(s.skips.counts.values()) == 2
    assert any("x.jsonl:2" in w for w in s.skips.examples.values())

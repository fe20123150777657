"""Training-side data glue: byte tokenizer chat masks, held-out split, rank slicing, source spec checks, and
real batches from angelmed.data through build_batches."""

import pytest
import torch

from angelmed.train.config import load_config
from angelmed.train.data import ByteTokenizer, DataError, RankSlice, build_batches, in_heldout, source_specs


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
    ids, mask = tok.encode_chat(msgs)
    assert ids == [t for p, _ in pieces for t in p]
    assert [int(m) for m in mask] == [m for p, m in pieces for _ in p]
    _, last = tok.encode_chat(msgs, only_last_assistant=True)
    assert sum(last) == len("See a doctor.") + 1 and last[-1]
    gen, _ = tok.encode_chat(msgs[:2], add_generation_prompt=True)
    assert gen[-len(b("<role>ASSISTANT</role>")):] == b("<role>ASSISTANT</role>")


def test_heldout_split_is_stable_and_sized():
    ids = [f"doc-{i}" for i in range(20000)]
    held = [i for i in ids if in_heldout(i, 0.05)]
    assert abs(len(held) / len(ids) - 0.05) < 0.01
    assert held == [i for i in ids if in_heldout(i, 0.05)]
    assert not any(in_heldout(i, 0.0) for i in ids)


def test_rank_slice_partitions_rows():
    class Two:
        def __next__(self):
            return {"input_ids": torch.arange(8).view(4, 2)}

        def state_dict(self):
            return {"x": 1}

    r0, r1 = next(RankSlice(Two(), 0, 2)), next(RankSlice(Two(), 1, 2))
    assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), torch.arange(8).view(4, 2))


def test_source_specs_errors_name_the_problem():
    assert source_specs([{"spec": "medquad"}, {"spec": "x.jsonl", "weight": 2}]) == [("medquad", 1.0), ("x.jsonl", 2.0)]
    with pytest.raises(DataError, match=r"sources\[0\].*'kind'"):
        source_specs([{"kind": "medquad"}])
    with pytest.raises(DataError, match="weight"):
        source_specs([{"spec": "medquad", "weight": 0}])
    with pytest.raises(DataError, match="empty"):
        source_specs([])


def test_cpt_batches_from_medquad_split_and_resume(data_dir):
    cfg = load_config("cpt", None, ["--data.data_root", str(data_dir), "--data.sources", "[{spec: medquad}]",
                                    "--data.seq_len", "32", "--data.micro_batch_size", "2",
                                    "--data.heldout_fraction", "0.5"])
    tok = ByteTokenizer(512)
    train, held = build_batches(cfg, tok, "train", 0, 1), build_batches(cfg, tok, "heldout", 0, 1)
    a, h = next(train), next(held)
    assert a["input_ids"].shape == (2, 32) and set(a) >= {"input_ids", "labels", "position_ids", "segment_ids"}
    assert not torch.equal(a["input_ids"], h["input_ids"])  # disjoint halves of the records
    state = train.state_dict()
    want = [next(train) for _ in range(2)]
    again = build_batches(cfg, tok, "train", 0, 1)
    again.load_state_dict(state)
    for w in want:
        got = next(again)
        assert all(torch.equal(w[k], got[k]) for k in w)


def test_eval_only_source_refused(data_dir):
    cfg = load_config("sft", None, ["--data.data_root", str(data_dir), "--data.sources", "[{spec: healthbench_subset245}]"])
    with pytest.raises(PermissionError):
        build_batches(cfg, ByteTokenizer(512), "train", 0, 1)

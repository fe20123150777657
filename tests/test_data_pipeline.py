"""End to end: sources -> mix -> tokeniser -> packer, with a toy tokeniser that has angelmed's tokenizer interface."""

import pytest
import torch

from angelmed.data.packing import IGNORE_INDEX
from angelmed.data.pipeline import cpt_batches, sft_batches


class ToyTokenizer:
    """Bytes shifted by 10; ids 0..9 are specials. encode_chat: <role>=2, <|role_end|>=3, role names as bytes."""

    pad_id, eod_id, role_start, role_end = 0, 1, 2, 3

    def encode(self, text):
        return [b + 10 for b in text.encode("utf-8")]

    def encode_chat(self, messages, tools=None, add_generation_prompt=False, only_last_assistant=False):
        ids, mask = [], []
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for i, m in enumerate(messages):
            header = [self.role_start] + self.encode(m["role"])
            body = self.encode(m.get("reasoning_content", "") + m["content"]) + [self.role_end]
            learn = m["role"] == "assistant" and (not only_last_assistant or i == last)
            ids += header + body
            mask += [False] * len(header) + [learn] * len(body)
        return ids, mask


def test_cpt_pipeline_from_embedded_corpora():
    tok = ToyTokenizer()
    packer = cpt_batches([("hpo", 0.5), ("icd10cm", 0.5)], tok, seq_len=256, batch_size=4, seed=0)
    batch = next(packer)
    assert batch["input_ids"].shape == (4, 256)
    eod_inputs = batch["input_ids"] == tok.eod_id
    assert eod_inputs.any() and (batch["labels"][eod_inputs] == IGNORE_INDEX).all()
    # everywhere else the label is the next input token (windows overlap by one token across rows too)
    ok = ~eod_inputs[:, :-1]
    assert torch.equal(batch["labels"][:, :-1][ok], batch["input_ids"][:, 1:][ok])


def test_sft_pipeline_masks_everything_but_assistant_turns(data_dir):
    tok = ToyTokenizer()
    packer = sft_batches([("medquad", 1.0)], tok, seq_len=512, batch_size=2, data_root=data_dir,
                         buffer_samples=16)
    batch = next(packer)
    labels, inputs, segs = batch["labels"], batch["input_ids"], batch["segment_ids"]
    assert labels.shape == (2, 512)
    for row in range(2):
        for seg in segs[row].unique().tolist():
            if seg == 0:
                continue
            where = (segs[row] == seg).nonzero().flatten()
            sample_ids, sample_labels = inputs[row, where].tolist(), labels[row, where].tolist()
            # the learned targets are exactly the assistant body + its role end, in order
            learned = [x for x in sample_labels if x != IGNORE_INDEX]
            header = [tok.role_start] + tok.encode("assistant")
            k = next(i for i in range(len(sample_ids)) if sample_ids[i:i + len(header)] == header)
            assert learned == sample_ids[k + len(header):k + len(header) + len(learned)]
            assert sample_labels[-1] == IGNORE_INDEX  # nothing is predicted across samples
            if sample_ids[-1] == tok.role_end:  # not truncated: the model learns to stop
                assert learned[-1] == tok.role_end
            assert batch["position_ids"][row, where].tolist() == list(range(len(where)))
    state = packer.state_dict()  # replay point: before the 16-sample buffer, 2 of its rows already emitted
    assert state["upstream"]["sources"]["medquad"]["position"] == 0 and state["skip_rows"] == 2


def test_pipeline_refuses_eval_sets_up_front(data_dir):
    from angelmed.data.sources import EvalOnlyDatasetError
    with pytest.raises(EvalOnlyDatasetError, match="medqa"):
        sft_batches([("medquad", 0.9), ("medqa", 0.1)], ToyTokenizer(), 64, 1, data_root=data_dir)

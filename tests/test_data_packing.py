"""Packing checked against hand-written expectations on tiny token lists."""

import pytest
import torch

from angelmed.data.mix import MixSource, WeightedMix
from angelmed.data.packing import (
    IGNORE_INDEX as X, CPTPacker, SFTPacker, best_fit_decreasing, cpt_window, shift_labels,
)

EOD = 1


def test_cpt_window_ling_convention():
    # stream: doc A = 5 6 7, EOD, doc B = 8 9 ...; window of seq_len + 1 = 6 tokens
    row = cpt_window([5, 6, 7, EOD, 8, 9], EOD)
    assert row["input_ids"] == [5, 6, 7, EOD, 8]
    assert row["labels"] == [6, 7, EOD, X, 9]  # EOD is predicted; nothing is predicted FROM it
    assert row["position_ids"] == [0, 1, 2, 3, 4]  # positions run across the boundary
    assert row["segment_ids"] == [1, 1, 1, 1, 1]  # plain causal attention


def test_cpt_window_reset_positions_and_document_segments():
    row = cpt_window([5, 6, EOD, 8, EOD, 9, 10], EOD, reset_position_ids=True)
    assert row["input_ids"] == [5, 6, EOD, 8, EOD, 9]
    assert row["labels"] == [6, EOD, X, EOD, X, 10]
    assert row["position_ids"] == [0, 1, 2, 0, 1, 0]
    assert row["segment_ids"] == [1, 1, 1, 2, 2, 3]


def test_cpt_window_without_eod_masking():
    assert cpt_window([5, EOD, 8], EOD, eod_mask_loss=False)["labels"] == [EOD, 8]


def test_cpt_packer_windows_overlap_by_one_token():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # stream 5 6 7 1 8 9 1 10 11 12 13 1 (12 tokens)
    batch = next(CPTPacker(docs, EOD, seq_len=4, batch_size=2))
    # windows of 5 tokens with stride 4: tokens 0..4 and 4..8 (token 4 = 8 is a label, then an input)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [8, 9, 1, 10]]
    assert batch["labels"].tolist() == [[6, 7, 1, X], [9, 1, X, 11]]


def test_cpt_packer_tail_shorter_than_window_is_dropped():
    # 12-token stream, seq_len 4: windows start at 0, 4, 8; the one at 8 needs tokens 8..12 -> only 8..11 exist
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    rows = [r for b in CPTPacker(docs, EOD, seq_len=4, batch_size=1) for r in b["input_ids"].tolist()]
    assert rows == [[5, 6, 7, 1], [8, 9, 1, 10]]


def test_shift_labels_masks_non_assistant_and_last_position():
    ids = [10, 11, 12, 13, 14]
    mask = [False, False, True, True, False]
    assert shift_labels(ids, mask) == [X, 12, 13, X, X]


def test_best_fit_decreasing_hand_example():
    # capacity 10, lengths 6 5 4 3 2: 6 -> bin0 (4 left), 5 -> bin1 (5 left), 4 -> bin0 (best fit, 0 left),
    # 3 -> bin1 (2 left), 2 -> bin1 (0 left)
    assert best_fit_decreasing([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]


def _sample(n, start, loss_from):
    ids = list(range(start, start + n))
    return ids, [i >= loss_from for i in range(n)]


def test_sft_bfd_rows_positions_segments_and_padding():
    a = _sample(4, 100, loss_from=2)  # ids 100..103, loss on 102, 103
    b = _sample(3, 200, loss_from=1)  # ids 200..202, loss on 201, 202
    c = _sample(5, 300, loss_from=3)
    packer = SFTPacker([a, b, c], seq_len=8, batch_size=4, pad_id=0)
    batch = next(packer)
    # BFD: c(5) -> row0, a(4) does not fit row0 (3 left) -> row1, b(3) -> row0 (exact fit)
    assert batch["input_ids"].tolist() == [[300, 301, 302, 303, 304, 200, 201, 202],
                                           [100, 101, 102, 103, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 303, 304, X, 201, 202, X],
                                        [X, 102, 103, X, X, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert all(v.dtype == torch.long for v in batch.values())
    with pytest.raises(StopIteration):
        next(packer)
    assert packer.stats["samples"] == 3 and packer.stats["truncated"] == 0 and packer.stats["dropped"] == 0
    assert packer.stats["loss_tokens"] == 6


def test_sft_truncation_keep_start_and_drop_counts():
    long_ok = _sample(7, 10, loss_from=2)  # truncated to 5: ids 10..14, loss tokens 12, 13, 14 remain
    long_lost = _sample(7, 20, loss_from=6)  # its only loss token is cut off -> dropped
    packer = SFTPacker([long_ok, long_lost], seq_len=5, batch_size=2, pad_id=0)
    batch = next(packer)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14]]
    assert batch["labels"].tolist() == [[X, 12, 13, 14, X]]
    assert packer.stats["truncated"] == 2 and packer.stats["dropped"] == 1


def test_sft_bfd_split_keeps_overflow_as_new_sample():
    s = _sample(7, 10, loss_from=1)
    batch = next(SFTPacker([s], seq_len=4, batch_size=2, pad_id=0, strategy="bfd_split"))
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13], [14, 15, 16, 0]]
    # labels were shifted over the whole sample, so the chunk boundary keeps its target (14)
    assert batch["labels"].tolist() == [[11, 12, 13, 14], [15, 16, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]


def test_sft_wrapped_cuts_mid_sample():
    a, b = _sample(3, 10, loss_from=0), _sample(3, 20, loss_from=0)
    batch = next(SFTPacker([a, b], seq_len=4, batch_size=2, pad_id=0, strategy="wrapped"))
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20], [21, 22, 0, 0]]
    assert batch["labels"].tolist() == [[11, 12, X, 21], [22, X, X, X]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]


def _docs(prefix, n, length):
    return lambda: ([prefix * 1000 + i * 10 + j for j in range(length)] for i in range(n))


def _mix(seed=3):
    return WeightedMix([MixSource("a", _docs(1, 50, 7), 0.5), MixSource("b", _docs(2, 30, 13), 0.5)], seed=seed)


def _take(it, n):
    return [{k: v.clone() for k, v in next(it).items()} for _ in range(n)]


def test_cpt_packer_resume_gives_identical_continuation():
    packer = CPTPacker(_mix(), EOD, seq_len=16, batch_size=2, reset_position_ids=True)
    _take(packer, 3)
    state = packer.state_dict()
    expected = _take(packer, 4)
    fresh = CPTPacker(_mix(), EOD, seq_len=16, batch_size=2, reset_position_ids=True)
    fresh.load_state_dict(state)
    got = _take(fresh, 4)
    for e, g in zip(expected, got):
        assert all(torch.equal(e[k], g[k]) for k in e)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_sft_packer_resume_mid_buffer_gives_identical_continuation(strategy):
    def samples():
        return WeightedMix([MixSource("s", lambda: iter(range(10_000)), 1.0)], seed=1,
                           encode=lambda i: _sample(3 + (i * 7) % 11, 100 + i, loss_from=1 + i % 2),
                           count=lambda s: len(s[0]))

    packer = SFTPacker(samples(), seq_len=12, batch_size=3, pad_id=0, strategy=strategy, buffer_samples=10)
    _take(packer, 2)  # the 10-sample buffer is only partly emitted here
    state = packer.state_dict()
    assert state["skip_rows"] > 0
    expected = _take(packer, 5)
    stats = dict(packer.stats)
    fresh = SFTPacker(samples(), seq_len=12, batch_size=3, pad_id=0, strategy=strategy, buffer_samples=10)
    fresh.load_state_dict(state)
    got = _take(fresh, 5)
    for e, g in zip(expected, got):
        assert all(torch.equal(e[k], g[k]) for k in e)
    assert fresh.stats == stats


def test_packer_state_needs_resumable_input():
    with pytest.raises(TypeError, match="state_dict"):
        CPTPacker([[5, 6]], EOD, seq_len=2, batch_size=1).state_dict()

"""End-to-end tiny runs: CPT on real text lowers held-out loss; SFT loss covers assistant tokens only;
gradient accumulation is exact; the exported model is an HF directory; metrics files are written."""

import json

import numpy as np
import pytest
import torch

from angelmed.checkpoint import load_model
from angelmed.config import get_preset
from angelmed.model import Transformer
from angelmed.train import cpt, sft
from angelmed.train.checkpointing import latest_checkpoint
from angelmed.train.config import load_config
from angelmed.train.data import ByteTokenizer
from train_helpers import losses, metrics, tiny_cpt


def test_cpt_lowers_heldout_loss_and_writes_outputs(tmp_path, data_dir):
    run = tmp_path / "cpt"
    cfg = tiny_cpt(run, data_dir, "--train.steps", "25", "--optim.lr", "5e-3", "--train.log_every", "5",
                   "--train.save_every", "10", "--train.keep_last", "2", "--data.micro_batch_size", "8")
    cpt.run(cfg)
    m = metrics(run)
    held = [(x["step"], x["heldout_loss"]) for x in m if x.get("heldout_loss") is not None]
    assert held[0][0] == 0 and held[-1][0] == 25
    assert held[-1][1] < held[0][1] - 1.0, held  # ln(512)=6.24 at init; bytes are learnable fast
    last = m[-1]
    for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "expert_maxvio"):
        assert key in last
    assert len(last["expert_maxvio"]) == 3
    load = np.load(run / "expert_load.npy")
    assert load.shape == (3, 8) and load.sum() > 0
    assert (run / "config.yaml").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000020", "step_00000025"] or \
        sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020", "step_00000025"]
    # the exported model and the checkpoint's model are plain HF directories with fp32 expert biases
    exported = load_model(run / "model", dtype="float32")
    ck = load_model(latest_checkpoint(run) / "model")
    for (n, a), (_, b) in zip(exported.state_dict().items(), ck.state_dict().items()):
        if n.endswith("expert_bias"):
            assert a.dtype == torch.float32 and torch.equal(a, b)
    assert any(b.abs().sum() > 0 for n, b in ck.state_dict().items() if n.endswith("expert_bias"))


def test_grad_accumulation_matches_one_big_batch(tmp_path, data_dir):
    a = tiny_cpt(tmp_path / "a", data_dir, "--train.steps", "3", "--data.micro_batch_size", "4",
                 "--train.eval_batches", "0")
    b = tiny_cpt(tmp_path / "b", data_dir, "--train.steps", "3", "--data.micro_batch_size", "2",
                 "--train.grad_accum", "2", "--train.eval_batches", "0")
    # the packer reads global micro-batches of micro_batch_size rows: same rows in the same order
    cpt.run(a)
    cpt.run(b)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])


def _conversations():
    return [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I have a headache."},
         {"role": "assistant", "content": "Drink water and rest."}, {"role": "user", "content": "And if not?"},
         {"role": "assistant", "content": "See a doctor."}],
        [{"role": "user", "content": "Fever 39C?"}, {"role": "assistant", "content": "Take paracetamol."}],
    ]


def _hand_ids_and_mask(conv, RE):
    """Ling template pieces written out by hand, loss on assistant content + <|role_end|>."""
    pieces = []
    msgs = list(conv)
    head = "<role>SYSTEM</role>"
    if msgs[0]["role"] == "system":
        head += msgs.pop(0)["content"] + "\n"
    pieces.append((list((head + "detailed thinking off").encode()) + [RE], 0))
    for m in msgs:
        if m["role"] == "user":
            pieces.append((list(f"<role>HUMAN</role>{m['content']}".encode()) + [RE], 0))
        else:
            pieces.append((list(b"<role>ASSISTANT</role>"), 0))
            pieces.append((list(m["content"].encode()) + [RE], 1))
    return [t for p, _ in pieces for t in p], [k for p, k in pieces for _ in p]


def test_sft_loss_is_on_assistant_tokens_only(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _conversations()))
    run = tmp_path / "sft"
    cfg = load_config("sft", None, [
        "--data.sources", f"[{{spec: {f}}}]", "--data.seq_len", "320", "--data.micro_batch_size", "1",
        "--data.heldout_fraction", "0", "--train.steps", "1", "--train.run_dir", str(run),
        "--train.progress", "false", "--train.tensorboard", "false", "--train.threads", "1",
        "--train.peak_flops", "1e9", "--train.eval_batches", "0"])
    sft.run(cfg)
    got = metrics(run)[0]
    assert got["tokens"] == 320  # both conversations (197 + 108 shifted tokens) share one packed row
    # independent expectation: each conversation alone (no packing, plain causal attention, positions from 0)
    model = Transformer(get_preset("tiny")).init_weights(cfg.model.init_seed)
    RE = ByteTokenizer(512).role_end_id
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in _conversations():
            ids, mask = _hand_ids_and_mask(conv, RE)
            logits = model(torch.tensor([ids])).logits[0]
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    total += torch.nn.functional.cross_entropy(logits[t], torch.tensor(ids[t + 1])).item()
                    count += 1
    assert count == len("Drink water and rest.") + len("See a doctor.") + len("Take paracetamol.") + 3
    assert got["loss_tokens"] == count
    assert abs(got["lm_loss"] - total / count) < 1e-5, (got["lm_loss"], total / count)


def test_sft_only_last_assistant(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": _conversations()[0]}) + "\n")
    run = tmp_path / "sft_last"
    cfg = load_config("sft", None, [
        "--data.sources", f"[{{spec: {f}}}]", "--data.seq_len", "256", "--data.micro_batch_size", "1",
        "--data.heldout_fraction", "0", "--data.only_last_assistant", "true",
        "--train.steps", "1", "--train.run_dir", str(run), "--train.progress", "false",
        "--train.tensorboard", "false", "--train.peak_flops", "1e9", "--train.eval_batches", "0"])
    sft.run(cfg)
    assert metrics(run)[0]["loss_tokens"] == len("See a doctor.") + 1


def test_bf16_mixed_precision_keeps_fp32_master_and_bias(tmp_path, data_dir):
    run = tmp_path / "bf16"
    cpt.run(tiny_cpt(run, data_dir, "--train.steps", "2", "--train.precision", "bf16", "--train.eval_batches", "0",
                     "--train.export_dtype", "bfloat16"))
    assert all(abs(m["loss"]) < 20 for m in metrics(run))
    ck = load_model(latest_checkpoint(run) / "model")  # FSDP2 (one rank): fp32 master weights are saved
    assert all(t.dtype == torch.float32 for t in ck.state_dict().values())
    assert any(b.abs().sum() > 0 for n, b in ck.state_dict().items() if n.endswith("expert_bias"))
    exported = load_model(run / "model")
    sd = exported.state_dict()
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in sd.items() if n.endswith("expert_bias"))


def test_activation_checkpointing_recomputes_layers_and_changes_nothing_else(tmp_path, data_dir):
    """Each layer runs twice per step (forward, then again in backward) with the same gradients and names; a CPT
    run gives the same losses, weights and expert biases (the recompute must not count expert load twice)."""
    from angelmed.train.dist import checkpoint_layers

    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 12))
    plain = Transformer(get_preset("tiny")).init_weights(1)
    ac = checkpoint_layers(Transformer(get_preset("tiny")).init_weights(1))
    assert list(ac.state_dict()) == list(plain.state_dict())
    calls = []
    ac.model.layers[1].attention.register_forward_hook(lambda *a: calls.append(1))
    for m in (plain, ac):
        out = m(ids, mtp=True)
        (out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()).backward()
    assert len(calls) == 2
    grads = dict(plain.named_parameters())
    for name, p in ac.state_dict(keep_vars=True).items():
        if isinstance(p, torch.nn.Parameter):
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)

    runs = {}
    for name, flag in (("plain", "false"), ("ac", "true")):
        cpt.run(tiny_cpt(tmp_path / name, data_dir, "--train.steps", "3", "--train.eval_batches", "0",
                         "--train.activation_checkpointing", flag, "--train.export_dtype", "float32"))
        runs[name] = (losses(tmp_path / name), load_model(tmp_path / name / "model").state_dict())
    assert runs["plain"][0] == pytest.approx(runs["ac"][0], abs=1e-6)
    for k, v in runs["plain"][1].items():
        torch.testing.assert_close(runs["ac"][1][k], v, rtol=0, atol=1e-6)

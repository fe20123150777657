"""`angelmed train draft`: end to end on a tiny target in seconds, config errors, vocabulary choice."""

import json

import pytest
import torch

from angelmed.checkpoint import save_model
from angelmed.draft import DraftModel, is_draft_dir
from angelmed.train.cli import main as train_main
from angelmed.train.draft import choose_vocab
from test_engine import tiny_model


def confident_target(tmp_path_factory, name: str, **save_kw):
    """The tiny model with a sharpened head, so agreement and acceptance can move within a few steps."""
    m = tiny_model(0)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    d = tmp_path_factory.mktemp(name) / "model"
    save_model(m, d, **save_kw)
    return d


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return confident_target(tmp_path_factory, "target")


@pytest.mark.parametrize("layout", ["angelmed", "llama"])
def test_train_draft_cli_end_to_end(target_dir, tmp_path, capsys, layout):
    out = tmp_path / "draft"
    rc = train_main(["draft", "--target", str(target_dir), "--train.steps", "16", "--train.eval_every", "8",
                     "--train.eval_prompts", "4", "--train.eval_max_tokens", "12", "--train.lr", "5e-3",
                     "--train.warmup_steps", "2", "--train.log_every", "1", "--train.threads", "1",
                     "--train.out_dir", str(out), "--data.seq_len", "192", "--data.micro_batch_size", "4",
                     "--data.sources", "[{spec: icd10cm}]", "--draft.draft_vocab_size", "200",
                     "--draft.vocab_sample_batches", "2", "--distill.regenerate", "8",
                     "--distill.max_new_tokens", "24", "--draft.layout", layout])
    assert rc == 0
    assert "held-out acceptance length" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("eval")]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert all(e["mean_accept_length"] >= 1.0 for e in evals)
    for name in ("best", "last"):
        assert is_draft_dir(out / name)
        d = DraftModel.load(out / name)
        assert d.draft_config.layout == layout
        assert d.vocab_map.numel() == 200 and {510, 511} <= set(d.vocab_map.tolist())  # stop ids kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["mean_accept_length"] == max(e["mean_accept_length"] for e in evals)


def test_train_draft_config_errors(target_dir, tmp_path, capsys):
    assert train_main(["draft", "--target", str(target_dir), "--train.stepz", "3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert train_main(["draft", "--target", str(tmp_path / "missing")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert train_main(["draft", "--target", str(target_dir), "--train.ttt_steps", "0"]) == 2
    assert "ttt_steps" in capsys.readouterr().err
    assert train_main(["draft", "--target", str(target_dir), "--draft.layout", "medusa"]) == 2
    assert "draft.layout" in capsys.readouterr().err


def test_choose_vocab_takes_the_most_frequent_predicted_tokens():
    batches = iter([{"labels": torch.tensor([[5, 5, 5, 7, 7, -100, 9]])},
                    {"labels": torch.tensor([[5, 7, 3, -100, -100, -100, -100]])}])
    ids, coverage = choose_vocab(batches, 2, 3, 16, always=[15])
    assert ids == [5, 7, 15]  # 5 (x4), 7 (x3), forced stop id 15; 3 and 9 (x1 each) left out
    assert coverage == pytest.approx(7 / 9)


def _draft_args(target_dir, out, steps=6):
    return ["draft", "--target", str(target_dir), "--train.steps", str(steps), "--train.eval_every", "3",
            "--train.eval_prompts", "2", "--train.eval_max_tokens", "6", "--train.lr", "5e-3",
            "--train.warmup_steps", "2", "--train.log_every", "1", "--train.threads", "1",
            "--train.out_dir", str(out), "--data.seq_len", "160", "--data.micro_batch_size", "2",
            "--data.sources", "[{spec: icd10cm}]", "--draft.draft_vocab_size", "200",
            "--draft.vocab_sample_batches", "2", "--distill.regenerate", "16", "--distill.max_new_tokens", "12"]


def _killed_in_step_5(monkeypatch, args: list[str]) -> None:
    """Run `train draft` until its loss is computed for the 5th time (step 5, after the step-3 save): killed there."""
    import angelmed.draft as draft_mod

    real, calls = draft_mod.draft_loss_from_features, []

    def crash_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(draft_mod, "draft_loss_from_features", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_main(args)
    monkeypatch.setattr(draft_mod, "draft_loss_from_features", real)


def test_train_draft_resumes_exactly_after_a_crash(target_dir, tmp_path, monkeypatch):
    """A run killed after its step-3 save (in step 5) and started again ends with the uninterrupted run's weights and losses."""
    assert train_main(_draft_args(target_dir, tmp_path / "a")) == 0
    _killed_in_step_5(monkeypatch, _draft_args(target_dir, tmp_path / "b"))
    regen = (tmp_path / "b" / "regenerated.json").stat().st_mtime_ns
    assert train_main(_draft_args(target_dir, tmp_path / "b")) == 0
    assert (tmp_path / "b" / "regenerated.json").stat().st_mtime_ns == regen  # read back, not regenerated

    a, b = DraftModel.load(tmp_path / "a" / "last"), DraftModel.load(tmp_path / "b" / "last")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    ra, rb = records("a"), records("b")
    assert [r["step"] for r in rb] == [r["step"] for r in ra]  # nothing duplicated from the killed run
    assert [r.get("loss") for r in rb] == [r.get("loss") for r in ra]
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert sb["best"] == sa["best"] and sb["initial"] == sa["initial"]


def test_train_draft_resume_errors(target_dir, tmp_path, capsys):
    assert train_main(["draft", "--target", str(target_dir), "--train.resume", str(tmp_path)]) == 2
    assert "train.resume" in capsys.readouterr().err


def test_train_draft_fine_tunes_a_llama_eagle3_directory(target_dir, tmp_path):
    """`draft.init_from` takes a LlamaForCausalLMEagle3 directory (e.g. a published draft): it trains from those
    weights (its own head included), and the result exports back to that layout."""
    from angelmed.checkpoint import load_model
    from angelmed.commands import convert
    from angelmed.draft import DraftConfig, export_llama_eagle3, import_llama_eagle3

    target = load_model(target_dir)
    start = DraftModel(DraftConfig.for_target(target.config, layout="llama")).init_weights(1)
    export_llama_eagle3(start, target, tmp_path / "published", dtype=torch.float32)
    before = import_llama_eagle3(tmp_path / "published", target.config)
    out = tmp_path / "tuned"
    assert train_main(["draft", "--target", str(target_dir), "--train.steps", "4", "--train.eval_every", "0",
                       "--train.eval_prompts", "2", "--train.eval_max_tokens", "8", "--train.threads", "1",
                       "--train.out_dir", str(out), "--data.seq_len", "128", "--data.micro_batch_size", "2",
                       "--data.sources", "[{spec: icd10cm}]", "--distill.regenerate", "0",
                       "--draft.init_from", str(tmp_path / "published")]) == 0
    tuned = DraftModel.load(out / "last")
    assert tuned.draft_config.layout == "llama" and tuned.draft_config.own_head
    assert not torch.equal(tuned.lm_head.weight, before.lm_head.weight)  # its own head was trained
    assert convert([str(out / "last"), str(tmp_path / "back"), "--target", str(target_dir)]) == 0
    assert import_llama_eagle3(tmp_path / "back", target.config).draft_config.own_head


@pytest.fixture(scope="module")
def sharded_target_dir(tmp_path_factory):
    """The confident tiny target in two shards: the MTP layer's tensors lie in the second only."""
    d = confident_target(tmp_path_factory, "sharded", shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert {f for n, f in index.items() if n.startswith("model.layers.3.")} == {"model-00002-of-00002.safetensors"}
    return d


def _mtp_args(target_dir, out, steps=16, every=8):
    return ["draft", "--target", str(target_dir), "--draft.kind", "mtp", "--train.steps", str(steps),
            "--train.eval_every", str(every), "--train.eval_prompts", "4", "--train.eval_max_tokens", "12",
            "--train.lr", "5e-3", "--train.warmup_steps", "2", "--train.log_every", "1", "--train.threads", "1",
            "--train.out_dir", str(out), "--data.seq_len", "192", "--data.micro_batch_size", "4",
            "--data.sources", "[{spec: icd10cm}]", "--distill.regenerate", "8", "--distill.max_new_tokens", "24"]


def test_train_mtp_layer_as_the_drafter(sharded_target_dir, tmp_path, capsys):
    """`draft.kind: mtp` trains only the target's MTP layer: loss falls and the held-out acceptance length of
    `--draft mtp` rises; the result is the target's checkpoint with only that layer's tensors changed (the shard
    without them hard-linked), and speculation with it stays exact."""
    import os

    from angelmed.checkpoint import iter_checkpoint, load_model
    from angelmed.infer.engine import Engine, GenerationRequest
    from angelmed.serve.cli import make_drafter

    out = tmp_path / "mtp"
    assert train_main(_mtp_args(sharded_target_dir, out) + ["--draft.draft_vocab_size", "200"]) == 0
    assert "--draft mtp" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("eval")]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert evals[0]["mean_accept_length"] < max(e["mean_accept_length"] for e in evals), evals

    before = dict(iter_checkpoint(sharded_target_dir))
    after = dict(iter_checkpoint(out / "best"))
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("model.layers.3.") for n in changed), sorted(changed)[:5]
    assert {n for n in changed if ".mlp.experts." in n}  # the MTP layer's experts were trained too
    shard1 = "model-00001-of-00002.safetensors"
    assert os.stat(out / "best" / shard1).st_ino == os.stat(sharded_target_dir / shard1).st_ino
    assert (out / "best" / "draft_train_state.json").is_file()
    assert not (sharded_target_dir / "draft_train_state.json").exists()
    vocab = json.loads((out / "best" / "mtp_draft_vocab.json").read_text())["ids"]
    assert len(vocab) == 200 and {510, 511} <= set(vocab)  # stop ids kept
    from angelmed.commands import info

    assert info([str(out / "best"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mtp_draft_vocab"] == 200

    tuned = load_model(out / "best")
    ps = [[5, 9, 13, 2, 7], [100, 3, 3, 8], [42] * 6]
    plain = Engine(tuned, max_batch=3, max_seq_len=64).generate([GenerationRequest(p, max_tokens=16) for p in ps])
    drafter = make_drafter(tuned, "mtp", model_dir=out / "best")
    assert drafter.vocab_map.tolist() == sorted(vocab)
    spec = Engine(tuned, max_batch=3, max_seq_len=64, draft=drafter, spec_tokens=3)
    got = spec.generate([GenerationRequest(p, max_tokens=16) for p in ps])
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]


def test_train_mtp_resumes_exactly_after_a_crash(sharded_target_dir, tmp_path, monkeypatch):
    """An MTP run killed in step 5 (after its step-3 save) and started again ends with the uninterrupted run's
    MTP layer and losses."""
    from angelmed.checkpoint import iter_checkpoint

    args = lambda out: _mtp_args(sharded_target_dir, out, steps=6, every=3) + [  # noqa: E731
        "--draft.draft_vocab_size", "200"]
    assert train_main(args(tmp_path / "a")) == 0
    _killed_in_step_5(monkeypatch, args(tmp_path / "b"))
    assert train_main(args(tmp_path / "b")) == 0
    va, vb = ((tmp_path / r / "last" / "mtp_draft_vocab.json").read_text() for r in "ab")
    assert va == vb  # read back when resuming, not chosen again from batches further on
    a, b = dict(iter_checkpoint(tmp_path / "a" / "last")), dict(iter_checkpoint(tmp_path / "b" / "last"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    la, lb = ([json.loads(line).get("loss") for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in "ab")
    assert la == lb


def test_mtp_head_saves_its_vocabulary_and_never_the_source_one(sharded_target_dir, tmp_path):
    """A trained MTP layer saved with a draft vocabulary writes it beside the weights; saved without one, a stale
    vocabulary file in the source checkpoint is not carried over (it would restrict the drafter)."""
    import shutil

    from angelmed.checkpoint import load_model
    from angelmed.draft import MTP_DRAFT_VOCAB, MTPHead, read_mtp_draft_vocab

    src = tmp_path / "src"
    shutil.copytree(sharded_target_dir, src)
    (src / MTP_DRAFT_VOCAB).write_text(json.dumps({"ids": [1, 2, 3]}))
    target = load_model(src)
    MTPHead(target, src).save(tmp_path / "full")
    assert read_mtp_draft_vocab(tmp_path / "full") is None
    MTPHead(target, src, vocab_map=torch.tensor([4, 9, 7])).save(tmp_path / "sub")
    assert read_mtp_draft_vocab(tmp_path / "sub").tolist() == [4, 7, 9]
    assert read_mtp_draft_vocab(src).tolist() == [1, 2, 3]  # the source untouched
    (src / MTP_DRAFT_VOCAB).write_text("{}")
    with pytest.raises(ValueError, match="mtp_draft_vocab.json"):
        read_mtp_draft_vocab(src)


def test_train_mtp_config_errors(target_dir, tmp_path, capsys):
    assert train_main(["draft", "--target", str(target_dir), "--draft.kind", "mtp",
                       "--draft.init_from", str(target_dir)]) == 2
    assert "draft.init_from" in capsys.readouterr().err
    assert train_main(["draft", "--target", str(target_dir), "--draft.kind", "medusa"]) == 2
    assert "draft.kind" in capsys.readouterr().err
    no_mtp = tiny_model(0).drop_mtp()
    save_model(no_mtp, tmp_path / "no_mtp")
    assert train_main(["draft", "--target", str(tmp_path / "no_mtp"), "--draft.kind", "mtp"]) == 2
    assert "no MTP layer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fp8_target_dir(tmp_path_factory):
    """The confident tiny target as a block-FP8 checkpoint (the official converter's layout), in two shards."""
    return confident_target(tmp_path_factory, "fp8", fp8=True, shards=2)


@pytest.mark.parametrize("kind", ["eagle3", "mtp"])
def test_train_draft_against_a_resident_fp8_target(fp8_target_dir, tmp_path, caplog, kind):
    """`train.fp8: resident` keeps the target's FP8 weights resident (what lets a 103B target fit one GPU) and trains
    exactly what dequantising it at load trains: the same losses and the same saved draft. For `kind: mtp` the
    result is still the FP8 checkpoint, its main layers bit-identical to the source."""
    import logging

    from angelmed.checkpoint import iter_checkpoint

    args = lambda out: ([*_draft_args(fp8_target_dir, out, steps=4), "--draft.kind", kind]  # noqa: E731
                        + (["--train.eval_every", "4"] if kind == "mtp" else []))
    with caplog.at_level(logging.INFO, logger="angelmed.train.draft"):
        assert train_main([*args(tmp_path / "resident"), "--train.fp8", "resident"]) == 0
    assert "FP8 weights resident" in caplog.text
    assert train_main(args(tmp_path / "dequant")) == 0
    la, lb = ([json.loads(line).get("loss") for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("resident", "dequant"))
    assert len([x for x in la if x is not None]) == 4 and la == lb
    a, b = (dict(iter_checkpoint(tmp_path / r / "last")) for r in ("resident", "dequant"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    if kind == "mtp":
        src = dict(iter_checkpoint(fp8_target_dir))
        changed = {n for n in src if not torch.equal(src[n], a[n])}
        assert changed and all(n.startswith("model.layers.3.") for n in changed)
        assert a["model.layers.3.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
        assert json.loads((tmp_path / "resident" / "last" / "config.json").read_text())["quantization_config"]


def test_train_draft_fp8_resident_needs_an_fp8_target(target_dir, capsys):
    assert train_main(["draft", "--target", str(target_dir), "--train.fp8", "resident"]) == 2
    assert "not a block-FP8 checkpoint" in capsys.readouterr().err
    assert train_main(["draft", "--target", str(target_dir), "--train.fp8", "fp4"]) == 2
    assert "train.fp8" in capsys.readouterr().err

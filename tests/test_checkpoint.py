import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from angelmed.checkpoint import (CheckpointError, dequantize_fp8_block, load_model, quantize_fp8_block,
                                 save_model)
from angelmed.config import get_preset
from angelmed.model import Transformer


@pytest.fixture
def tiny_model():
    return Transformer(get_preset("tiny")).init_weights(seed=1).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, mtp=True)


IDS = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("shards", [None, 3])
def test_save_load_roundtrip_identical(tmp_path, tiny_model, shards):
    save_model(tiny_model, tmp_path / "ckpt", shards=shards)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    if shards:
        assert "model.safetensors.index.json" in files
        assert [f for f in files if f.startswith("model-")] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] > 0
    else:
        assert "model.safetensors" in files
    loaded = load_model(tmp_path / "ckpt", dtype="float32")
    a, b = _logits(tiny_model, IDS), _logits(loaded, IDS)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.mtp_logits[0], b.mtp_logits[0], rtol=0, atol=0)


def test_saved_names_are_official_and_bias_is_fp32(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "c", dtype="bfloat16")
    sd = load_file(tmp_path / "c" / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in sd
    assert "model.layers.3.eh_proj.weight" in sd and "lm_head.weight" in sd
    assert sd["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert sd["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert not any("inv_freq" in k for k in sd)


def test_bf16_load_keeps_expert_bias_fp32(fixtures_dir):
    model = load_model(fixtures_dir / "tiny_mtp", dtype="bfloat16")
    gate = model.model.layers[1].mlp.gate
    assert gate.expert_bias.dtype == torch.float32 and gate.weight.dtype == torch.bfloat16
    model.to(torch.bfloat16)
    assert gate.expert_bias.dtype == torch.float32


def test_fp8_roundtrip_of_fp8_checkpoint_is_exact(tmp_path, fixtures_dir):
    """Re-quantising dequantised FP8 weights gives back the same weights: the same bytes for plain
    scales; for UE8M0 blocks the power-of-two scale may drop one step (the block max was rounded
    down by the first quantisation) while the dequantised values stay identical."""
    model = load_model(fixtures_dir / "small_fp8", dtype="float32")
    save_model(model, tmp_path / "fp8", fp8=True)
    stored = load_file(fixtures_dir / "small_fp8" / "model.safetensors")
    ours = load_file(tmp_path / "fp8" / "model.safetensors")
    assert set(stored) == set(ours)
    for name, t in stored.items():
        assert ours[name].dtype == t.dtype, name
        if t.dtype == torch.float8_e4m3fn:
            s_ours, s_stored = ours[name + "_scale_inv"], stored[name + "_scale_inv"]
            assert torch.equal(dequantize_fp8_block(ours[name], s_ours), dequantize_fp8_block(t, s_stored)), name
            if not torch.all(torch.log2(s_stored) == torch.log2(s_stored).round()):  # plain scales
                assert torch.equal(ours[name].view(torch.uint8), t.view(torch.uint8)), name
                assert torch.equal(s_ours, s_stored), name
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    reloaded = load_model(tmp_path / "fp8", dtype="float32")
    ids = torch.from_numpy(np.load(fixtures_dir / "small_fp8" / "ids.npy"))
    np.testing.assert_allclose(_logits(reloaded, ids).logits.numpy(), np.load(fixtures_dir / "small_fp8" / "logits.npy"),
                               rtol=0, atol=2e-4)


def test_dequantize_matches_fixture_samples(fixtures_dir):
    stored = load_file(fixtures_dir / "small_fp8" / "model.safetensors")
    samples = load_file(fixtures_dir / "small_fp8" / "dequantized_samples.safetensors")
    for key, expected in samples.items():
        name = key
        got = dequantize_fp8_block(stored[name], stored[name + "_scale_inv"])
        assert torch.equal(got, expected), key


def test_quantize_block_rule_by_hand():
    w = torch.zeros(130, 5)
    w[0, 0], w[129, 4] = 448.0 * 2, -3.0  # two row blocks: scales 2.0 and 3/448
    q, s = quantize_fp8_block(w)
    assert s.shape == (2, 1)
    assert s[0, 0].item() == 2.0 and s[1, 0].item() == pytest.approx(3.0 / 448)
    assert q[0, 0].float().item() == 448.0 and q[129, 4].float().item() == -448.0
    _, s8 = quantize_fp8_block(w, ue8m0=True)
    assert s8[1, 0].item() == 2.0 ** -7  # 3/448 = 0.0067 rounded up to a power of two
    tiny = torch.full((4, 4), 1e-9)
    assert quantize_fp8_block(tiny)[1].item() == pytest.approx(1e-4 / 448)  # amax clamped at 1e-4


def test_fp8_conversion_error_band(tmp_path):
    """convert --fp8 of a random model: per-tensor relative error like the fixture's (~0.026)."""
    model = Transformer(get_preset("tiny").replace(hidden_size=256, head_dim=64, num_attention_heads=4,
                                                   moe_intermediate_size=160)).init_weights(2).eval()
    save_model(model, tmp_path / "fp8", fp8=True)
    back = load_model(tmp_path / "fp8", dtype="float32")
    w0 = model.model.layers[1].attention.query_key_value.weight
    w1 = back.model.layers[1].attention.query_key_value.weight
    rel = ((w1 - w0).norm() / w0.norm()).item()
    assert 0.01 < rel < 0.04
    torch.testing.assert_close(back.model.word_embeddings.weight, model.model.word_embeddings.weight.bfloat16().float())


def _ckpt(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "c")
    return tmp_path / "c"


def test_missing_tensor_error(tmp_path, tiny_model):
    d = _ckpt(tmp_path, tiny_model)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors.*experts.3.up_proj"):
        load_model(d)


def test_unknown_tensor_error(tmp_path, tiny_model):
    d = _ckpt(tmp_path, tiny_model)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="unknown tensors.*mystery"):
        load_model(d)


def test_wrong_shape_error(tmp_path, tiny_model):
    d = _ckpt(tmp_path, tiny_model)
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*\(65,\).*\(64,\)"):
        load_model(d)


def test_truncated_file_error(tmp_path, tiny_model):
    d = _ckpt(tmp_path, tiny_model)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d)


def test_unknown_model_type_error(tmp_path, tiny_model):
    d = _ckpt(tmp_path, tiny_model)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_model(d)


def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    d = _ckpt(tmp_path, tiny_model)
    before = (d / "model.safetensors").read_bytes()
    import angelmed.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_model(Transformer(get_preset("tiny")).init_weights(9), d)
    assert (d / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp litter


@pytest.mark.slow
def test_loading_needs_about_one_copy_of_memory(tmp_path):
    """Peak RSS while loading ~200 MB of weights stays well under twice the checkpoint size."""
    cfg = get_preset("base-100m").replace(num_hidden_layers=4)
    model = Transformer(cfg).init_weights(0)
    save_model(model, tmp_path / "big", dtype="float32")
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    del model
    code = ("import resource,sys;from angelmed.checkpoint import load_model;"
            "b=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"m=load_model(r'{tmp_path / 'big'}');"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-b)*1024)")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 1.5 * size, (grown, size)


def test_write_with_tensors_replaces_only_those_and_keeps_their_format(tmp_path, tiny_model):
    """A copy of a sharded block-FP8 checkpoint with two tensors replaced: a BF16 one is cast to BF16, an FP8 one
    quantised again with new block scales (in whichever shard they lie); every other tensor is bit-identical, and
    the source is untouched (extra files are written beside the links, never through them)."""
    import os

    from angelmed.checkpoint import iter_checkpoint, write_with_tensors

    save_model(tiny_model, tmp_path / "src", fp8=True, shards=3)
    src = dict(iter_checkpoint(tmp_path / "src"))
    fp8_name, bf16_name = "model.layers.3.attention.dense.weight", "model.layers.3.enorm.weight"
    assert src[fp8_name].dtype == torch.float8_e4m3fn and src[bf16_name].dtype == torch.bfloat16
    g = torch.Generator().manual_seed(5)
    new_fp8 = torch.randn(src[fp8_name].shape, generator=g) * 0.05
    new_bf16 = torch.full(src[bf16_name].shape, 0.75)
    write_with_tensors(tmp_path / "src", tmp_path / "dst", {fp8_name: new_fp8, bf16_name: new_bf16},
                       {"note.txt": "hello", "config.json": (tmp_path / "src" / "config.json").read_text()})
    dst = dict(iter_checkpoint(tmp_path / "dst"))
    assert dst.keys() == src.keys()
    assert dst[bf16_name].dtype == torch.bfloat16 and torch.equal(dst[bf16_name].float(), new_bf16)
    assert dst[fp8_name].dtype == torch.float8_e4m3fn
    back = dequantize_fp8_block(dst[fp8_name], dst[fp8_name + "_scale_inv"])
    assert (back - new_fp8).abs().max() <= new_fp8.abs().max() / 16  # e4m3: 3 mantissa bits
    replaced = {fp8_name, fp8_name + "_scale_inv", bf16_name}
    assert all(torch.equal(dst[n].view(torch.uint8) if dst[n].dtype == torch.float8_e4m3fn else dst[n],
                           src[n].view(torch.uint8) if src[n].dtype == torch.float8_e4m3fn else src[n])
               for n in src if n not in replaced)
    assert not torch.equal(dst[fp8_name + "_scale_inv"], src[fp8_name + "_scale_inv"])
    assert (tmp_path / "dst" / "note.txt").read_text() == "hello"
    assert os.stat(tmp_path / "dst" / "config.json").st_ino != os.stat(tmp_path / "src" / "config.json").st_ino
    assert dict(iter_checkpoint(tmp_path / "src")).keys() == src.keys()
    assert not (tmp_path / "src" / "note.txt").exists()
    load_model(tmp_path / "dst")  # still a loadable checkpoint
    with pytest.raises(CheckpointError, match="model.layers.9.nothing"):
        write_with_tensors(tmp_path / "src", tmp_path / "bad", {"model.layers.9.nothing": new_bf16})

"""FP8 block checkpoints run resident (fp8 weights + fp32 block scales) and dequantised at load.

Expectations come from the small_fp8 golden fixture (reference implementation outputs), from the
spec's dequantisation formula, and from checkpoint.py's converter-following FP8 writer.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from angelmed.checkpoint import (CheckpointError, dequantize_fp8_block, hf_state_dict, iter_checkpoint, load_model,
                                 quantize_fp8_block, save_model)
from angelmed.config import get_preset
from angelmed.infer import quant
from angelmed.infer.generate import generate
from angelmed.infer.quant import (FP8Experts, FP8Linear, dequantize_model_, load_fp8, load_fp8_resident,
                                  quantize_model_, resident_weight_bytes)
from angelmed.model import Experts, Transformer

FP8 = torch.float8_e4m3fn
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"  # as tests/conftest.py
LOGITS_ATOL = 2e-4  # fixture README
MTP_ATOL = 1e-4
N_QUANTIZED = 92  # fixture README: quantised tensors in small_fp8
# Relative Frobenius error of one e4m3 128x128-block-quantised tensor: the fixture README measures
# 0.0262..0.0268 over its 92 tensors; the tiny preset's small (64-wide) tensors spread a little more.
FP8_REL_ERR_BAND = (0.020, 0.032)


@pytest.fixture(scope="module")
def fp8_dir():
    d = FIXTURES / "small_fp8"
    if not d.is_dir():
        pytest.skip(f"fixture not found at {d}")
    return d


@pytest.fixture(scope="module")
def resident(fp8_dir):
    return load_fp8_resident(fp8_dir, "float32")


@pytest.fixture(scope="module")
def fixture_tensors(fp8_dir):
    return dict(iter_checkpoint(fp8_dir))


def _ids(fp8_dir):
    return torch.from_numpy(np.load(fp8_dir / "ids.npy"))


def _u8(t):
    return t.view(torch.uint8)


# ---- golden fixture through the resident path -----------------------------------------------------
def test_resident_reproduces_fixture_logits_and_not_unquantized(resident, fp8_dir):
    with torch.no_grad():
        out = resident(_ids(fp8_dir), mtp=True)
    logits = out.logits.numpy()
    np.testing.assert_allclose(logits, np.load(fp8_dir / "logits.npy"), rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(out.hidden.numpy(), np.load(fp8_dir / "hidden.npy"), rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(out.mtp_logits[0].numpy(), np.load(fp8_dir / "mtp_logits.npy")[0], rtol=0,
                               atol=MTP_ATOL)
    routing = np.load(fp8_dir / "routing.npz")
    for layer, idx in zip((1, 2, 3), out.routing):
        np.testing.assert_array_equal(np.sort(idx.numpy(), -1), np.sort(routing[f"layer{layer}"], -1))
    # negative control: the FP8 weights, not the fp32 masters, were used
    assert np.abs(logits - np.load(fp8_dir / "logits_unquantized.npy")).max() > 1000 * LOGITS_ATOL


def test_resident_greedy_tokens(resident, fp8_dir):
    tokens = generate(resident, _ids(fp8_dir), 8)
    np.testing.assert_array_equal(tokens.numpy(), np.load(fp8_dir / "greedy_tokens.npy"))


def test_load_fp8_modes(fp8_dir):
    dq = load_fp8(fp8_dir, "dequant", "float32")
    assert not any(isinstance(m, (FP8Linear, FP8Experts)) for m in dq.modules())
    with torch.no_grad():
        logits = dq(_ids(fp8_dir)).logits.numpy()
    np.testing.assert_allclose(logits, np.load(fp8_dir / "logits.npy"), rtol=0, atol=LOGITS_ATOL)
    with pytest.raises(ValueError, match="unknown FP8 mode"):
        load_fp8(fp8_dir, "int4")


# ---- weights really stay FP8 ---------------------------------------------------------------------------
def test_weights_are_resident_fp8(resident, fixture_tensors):
    linears = [m for m in resident.modules() if isinstance(m, FP8Linear)]
    experts = [m for m in resident.modules() if isinstance(m, FP8Experts)]
    n_stored = len(linears) + sum(3 * m.gate_proj.shape[0] for m in experts)
    assert n_stored == N_QUANTIZED == sum(t.dtype == FP8 for t in fixture_tensors.values())
    for m in linears:
        assert m.weight.dtype == FP8 and m.weight_scale_inv.dtype == torch.float32
    for m in experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert getattr(m, name).dtype == FP8 and getattr(m, f"{name}_scale_inv").dtype == torch.float32
    # what stays a plain nn.Linear: lm_head and MTP eh_proj only (router/embedding are not Linear)
    plain = sorted(n for n, m in resident.named_modules() if type(m) is nn.Linear)
    assert plain == ["lm_head", "model.layers.3.eh_proj"]
    # the fp8 bytes in memory are the checkpoint's bytes
    qkv = resident.model.layers[1].attention.query_key_value
    assert torch.equal(_u8(qkv.weight), _u8(fixture_tensors["model.layers.1.attention.query_key_value.weight"]))
    e3 = fixture_tensors["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert torch.equal(_u8(resident.model.layers[2].mlp.experts.down_proj[3]), _u8(e3))

    b = resident_weight_bytes(resident)
    assert b["fp8"] == sum(t.numel() for t in fixture_tensors.values() if t.dtype == FP8)
    # quantised tensors: 1 byte per weight + one fp32 scale per (partial) 128x128 block, ~half of bf16
    assert 0.5 < (b["fp8"] + b["fp8_scales"]) / b["fp8_as_bf16"] < 0.51


def test_resident_bytes_vs_dequantized_bf16(fp8_dir):
    res = resident_weight_bytes(load_fp8_resident(fp8_dir, "bfloat16"))
    dq = resident_weight_bytes(load_model(fp8_dir, "bfloat16"))
    assert dq["fp8"] == 0 and dq["fp8_scales"] == 0
    assert dq["total"] == res["other"] + res["fp8_as_bf16"]  # same unquantised tensors, fp8 ones as bf16
    assert res["total"] < 0.7 * dq["total"]  # small_fp8: 10% of its bytes are embeddings/lm_head


def test_dtype_cast_keeps_fp8(fp8_dir):
    model = load_fp8_resident(fp8_dir, "float32").to(torch.bfloat16)
    qkv = model.model.layers[0].attention.query_key_value
    assert qkv.weight.dtype == FP8 and qkv.weight_scale_inv.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_proj.dtype == FP8
    assert model.model.word_embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(_ids(fp8_dir)).logits
    ref = torch.from_numpy(np.load(fp8_dir / "logits.npy"))
    assert torch.isfinite(logits).all() and (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


# ---- quantiser / dequantiser on fixture data -------------------------------------------------------------
def test_dequantize_matches_fixture_samples(resident, fp8_dir):
    samples = load_file(str(fp8_dir / "dequantized_samples.safetensors"))
    experts = resident.model.layers[1].mlp.experts
    assert torch.equal(experts.dequantized("gate_proj", 0), samples["model.layers.1.mlp.experts.0.gate_proj.weight"])
    assert torch.equal(experts.dequantized("down_proj", 0), samples["model.layers.1.mlp.experts.0.down_proj.weight"])
    got = quant.dequantize_blocks(experts.gate_proj[:1], experts.gate_proj_scale_inv[:1])[0]
    assert torch.equal(got, samples["model.layers.1.mlp.experts.0.gate_proj.weight"])


def test_requantizing_fixture_reproduces_stored_bytes(fixture_tensors):
    """quantize(dequantize(q, s)) == (q, s) bitwise, with one exact exception for power-of-two scales.

    A UE8M0 scale s is amax/448 rounded UP to 2^n, so a block's largest code lies in [224, 448]. When it
    is exactly 224, the re-quantiser sees amax = 224 s, whose scale 224 s / 448 = s/2 is already a power of
    two: the block comes back as (2q, s/2), the same values. All other blocks must reproduce bit for bit.
    """
    n_plain = n_pow2 = n_halved = 0
    for name, q in fixture_tensors.items():
        if q.dtype != FP8:
            continue
        s = fixture_tensors[name + "_scale_inv"]
        pow2 = bool(torch.all(s == torch.exp2(torch.log2(s).round())))
        q2, s2 = quantize_fp8_block(dequantize_fp8_block(q, s), ue8m0=pow2)
        if not pow2:
            n_plain += 1
            assert torch.equal(_u8(q2), _u8(q)) and torch.equal(s2, s), name
            continue
        n_pow2 += 1
        R, C = q.shape
        amax = F.pad(q.float().abs(), (0, -C % 128, 0, -R % 128)).view(s.shape[0], 128, s.shape[1], 128).amax((1, 3))
        halved = amax == 224
        assert torch.all((amax > 224) | halved), name
        n_halved += int(halved.sum())
        assert torch.equal(s2, torch.where(halved, s / 2, s)), name
        factor = dequantize_fp8_block(torch.ones_like(q, dtype=torch.float32), torch.where(halved, 2.0, 1.0))
        assert torch.equal(_u8(q2), _u8((q.float() * factor).to(FP8))), name
    assert (n_plain, n_pow2) == (40, 52)  # fixture README: 52 tensors carry UE8M0 scales
    assert n_halved > 0  # the exception does occur in this fixture


def test_requantizing_resident_model_restores_same_weights(fp8_dir):
    """dequantize_model_ then quantize_model_ picks the converter's scale kind per tensor (else values move)."""
    model = load_fp8_resident(fp8_dir, "float32")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    again = quantize_model_(dequantize_model_(model))
    for m_name, m in again.named_modules():
        if isinstance(m, FP8Linear):
            got = m.dequantized()
            want = dequantize_fp8_block(before[f"{m_name}.weight"], before[f"{m_name}.weight_scale_inv"])
            assert torch.equal(got, want), m_name
        elif isinstance(m, FP8Experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                want = quant.dequantize_blocks(before[f"{m_name}.{p}"], before[f"{m_name}.{p}_scale_inv"])
                assert torch.equal(m.dequantized(p), want), f"{m_name}.{p}"


# ---- in-memory quantisation and save/load round trips on a tiny model ---------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return Transformer(get_preset("tiny")).init_weights(3).eval()


def test_quantize_model_matches_fp8_checkpoint_writer(tiny):
    """Same tensor selection, scale kind and bytes as checkpoint.hf_state_dict(fp8=True) (the converter)."""
    sd = hf_state_dict(tiny, fp8=True)
    q_model = quantize_model_(copy.deepcopy(tiny))
    targets = quant._targets(q_model)
    want = {n for n, t in sd.items() if t.dtype == FP8}
    got = {n for n, t in targets.items() if t.dtype == FP8}
    assert got == want and len(want) == N_QUANTIZED
    for n in want:
        assert torch.equal(_u8(targets[n]), _u8(sd[n])), n
        assert torch.equal(targets[n + "_scale_inv"], sd[n + "_scale_inv"]), n
    assert type(q_model.model.layers[3].eh_proj) is nn.Linear and type(q_model.lm_head) is nn.Linear


def test_save_fp8_then_load_stays_in_fp8_error_band(tiny, tmp_path):
    save_model(tiny, tmp_path / "ck", fp8=True)
    res = load_fp8_resident(tmp_path / "ck", "float32")
    dq = load_model(tmp_path / "ck", "float32")
    master = hf_state_dict(tiny)
    errs = []
    for name, t in quant._targets(res).items():
        if t.dtype == FP8:
            w = dequantize_fp8_block(t, quant._targets(res)[name + "_scale_inv"])
            errs.append(float((w - master[name]).norm() / master[name].norm()))
    assert len(errs) == N_QUANTIZED
    assert FP8_REL_ERR_BAND[0] < min(errs) and max(errs) < FP8_REL_ERR_BAND[1], (min(errs), max(errs))
    ids = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got_res, got_dq = tiny(ids).logits, res(ids).logits, dq(ids).logits
    torch.testing.assert_close(got_res, got_dq, rtol=0, atol=1e-5)  # the two modes agree
    rel = float((got_res - ref).norm() / ref.norm())
    assert 0.005 < rel < 0.15, rel  # a few % weight error: logits close, but visibly not the fp32 ones
    # the in-memory path gives the same model as writing and reading the FP8 checkpoint
    mem = quantize_model_(copy.deepcopy(tiny))
    for p in mem.parameters():  # save_model(fp8=True) stores the unquantised tensors in bf16
        p.data = p.data.to(torch.bfloat16).float()
    with torch.no_grad():
        torch.testing.assert_close(mem(ids).logits, got_res, rtol=0, atol=1e-5)


# ---- module behaviour ---------------------------------------------------------------------------------------------
def test_fp8_linear_row_chunks_match_full_dequantization(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(200, 300, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(300, 200, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(300, generator=gen))
    m = FP8Linear.from_linear(lin, ue8m0=False)
    x = torch.randn(3, 5, 200, generator=gen)
    q, s = quantize_fp8_block(lin.weight.detach(), ue8m0=False)
    want = F.linear(x, dequantize_fp8_block(q, s), lin.bias.detach())
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 128 * 200)  # 128-row chunks: 3 chunks, last one partial
    calls = []
    real = quant.dequantize_blocks
    monkeypatch.setattr(quant, "dequantize_blocks", lambda q, s, dt=torch.float32: calls.append(q.shape) or real(q, s, dt))
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)
    assert calls == [(128, 200), (128, 200), (44, 200)]


def _random_experts(E=8, D=64, I=40, seed=2):
    ex = Experts(E, D, I)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return ex


@pytest.mark.parametrize("T", [1, 9])  # decode (T*k < E: gathered) and prefill (per expert)
def test_fp8_experts_match_dequantized_experts(T, monkeypatch):
    ex = _random_experts()
    fq = FP8Experts.from_experts(ex)
    E, I, D = ex.gate_proj.shape
    ref = Experts(E, D, I)
    with torch.no_grad():
        for name, ue8m0 in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            w = getattr(ex, name)
            getattr(ref, name).copy_(torch.stack([dequantize_fp8_block(*quantize_fp8_block(w[e], ue8m0))
                                                  for e in range(w.shape[0])]))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, 64, generator=gen)
    idx = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(T)])  # experts 6, 7 never used
    w = torch.rand(T, 2, generator=gen)
    seen = []
    real = quant.dequantize_blocks
    monkeypatch.setattr(quant, "dequantize_blocks", lambda q, s, dt=torch.float32: seen.append(q.shape) or real(q, s, dt))
    with torch.no_grad():
        got, want = fq(x, idx, w), ref(x, idx, w)
    assert got.dtype == torch.float32 and got.shape == (T, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    n_used = len(idx.unique())
    dequantized_experts = sum(s[0] * s[1] if len(s) == 4 else 1 for s in seen)
    assert dequantized_experts == 3 * (T * 2 if T * 2 < 8 else n_used) < 3 * 8


def test_activation_quantization_1x128():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 100.0]).repeat_interleave(128)
    q, s = quant.quantize_activations_1x128(x)
    assert q.dtype == FP8 and s.shape == (4, 2)
    assert torch.equal(q.float().abs().view(4, 2, 128).amax(-1), torch.full((4, 2), 448.0))
    back = q.float().view(4, 2, 128) * s[..., None]
    rel = (back.view(4, 256) - x).norm() / x.norm()
    assert 0 < rel < 0.04


@pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="torch without F.scaled_mm")
def test_block_scaled_gemm_call_is_well_formed():
    """Only the shape/layout contract (meta tensors): no sm90 GPU here to run the kernel itself."""
    x = torch.empty(5, 384, dtype=torch.bfloat16, device="meta")
    w = torch.empty(256, 384, dtype=FP8, device="meta")
    s = torch.empty(2, 3, dtype=torch.float32, device="meta")
    y = quant._scaled_mm_block(x, w, s, None)
    assert y.shape == (5, 256) and y.dtype == torch.bfloat16


# ---- errors -----------------------------------------------------------------------------------------------------
def test_resident_load_rejects_unquantized_and_incomplete_checkpoints(tiny, tmp_path):
    save_model(tiny, tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(CheckpointError, match="not a block-FP8 checkpoint"):
        load_fp8_resident(tmp_path / "bf16")
    save_model(tiny, tmp_path / "fp8", fp8=True)
    sd = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"]
    save_file(sd, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*experts\.5\.up_proj\.weight_scale_inv"):
        load_fp8_resident(tmp_path / "fp8")


def test_fp8_table_decode_equals_torch_conversion_for_all_codes():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).view(16, 16)
    got, want = quant.fp8_to_float32(codes), codes.float()
    assert torch.equal(got.isnan(), want.isnan())  # 0x7F / 0xFF
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    # hand-decoded (fixture README): subnormal m/8 * 2^-6, normal 2^(e-7) * (1 + m/8)
    flat = got.view(-1)
    assert [float(flat[c]) for c in (0x01, 0x08, 0x38, 0x7E, 0xB8)] == [2.0 ** -9, 2.0 ** -6, 1.0, 448.0, -1.0]


def test_resident_model_saves_as_the_same_fp8_checkpoint(tmp_path):
    """Saving an FP8-resident model writes its codes and scales unchanged (no requantisation)."""
    from safetensors.torch import load_file

    from angelmed.checkpoint import CheckpointError, save_model

    fixture = FIXTURES / "small_fp8"
    if not fixture.is_dir():
        pytest.skip("fixtures absent")
    model = load_fp8_resident(fixture, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="FP8 weights"):
        save_model(model, tmp_path / "bad")
    save_model(model, tmp_path / "out", fp8=True)
    stored, ours = load_file(fixture / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(stored) == set(ours)
    for name, t in stored.items():
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(ours[name].view(torch.uint8), t.view(torch.uint8)), name
        elif name.endswith("_scale_inv"):
            assert torch.equal(ours[name], t), name

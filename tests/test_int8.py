"""Int8 weight-only serving mode: each module equals the same computation with its dequantised weights (q * s),
the quantisation error is within the per-row bound, and the engine runs it eager and compiled."""

import copy

import pytest
import torch
import torch.nn.functional as F

from angelmed.checkpoint import CheckpointError, save_model
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.int8 import Int8Experts, Int8Linear, is_int8, quantize_int8_, quantize_rows
from angelmed.model import Experts
from test_engine import prompts, tiny_model


def test_quantize_rows_error_within_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different magnitude
    q, s = quantize_rows(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(s, w.abs().amax(1) / 127)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_dequantised_linear(dtype):
    lin = torch.nn.Linear(96, 40, bias=True).to(dtype)
    m = Int8Linear(lin)
    x = torch.randn(3, 5, 96).to(dtype)
    want = F.linear(x.float(), m.dequantized(torch.float32), m.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(m(x).float(), want, atol=tol, rtol=tol)


def _per_token_reference(ex: Int8Experts, x, idx, w):
    """y_t = sum_j w_tj * down_e (silu(gate_e x_t) * up_e x_t) with e = idx_tj and dequantised fp32 weights."""
    out = torch.zeros(x.shape[0], x.shape[1])
    g, u, d = (ex.dequantized(n) for n in ("gate_proj", "up_proj", "down_proj"))
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = F.silu(g[e] @ x[t].float()) * (u[e] @ x[t].float())
            out[t] += w[t, j] * (d[e] @ h)
    return out


@pytest.mark.parametrize("T", [1, 12])  # few pairs (gather under compile) and many (per-expert int8 matmuls)
def test_int8_experts_equal_a_per_token_loop(T):
    ex = Experts(8, 32, 24)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    q = Int8Experts(ex)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 32, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=g)
    want = _per_token_reference(q, x, idx, w)
    assert torch.allclose(q(x, idx, w), want, atol=1e-5)
    with torch.no_grad():  # many pairs: one opaque op, so the graph stays whole
        compiled = torch.compile(q.forward, dynamic=False, fullgraph=True)
        assert torch.allclose(compiled(x, idx, w), want, atol=1e-5)


def test_quantized_model_equals_model_with_dequantised_weights():
    """The whole model: int8 modules everywhere the FP8 converter quantises, and logits equal to a plain model
    holding q * s (so every module is wired to the right weights). The error against the original model is a
    measured number (benchmarks/bench_int8.py), not asserted here."""
    model = tiny_model(0)
    quant = quantize_int8_(copy.deepcopy(model))
    assert is_int8(quant) and sum(isinstance(m, Int8Experts) for m in quant.modules()) == sum(
        isinstance(m, Experts) for m in model.modules())
    ref = copy.deepcopy(model)
    for (name, m), (_, r) in zip(quant.named_modules(), ref.named_modules()):
        if isinstance(m, Int8Linear):
            r.weight.data.copy_(m.dequantized())
        elif isinstance(m, Int8Experts):
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(r, n).data.copy_(m.dequantized(n))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(quant(ids).logits, ref(ids).logits, atol=1e-4)
    with pytest.raises(CheckpointError, match="int8"):
        save_model(quant, "/tmp/never-written")


def test_engine_runs_int8_eager_and_compiled():
    model = quantize_int8_(tiny_model(0))
    ps = prompts(3, seed=5)
    eager = Engine(model, max_batch=4, max_seq_len=64).generate(
        [GenerationRequest(p, max_tokens=10, stop_ids=[]) for p in ps])
    compiled = Engine(model, max_batch=4, max_seq_len=64, compile=True).generate(
        [GenerationRequest(p, max_tokens=10, stop_ids=[]) for p in ps])
    assert [r.token_ids for r in eager] == [r.token_ids for r in compiled]
    solo = Engine(model, max_batch=1, max_seq_len=64)
    assert eager[0].token_ids == solo.generate([GenerationRequest(ps[0], max_tokens=10, stop_ids=[])])[0].token_ids


def test_build_engine_quantizes_on_request(tmp_path):
    from angelmed.serve.cli import build_engine
    from test_engine import ByteTokenizer

    save_model(tiny_model(0), tmp_path / "m")
    engine, _ = build_engine(str(tmp_path / "m"), max_batch=2, max_seq_len=64, tokenizer=ByteTokenizer(),
                             quantize="int8")
    assert is_int8(engine.model)
    from angelmed.serve.cli import engine_summary

    line = engine_summary(engine)  # the start-up line of `angelmed serve`
    assert line.startswith("weights int8 ") and "2 slots x 64 tokens" in line and "prefix reuse on" in line
    out = engine.generate([GenerationRequest([1, 2, 3], max_tokens=4, stop_ids=[])])[0]
    assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="choose one"):
        build_engine(str(tmp_path / "m"), tokenizer=ByteTokenizer(), fp8="resident", quantize="int8")


@pytest.mark.parametrize("fp8", [False, True])
def test_load_int8_streams_to_the_same_model(tmp_path, fp8):
    """Quantising tensor by tensor while loading (BF16 or block-FP8 checkpoint) gives exactly the model that
    loading in full and then quantising gives."""
    from angelmed.checkpoint import load_model
    from angelmed.infer.int8 import load_int8

    save_model(tiny_model(0), tmp_path / "m", dtype="bfloat16", fp8=fp8, shards=2)
    streamed = load_int8(tmp_path / "m")
    full = quantize_int8_(load_model(tmp_path / "m", dtype="bfloat16"))
    a, b = streamed.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

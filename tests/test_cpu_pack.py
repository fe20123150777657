"""Half precision on CPU (infer/cpu_pack.py): the dtype a checkpoint runs in, and oneDNN-packed bf16 weights (the
same numbers as the plain weights, never stale)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import angelmed.model as M
from angelmed.checkpoint import save_model
from angelmed.config import get_preset
from angelmed.infer import cpu_pack
from angelmed.infer.engine import Engine, GenerationRequest, compile_step
from angelmed.model import Transformer
from test_model import naive_experts, random_experts

native_bf16 = pytest.mark.skipif(not cpu_pack.native_gemm(torch.bfloat16),
                                 reason="needs a CPU whose oneDNN multiplies bf16")


def bf16_model(seed: int = 0) -> Transformer:
    return Transformer(get_preset("tiny")).init_weights(seed).to(torch.bfloat16).eval()


@native_bf16
def test_packed_linear_is_bit_identical_and_follows_in_place_updates():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    packed = cpu_pack.PackedLinear(lin)
    assert packed.weight is lin.weight  # shared, not copied
    with torch.no_grad():
        for rows in (1, 5, 40):
            x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
            assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))
        lin.weight.mul_(-2)  # the packed copy is stale now: eager forwards see it and use the new weight
        assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))
    x.requires_grad_(True)
    packed(x).sum().backward()  # with autograd: the plain weight, which receives the gradient
    assert lin.weight.grad is not None
    assert copy.deepcopy(packed).packed is None  # an opaque oneDNN tensor is not copied; the copy runs plain
    lin.float()  # moved data (the same Parameter objects): stale too
    with torch.no_grad():
        assert torch.equal(packed(x.float()), F.linear(x.float(), lin.weight, lin.bias))


@native_bf16
@pytest.mark.parametrize("compiled", [False, True])
def test_packed_dense_experts_equal_per_token_loop(compiled, monkeypatch):
    """Two packed GEMMs (all gates and ups in one, the down projections side by side along K, the gate weights
    applied before the down GEMM) equal the per-token loop within bf16 rounding, eager and compiled."""
    monkeypatch.setattr(M, "CPU_HAS_AMX", True)
    e, x, idx, w = random_experts(8, 16, 24, tokens=12, seed=3)
    want = naive_experts(e, x, idx, w)
    e = e.to(torch.bfloat16)
    e.pack_dense()
    fn = lambda x: e._dense(x, idx, w)  # noqa: E731
    if compiled:
        fn = compile_step(fn, torch.device("cpu"), freeze=True)
    with torch.no_grad():
        got = fn(x.bfloat16())
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


@native_bf16
def test_engine_packs_bf16_and_decodes_the_unpacked_tokens(monkeypatch):
    """Packed linear layers are bit-identical to plain ones: the same tokens and log-probs (experts off the dense
    path, whose packed form sums in another order). The packed copies cost their weights' bytes once more."""
    plain, model = bf16_model(), bf16_model()
    monkeypatch.setattr(M, "CPU_HAS_AMX", True)
    assert cpu_pack._dense_experts(model)
    assert Engine(model, max_batch=1, max_seq_len=64).packed_bytes == 2 * sum(
        p.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, M.Experts))
        for p in m.parameters())  # every linear layer, the head, and the experts
    monkeypatch.setattr(M, "CPU_DENSE_FLOPS", 0)
    eng = Engine(model, max_batch=1, max_seq_len=64)
    assert isinstance(model.model.layers[0].attention.query_key_value, cpu_pack.PackedLinear)
    ref = Engine(plain, max_batch=1, max_seq_len=64)
    cpu_pack.unpack_(plain)  # the reference engine packed its model too
    for ids in ([5, 17, 300, 2, 9], [44] * 12):
        req = lambda: GenerationRequest(ids, max_tokens=10, stop_ids=[], logprobs=True)  # noqa: E731
        got, want = eng.generate([req()])[0], ref.generate([req()])[0]
        assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
    monkeypatch.undo()
    twin, x = copy.deepcopy(model), torch.tensor([[5, 17, 300, 2, 9]])  # the packed copies are not copied
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, model(x).logits, rtol=0.05, atol=0.05)


@native_bf16
@pytest.mark.parametrize("compiled", [False, True])
def test_engine_repacks_after_in_place_weight_updates(compiled):
    """Weights loaded in place into an engine's model (a GRPO sync, a hot reload) are what it decodes with next,
    compiled too, where the graph holds the packed copies as constants."""
    model = bf16_model(0)
    eng = Engine(model, max_batch=2, max_seq_len=64, compile=compiled)
    reqs = lambda: [GenerationRequest(p, max_tokens=6, stop_ids=[]) for p in ([3, 1, 4, 1, 5], [9, 2, 6])]  # noqa: E731
    before = [r.token_ids for r in eng.generate(reqs())]
    other = bf16_model(1)
    model.load_state_dict(other.state_dict())
    got = [r.token_ids for r in eng.generate(reqs())]
    want = [r.token_ids for r in Engine(other, max_batch=2, max_seq_len=64).generate(reqs())]
    assert got == want != before


@native_bf16
def test_compiled_speculative_round_runs_on_packed_weights():
    """A compiled speculative round on a packed model (its graph freezes the packed copies) gives the eager
    round's tokens."""
    from angelmed.infer.speculative import MTPDrafter

    model = bf16_model(0)
    reqs = lambda: [GenerationRequest([7, 3, 99, 250, 41, 8], max_tokens=12, stop_ids=[])]  # noqa: E731
    eng = Engine(model, max_batch=1, max_seq_len=96, draft=MTPDrafter(model), spec_tokens=2, compile=True)
    assert eng.packed_bytes > 0
    compiled, calls = eng.spec._round_compiled, []
    eng.spec._round_compiled = lambda *a: calls.append(1) or compiled(*a)
    got = eng.generate(reqs())[0].token_ids
    assert calls, "the compiled round never ran"
    eager = Engine(model, max_batch=1, max_seq_len=96, draft=MTPDrafter(model), spec_tokens=2)
    assert got == eager.generate(reqs())[0].token_ids


@pytest.fixture
def bf16_checkpoint(tmp_path):
    save_model(Transformer(get_preset("tiny")).init_weights(0), tmp_path, dtype="bfloat16")
    return tmp_path


def test_bf16_checkpoint_runs_in_fp32_on_a_cpu_that_only_emulates_bf16(bf16_checkpoint, monkeypatch, caplog):
    """Loaded as stored, for fp32 arithmetic on bf16 matrices (`bf16_storage_`); without that, loaded in fp32."""
    monkeypatch.setattr(cpu_pack, "native_gemm", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(M, "CPU_HAS_AMX", False)
    with caplog.at_level("WARNING"):
        assert cpu_pack.inference_dtype(bf16_checkpoint) == torch.bfloat16
    assert "multiply in float32" in caplog.text and "--dtype float32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cpu_pack.inference_dtype(bf16_checkpoint, bf16_storage=False) == torch.float32
    assert "running in float32" in caplog.text and "--dtype bfloat16" in caplog.text
    assert cpu_pack.inference_dtype(bf16_checkpoint, "bfloat16") == torch.bfloat16  # a dtype named is kept
    assert cpu_pack.inference_dtype(bf16_checkpoint, device="meta") == torch.bfloat16  # not a CPU
    monkeypatch.setattr(cpu_pack, "memory_bytes", lambda: 1 << 20)  # fp32 weights would not fit: bf16, slow
    assert cpu_pack.inference_dtype(bf16_checkpoint, bf16_storage=False) == torch.bfloat16
    monkeypatch.setattr(cpu_pack, "native_gemm", lambda dtype: True)  # native bf16: the checkpoint's own
    assert cpu_pack.inference_dtype(bf16_checkpoint) == torch.bfloat16


def test_serve_and_eval_load_an_emulated_bf16_checkpoint_in_fp32(bf16_checkpoint, monkeypatch):
    """fp32 arithmetic with the matrices still stored in bf16 (cpu_kernels.store_bf16_), giving the tokens of the
    checkpoint loaded wholly in fp32; a dtype the user names is kept whole."""
    from angelmed.infer.backends import local_loglik_backend
    from angelmed.serve.cli import build_engine
    from angelmed.tokenizer import Tokenizer

    monkeypatch.setattr(cpu_pack, "native_gemm", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(M, "CPU_HAS_AMX", False)
    tok = Tokenizer.train(["chest pain with sweating", "call an ambulance"], 300)
    tok.save(bf16_checkpoint)
    req = lambda: [GenerationRequest([5, 9, 14, 2], max_tokens=6, stop_ids=[])]  # noqa: E731
    engine, _ = build_engine(str(bf16_checkpoint), max_batch=1, max_seq_len=32)
    model = engine.model
    assert engine.dtype == model.model.word_embeddings.weight.dtype == torch.float32
    assert model.head_weight.dtype == torch.bfloat16
    assert model.model.layers[0].attention.query_key_value.weight.dtype == torch.bfloat16
    got = engine.generate(req())[0].token_ids
    backend_model = local_loglik_backend(bf16_checkpoint).model
    assert (backend_model.head_weight.dtype, backend_model.model.word_embeddings.weight.dtype) == (
        torch.bfloat16, torch.float32)
    engine, _ = build_engine(str(bf16_checkpoint), max_batch=1, max_seq_len=32, dtype="float32")
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    assert engine.generate(req())[0].token_ids == got
    engine, _ = build_engine(str(bf16_checkpoint), max_batch=1, max_seq_len=32, dtype="bfloat16")
    assert engine.model.head_weight.dtype == engine.model.model.word_embeddings.weight.dtype == torch.bfloat16

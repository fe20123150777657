"""The fp32 CPU expert kernel (angelmed/cpu_kernels.py) against float64 arithmetic, and where the model uses it."""

import logging

import pytest
import torch
import torch.nn.functional as F

import angelmed.model as M
from angelmed import cpu_kernels
from test_model import naive_experts, random_experts


@pytest.fixture(scope="module")
def kernel():
    assert cpu_kernels.enable(), "the expert kernel did not build (see the warning logged)"
    return cpu_kernels.routed_experts


def routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=g).argsort(1)[:, :k], torch.rand(T, k, generator=g)


def experts_float64(x, idx, w, gate, up, down):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            h = F.silu(gate[e].double() @ x[t].double()) * (up[e].double() @ x[t].double())
            out[t] += w[t, j].double() * (down[e].double() @ h)
    return out


@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (5, 3, 2), (9, 7, 3)])
def test_equals_float64_arithmetic(kernel, T, E, k):
    """Experts with 0-9 rows (blocks of 4, 3, 2 and 1) and widths that leave a tail past the 16-float steps."""
    D, I = 40, 24
    e, *_ = random_experts(E, D, I, tokens=1, seed=T)
    x = torch.randn(T, D)
    idx, w = routing(T, E, k, seed=T)
    weights = (e.gate_proj.detach(), e.up_proj.detach(), e.down_proj.detach())
    got = kernel(x, idx, w, *weights)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), experts_float64(x, idx, w, *weights), rtol=2e-5, atol=2e-5)


def test_a_tokens_result_does_not_depend_on_its_batch(kernel):
    """Bit for bit: a token gives the same output alone and among 11 others that share its experts (so its expert
    rows run in blocks of 4 beside theirs): a batched decode equals one-by-one decoding exactly on this path."""
    e, *_ = random_experts(4, 64, 32, tokens=1, seed=1)
    weights = (e.gate_proj.detach(), e.up_proj.detach(), e.down_proj.detach())
    x, (idx, w) = torch.randn(12, 64), routing(12, 4, 2, seed=1)
    together = kernel(x, idx, w, *weights)
    for t in range(12):
        assert torch.equal(kernel(x[t:t + 1], idx[t:t + 1], w[t:t + 1], *weights)[0], together[t])


def test_bad_inputs_name_the_problem(kernel):
    e, *_ = random_experts(3, 16, 16, tokens=1)
    weights = (e.gate_proj.detach(), e.up_proj.detach(), e.down_proj.detach())
    x, (idx, w) = torch.randn(4, 16), routing(4, 3, 2)
    with pytest.raises(RuntimeError, match=r"expert index 3 out of range \[0, 3\)"):
        kernel(x, idx.clone().fill_(3), w, *weights)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(x.bfloat16(), idx, w, *(t.bfloat16() for t in weights))
    with pytest.raises(RuntimeError, match="shapes disagree"):
        kernel(torch.randn(4, 8), idx, w, *weights)


def test_experts_run_it_for_inference_with_few_rows(kernel, monkeypatch):
    """Without autograd and at most CPU_ROWS_KERNEL_ROWS rows an expert on average, the grouped path runs the
    kernel, eager and compiled (called straight from the graph), and equals the per-token loop; with autograd, or
    more rows, it runs GEMMs."""
    e, x, idx, w = random_experts(8, 16, 24, tokens=20, seed=3)  # 40 pairs: 5 an expert
    want = naive_experts(e, x, idx, w).detach()
    calls = []
    monkeypatch.setattr(M, "CPU_ROWS_KERNEL", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        torch.testing.assert_close(e._grouped(x, idx, w), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        monkeypatch.setattr(M, "CPU_ROWS_KERNEL_ROWS", 4)
        torch.testing.assert_close(e._grouped(x, idx, w), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        monkeypatch.setattr(M, "CPU_ROWS_KERNEL_ROWS", 16)
        monkeypatch.setattr(M, "CPU_GATHER_BYTES", 0)
        graph = []
        monkeypatch.setattr(M, "CPU_ROWS_KERNEL", kernel)  # the graph calls the op itself
        compiled = torch.compile(e, fullgraph=True, backend=lambda gm, ex: graph.append(gm) or gm.forward)
        torch.testing.assert_close(compiled(x, idx, w), want, rtol=1e-5, atol=1e-5)
        assert "angelmed_cpu.routed_experts" in graph[0].code
    monkeypatch.setattr(M, "CPU_ROWS_KERNEL", lambda *a: calls.append(1) or kernel(*a))
    e._grouped(x, idx, w).sum().backward()
    assert len(calls) == 1 and e.gate_proj.grad is not None


def test_without_a_compiler_the_gemm_path_runs(monkeypatch, caplog):
    """A failed build warns once, names the cause, and leaves the experts on GEMMs."""
    from torch.utils import cpp_extension

    def no_compiler(*a, **kw):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(M, "CPU_ROWS_KERNEL", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    e, x, idx, w = random_experts(8, 16, 24, tokens=6, seed=4)
    with caplog.at_level(logging.WARNING, logger="angelmed.cpu_kernels"), torch.no_grad():
        assert not cpu_kernels.enable() and not cpu_kernels.enable()
        got = e._grouped(x, idx, w)
    assert len([r for r in caplog.records if "command not found" in r.getMessage()]) == 1
    torch.testing.assert_close(got, naive_experts(e, x, idx, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,N,K", [(1, 5, 40), (3, 7, 16), (9, 33, 70)])
def test_rows_linear_equals_float64_arithmetic(kernel, T, N, K):
    """Row blocks of 4, 3, 2 and 1, weight rows spread over tasks, and K past the last 16-float step."""
    g = torch.Generator().manual_seed(T)
    x, w = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    got = cpu_kernels.rows_linear(x, w)
    assert got.shape == (T, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=2e-5, atol=2e-5)
    x3 = x.view(1, T, K)  # leading dims pass through, as for nn.Linear
    assert torch.equal(cpu_kernels.rows_linear(x3, w), got.view(1, T, N))


def test_rows_linear_row_does_not_depend_on_its_batch(kernel):
    x, w = torch.randn(11, 64), torch.randn(48, 64)
    together = cpu_kernels.rows_linear(x, w)
    for t in range(11):
        assert torch.equal(cpu_kernels.rows_linear(x[t:t + 1], w)[0], together[t])


def test_rows_linear_bad_inputs_name_the_problem(kernel):
    with pytest.raises(RuntimeError, match=r"x \[T, K\] and w \[N, K\]"):
        cpu_kernels.rows_linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.rows_linear(torch.randn(2, 8).double(), torch.randn(4, 8).double())


def test_engine_multiplies_few_rows_of_its_linears_with_the_kernel(kernel, monkeypatch):
    """An fp32 CPU engine swaps its model's linear layers for RowsLinear (same parameters and state dict): batches
    of up to CPU_ROWS_LINEAR_ROWS rows run the kernel, layers and head alike, the head up to CPU_ROWS_HEAD_ROWS;
    the greedy tokens equal plain decoding, and training through the swapped layers still runs autograd's GEMMs.
    graph_rows() gives the first batch past each limit its own compiled graph; compiled, one-row products stay
    inductor's."""
    from test_engine import greedy_ref, prompts, tiny_model

    from angelmed.infer.engine import Engine, GenerationRequest

    model = tiny_model()
    ps = prompts(3, seed=21)
    want = [greedy_ref(model, p, 7) for p in ps]
    keys = list(model.state_dict())
    calls = []
    kernel_linear = cpu_kernels.rows_linear
    monkeypatch.setattr(M, "CPU_ROWS_LINEAR",
                        lambda x, w: calls.append((x.shape[0], w.shape[0])) or kernel_linear(x, w))
    eng = Engine(model, max_batch=20, max_seq_len=64)
    assert isinstance(model.model.layers[0].attention.query_key_value, cpu_kernels.RowsLinear)
    assert list(model.state_dict()) == keys
    assert eng.graph_rows() == [1, 2, M.CPU_ROWS_LINEAR_ROWS + 1, M.CPU_ROWS_HEAD_ROWS + 1]
    res = eng.generate([GenerationRequest(p, max_tokens=7, stop_ids=[]) for p in ps])
    assert [r.token_ids for r in res] == want
    assert {w for rows, w in calls if rows == 3} > {model.config.vocab_size}  # 3-row steps: layers and head
    calls.clear()
    eng.generate([GenerationRequest(p, max_tokens=2, stop_ids=[]) for p in prompts(12, seed=22)])
    assert {w for rows, w in calls if rows == 12} == {model.config.vocab_size}  # 12 rows: the head only
    n = len(calls)
    model(torch.tensor([ps[0]])).logits.sum().backward()
    assert len(calls) == n and model.model.layers[0].attention.query_key_value.weight.grad is not None

    lin = model.model.layers[0].attention.dense
    graphs = []
    compiled = torch.compile(lin, fullgraph=True, dynamic=True,
                             backend=lambda gm, ex: graphs.append(gm.code) or gm.forward)
    monkeypatch.setattr(M, "CPU_ROWS_LINEAR", kernel_linear)
    with torch.no_grad():
        for rows in (3, 1):
            x = torch.randn(rows, lin.in_features)
            torch.testing.assert_close(compiled(x), x @ lin.weight.T, rtol=1e-5, atol=1e-5)
    assert "angelmed_cpu.rows_linear" in graphs[0] and "rows_linear" not in graphs[-1]


def test_bf16_weights_give_the_products_of_their_fp32_values(kernel):
    """bf16 weights are widened exactly as they are loaded: bit for bit the products of the same values in fp32
    (row blocks of 4, 3, 2 and 1, a K tail), for linears and experts; other dtypes are named in the error."""
    g = torch.Generator().manual_seed(5)
    for T, N, K in [(1, 5, 40), (7, 33, 70), (16, 12, 128)]:
        x, w = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g).bfloat16()
        assert torch.equal(cpu_kernels.rows_linear(x, w), cpu_kernels.rows_linear(x, w.float()))
    e, *_ = random_experts(5, 40, 24, tokens=1, seed=6)
    weights = [p.detach().bfloat16() for p in (e.gate_proj, e.up_proj, e.down_proj)]
    x, (idx, w) = torch.randn(9, 40), routing(9, 5, 3, seed=6)
    got = kernel(x, idx, w, *weights)
    assert torch.equal(got, kernel(x, idx, w, *(t.float() for t in weights)))
    torch.testing.assert_close(got.double(), experts_float64(x, idx, w, *weights), rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="weights must be float32 or bfloat16, got Half"):
        cpu_kernels.rows_linear(x, torch.randn(4, 40).half())
    with pytest.raises(RuntimeError, match="gate, up and down must be float32 or bfloat16, one dtype"):
        kernel(x, idx, w, weights[0], weights[1].float(), weights[2])


def test_store_bf16_keeps_a_bf16_checkpoints_matrices_in_bf16_and_its_outputs(kernel, monkeypatch):
    """A model whose values are all bf16 (a bf16 checkpoint loaded in fp32) keeps its linear weights, head and
    experts in bf16, everything else in fp32, and gives the fp32 model's outputs bit for bit: prefill logits (wide
    products on a widened copy) and an engine's greedy tokens and log-probs (few rows on the kernel). A model with
    one value bf16 cannot hold is left alone. A bf16 model becomes the same. Compiled, a bf16 weight's one-row
    product runs the kernel as well."""
    import copy

    from test_engine import prompts, tiny_model

    from angelmed.infer.engine import Engine, GenerationRequest

    monkeypatch.setattr(M, "CPU_HAS_AMX", False)  # a CPU that only emulates bf16 (with AMX it runs natively)
    ref = tiny_model().bfloat16().float()
    model = copy.deepcopy(ref)
    mats = [model.head_weight] + [p for n, p in model.named_parameters() if ".experts." in n or
                                  n.endswith(("query_key_value.weight", "dense.weight", "proj.weight"))]
    assert cpu_kernels.store_bf16_(model) == 2 * sum(p.numel() for p in mats)
    bf16 = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert bf16 == {n for n, p in model.named_parameters() if any(p is m for m in mats)}
    assert model.model.word_embeddings.weight.dtype == model.model.norm.weight.dtype == torch.float32
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    ps = prompts(3, seed=24)
    reqs = lambda: [GenerationRequest(p, max_tokens=6, stop_ids=[], logprobs=True) for p in ps]  # noqa: E731
    want, got = (Engine(m, max_batch=3, max_seq_len=48).generate(reqs()) for m in (ref, model))
    assert [(r.token_ids, r.logprobs) for r in got] == [(r.token_ids, r.logprobs) for r in want]
    assert got[0].logprobs is not None

    as_stored = tiny_model().bfloat16()  # a bf16 model (loaded as stored): the rest widens, the same outputs
    as_stored.inv_freq = ref.inv_freq.clone()  # (load_model computes it in fp32)
    assert cpu_kernels.store_bf16_(as_stored) == 2 * sum(p.numel() for p in mats)
    assert {n for n, p in as_stored.named_parameters() if p.dtype == torch.bfloat16} == bf16
    with torch.no_grad():
        assert torch.equal(as_stored(ids).logits, ref(ids).logits)

    lin = model.model.layers[0].attention.dense  # compiled: one row runs the kernel too, 12 rows a widened copy
    graphs = []
    compiled = torch.compile(lin, fullgraph=True, dynamic=False,
                             backend=lambda gm, ex: graphs.append(gm.code) or gm.forward)
    with torch.no_grad():
        for rows in (1, 12):
            x = torch.randn(rows, lin.in_features)
            torch.testing.assert_close(compiled(x), x @ lin.weight.float().T, rtol=1e-5, atol=1e-5)
    assert "angelmed_cpu.rows_linear" in graphs[0] and "rows_linear" not in graphs[1]

    other = tiny_model()
    with torch.no_grad():
        other.model.layers[0].attention.dense.weight[0, 0] = 1 + 2 ** -20  # not a bf16
    assert cpu_kernels.store_bf16_(other) == 0 and {p.dtype for p in other.parameters()} == {torch.float32}

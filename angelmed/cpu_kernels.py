"""C++ kernels for fp32 products of few rows on CPU (decode): the routed experts, and plain linear layers.

At decode an expert multiplies the few rows routed to it, and one core of an AVX2 EPYC runs such GEMMs far below
its memory bandwidth: MKL streams a 1536x512 fp32 weight at 6.7 GB/s for 2 rows and 4.6 GB/s for 16, oneDNN with
the weight packed ahead at 10.8 and 5.5, where a plain read streams 14-16 GB/s. `routed_experts`
(csrc/few_rows.cpp) groups a layer's (token, expert) pairs by expert, reads each expert weight row once, straight
from memory, dots it with all of the expert's inputs, 1-4 at a time, and sums each token's experts back: base-100m's
MoE layers at 16 tokens (64 pairs on 24 experts) run 2.3x faster than grouped_mm's per-expert GEMMs, and the gain
fades towards 20 rows an expert (benchmarks/bench_expert_rows.py). A token's result depends on its own routing only.
`rows_linear` is the same product for a linear layer's weight: at 2-8 rows (a speculative verify, a small batch)
1.2-2.9x MKL's GEMM, at 16 about even but for the output head, 1.3-1.7x (`bench_expert_rows.py --linears`).

Both read fp32 weights or bf16 ones, widened to fp32 as they are loaded (exact), so that a bf16 checkpoint on a CPU
that only emulates bf16 keeps its matrices in bf16 while it computes in fp32 (`store_bf16_`: half the weight memory;
base-100m's compiled decode 1.31-1.47x faster at batch 1, `benchmarks/bench_bf16_storage.py`).

`enable()` builds them and hands them to the model (model.CPU_ROWS_KERNEL and CPU_ROWS_LINEAR); the engine calls it
for fp32 CPU models and swaps their nn.Linear modules for `RowsLinear` (`use_for_linears_`). Built with
torch.utils.cpp_extension on first use (a C++ compiler and ninja; about 17 s on 2 cores, once per CPU model, as it
targets this CPU's vector instructions) and cached under ~/.cache/angelmed/extensions. Where it cannot be built,
one warning says why and the model runs its GEMMs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import angelmed.model as M
from angelmed.paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "few_rows.cpp"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_tag() -> str:
    """Names the build after this CPU's model and instruction sets: it is compiled with -march=native."""
    ident = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        ident += "".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags")}))
    except OSError:
        ident += platform.processor()
    return hashlib.sha256(ident.encode()).hexdigest()[:10]


def enable() -> bool:
    """Builds the kernel on the first call (about 16 s once, then cached) and hands it to the model's fp32 CPU
    expert path; whether it is on."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _build()
                if _state["ok"]:
                    M.CPU_ROWS_KERNEL, M.CPU_ROWS_LINEAR = routed_experts, rows_linear
    return _state["ok"]


def _build() -> bool:
    from torch.utils import cpp_extension

    name = f"angelmed_expert_rows_{_cpu_tag()}"
    if shutil.which("ninja") is None:  # the pip wheel's binary, outside PATH when the venv is not activated
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build_dir = cache_root() / "extensions" / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native"],
                           build_directory=str(build_dir), is_python_module=False)
    except Exception as e:  # no compiler, no ninja, an unwritable cache: the GEMM path still runs
        log.warning("fp32 expert kernel unavailable (%s: %s); few-row experts on CPU use GEMMs, slower at decode",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return False
    # its shape for torch.compile: a compiled graph calls the kernel directly, no Python between
    torch.library.register_fake("angelmed_cpu::routed_experts")(lambda x_TD, *rest: torch.empty_like(x_TD))
    torch.library.register_fake("angelmed_cpu::rows_linear")(lambda x_TK, w_NK: x_TK.new_empty(x_TK.shape[0],
                                                                                              w_NK.shape[0]))
    return True


def routed_experts(x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor, gate_EID: Tensor, up_EID: Tensor,
                   down_EDI: Tensor) -> Tensor:
    """The routed experts' output (fp32, like `model.grouped_experts`): sum_j w[t, j] * expert idx[t, j] (x[t]),
    summed in j order, so a token's result depends on its own routing only. fp32 contiguous CPU tensors; call
    `enable()` first."""
    return torch.ops.angelmed_cpu.routed_experts(x_TD.contiguous(), idx_Tk.contiguous(), w_Tk.float().contiguous(),
                                                 gate_EID, up_EID, down_EDI)


def rows_linear(x: Tensor, w_NK: Tensor) -> Tensor:
    """x @ w_NK.T for fp32 CPU tensors with few rows (x [..., K]); row t depends on x[t] only. Call `enable()`
    first."""
    return torch.ops.angelmed_cpu.rows_linear(x.reshape(-1, x.shape[-1]).contiguous(), w_NK).view(
        *x.shape[:-1], w_NK.shape[0])


class RowsLinear(nn.Linear):
    """nn.Linear sharing the original's parameters, whose few-row fp32 inference products run `rows_linear`."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects: no copy

    def forward(self, x: Tensor) -> Tensor:
        if M.rows_linear_pays(x, self.weight):
            y = M.CPU_ROWS_LINEAR(x, self.weight)
            return y if self.bias is None else y + self.bias
        return F.linear(x, M.widened(self.weight, x), self.bias)


def use_for_linears_(model: nn.Module) -> int:
    """In place: every plain nn.Linear of `model` becomes a RowsLinear (same parameters, same state dict); returns
    how many. The output head multiplies in `Transformer.logits_from_hidden`, which asks the kernel itself."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, RowsLinear(child))
                swapped += 1
    return swapped


def bf16_storage_available() -> bool:
    """Whether `store_bf16_` can run here: the kernel builds, and bf16 is not native (AMX)."""
    return not M.CPU_HAS_AMX and enable()


def store_bf16_(model: nn.Module) -> int:
    """In place, for inference on CPU: fp32 arithmetic with the matrices stored in bf16, half the memory of fp32
    weights and half the bytes a decode step streams. The kernel widens each weight as it loads it (exactly: a bf16
    is the top half of an fp32), and products of more rows (prefill) multiply a widened copy (model.widened).
    Matrices are the linear layers' weights, the output head's among them, and the routed experts; embeddings, norms,
    router and biases are fp32. Takes a bf16 model (a bf16 checkpoint loaded as stored: the rest is widened) or an
    fp32 one whose matrices all hold bf16 values (narrowed); the outputs equal those of the fp32 weights, bit for bit
    where the kernel runs. Any other model (an fp32-trained one), a CPU with AMX (bf16 runs natively, and its dense
    expert path wants bf16 inputs), or no kernel: left as it is. Returns the bytes saved against fp32 weights."""
    if not bf16_storage_available():
        return 0
    use_for_linears_(model)  # an nn.Linear could not multiply fp32 inputs by a bf16 weight
    mats = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    for m in model.modules():
        if isinstance(m, M.Experts):
            mats.update({id(p): p for p in (m.gate_proj, m.up_proj, m.down_proj)})
    if not mats or any(p.device.type != "cpu" for p in mats.values()):
        return 0
    dtypes = {p.dtype for p in mats.values()}
    if dtypes == {torch.bfloat16}:  # loaded as stored: everything else to fp32
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in mats and t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
    elif dtypes == {torch.float32} and all(_holds_bf16(p) for p in mats.values()):
        for p in mats.values():
            p.data = p.data.bfloat16()
    else:
        return 0
    return sum(2 * p.numel() for p in mats.values())


def _holds_bf16(t: Tensor) -> bool:
    """Whether every value of fp32 tensor t is a bf16 (its low 16 bits are zero), in chunks: no full-size copy."""
    bits = t.detach().reshape(-1).view(torch.int32)
    return not any(bool((chunk & 0xFFFF).any()) for chunk in bits.split(1 << 22))

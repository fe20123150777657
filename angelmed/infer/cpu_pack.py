"""Half precision on CPU: which dtype to run a checkpoint in, and bf16 weights reordered once for oneDNN.

Not every CPU multiplies bf16 natively. Without AVX512 or AMX (AVX2-only x86: most laptops, many EPYC servers),
oneDNN emulates it, and a bf16 GEMM runs 2.1x (1 row), 5.5x (16 rows) and 8.8x (512 rows) slower than fp32
(512x1536 weight, one thread of an AVX2 AMD EPYC). On such a CPU, when the user names no dtype, a bf16 checkpoint
loads as stored and `bf16_storage_` runs it with fp32 arithmetic, its matrices still bf16 (the few-rows kernel,
angelmed/cpu_kernels.py, widens them to fp32 as it reads them); without that kernel, or for fp16, `inference_dtype`
loads it in fp32 when the fp32 weights fit in memory.

oneDNN multiplies bf16 in a blocked weight layout. Handed a plain [N, K] weight, it reorders it on every call, so a
GEMM of a few rows reads and writes the weight once more than it needs: a weight packed ahead streams 1.7-1.8x as
fast at 1-64 rows (6144x512, one thread of a CPU with AMX; equal at 512 rows; bit-identical results;
benchmarks/bench_cpu_pack.py). Decode multiplies 1-64 rows per step, so the engine packs a bf16 model's projections
when it starts: every nn.Linear (attention, MLPs, shared experts, MTP), the output head, and, where the dense expert
path can run (`Experts.dense_pays`, small experts only), all experts as two concatenated weights.

A packed copy adds its weight's bytes once more (base-100m: 183 MB on a 192 MB model, as its experts are small
enough for the dense path; Ling-flash-2.0's are not, so it adds only its 2.4 B projection and head parameters,
4.7 GB on 206 GB). It serves forwards without autograd; training runs the plain weights. A copy goes stale when its
weight changes in place: eager forwards check the weight's version counter and fall back to the plain weight; the
engine packs again before it admits requests to changed weights.

In a compiled graph, inductor accepts a packed weight only as a frozen constant: the engine's compiled decode step
and speculative round freeze the parameters (inline them by reference); other compiled graphs multiply the plain
weights.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from angelmed.cpu_kernels import RowsLinear, bf16_storage_available, store_bf16_
from angelmed.model import Experts, Packed, Transformer

log = logging.getLogger(__name__)


def native_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN multiplies `dtype` natively (bf16: AVX512 or AMX; fp16: AVX512-FP16 or AMX-FP16)."""
    if dtype == torch.bfloat16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


def memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def inference_dtype(model_dir, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                    bf16_storage: bool = True) -> torch.dtype:
    """The dtype to load checkpoint `model_dir` in: `dtype` when given, else the checkpoint's own, except half
    precision on a CPU without native GEMMs for it, where fp32 runs several times faster (module docstring). A bf16
    checkpoint there loads as stored when `bf16_storage` and the few-rows kernel builds: `bf16_storage_` then runs it
    with fp32 arithmetic on bf16 matrices. Otherwise the fp32 copy doubles the weights' memory: it is chosen only
    while it fits in 80% of this machine's RAM."""
    from angelmed.checkpoint import _dtype, checkpoint_bytes
    from angelmed.config import ModelConfig

    if dtype is not None:
        return _dtype(dtype)
    cfg = ModelConfig.from_json(model_dir)
    stored = _dtype(cfg.torch_dtype)
    if torch.device(device).type != "cpu" or native_gemm(stored):
        return stored
    name = str(stored).removeprefix("torch.")
    if bf16_storage and stored == torch.bfloat16 and not cfg.quantization_config and bf16_storage_available():
        log.warning("%s: stored in bfloat16, which this CPU multiplies only by emulation (no AVX512/AMX): its "
                    "matrices stay bfloat16 (%.1f GB) and multiply in float32, several times faster here "
                    "(--dtype bfloat16 keeps bfloat16 arithmetic, --dtype float32 float32 weights)",
                    model_dir, checkpoint_bytes(cfg, dtype_bytes=2) / 1e9)
        return stored
    fp32 = checkpoint_bytes(cfg, dtype_bytes=4)
    if fp32 > 0.8 * memory_bytes():
        log.warning("%s: stored in %s, which this CPU multiplies only by emulation (several times slower than "
                    "float32), but float32 weights (%.1f GB) would not fit in memory: running in %s",
                    model_dir, name, fp32 / 1e9, name)
        return stored
    log.warning("%s: stored in %s, which this CPU multiplies only by emulation (no AVX512/AMX): running in float32, "
                "several times faster here, at %.1f GB of weights instead of %.1f (--dtype %s keeps %s)",
                model_dir, name, fp32 / 1e9, checkpoint_bytes(cfg, dtype_bytes=stored.itemsize) / 1e9, name, name)
    return torch.float32


def bf16_storage_(model: nn.Module, dtype: str | torch.dtype | None) -> int:
    """A bf16 checkpoint loaded with `inference_dtype(model_dir, dtype)` and no dtype asked for, on a CPU that only
    emulates bf16: fp32 arithmetic with the matrices stored in bf16 (cpu_kernels.store_bf16_: half the weight memory
    of fp32 and the bytes a decode step reads, outputs those of fp32 weights). A dtype the user named is kept whole.
    Returns the bytes saved against fp32."""
    p = next(model.parameters())
    if dtype is not None or p.device.type != "cpu" or native_gemm(torch.bfloat16):
        return 0
    saved = store_bf16_(model)
    if saved:
        log.info("matrices kept in bfloat16 (%.2f GB less than float32), float32 arithmetic", saved / 1e9)
    return saved


def supported(model: nn.Module) -> bool:
    """bf16 weights on a CPU whose oneDNN multiplies bf16 (AVX512-BF16 or AMX)."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.bfloat16 and native_gemm(torch.bfloat16)


class PackedLinear(nn.Linear):
    """nn.Linear sharing the original's parameters, with a packed copy of the weight for forwards without autograd."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects: no copy
        self.packed: Packed | None = Packed(linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None and self.packed.usable(x):
            return self.packed(x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def plain(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin


def _linears(model: Transformer) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, module) of every linear layer; the head is packed apart (`logits_from_hidden`)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child is not model.lm_head]


def _dense_experts(model: Transformer) -> list[Experts]:
    """The experts whose dense path can run: past E (token, expert) pairs at the fewest tokens that get there."""
    k = model.config.num_experts_per_tok
    return [m for m in model.modules() if isinstance(m, Experts)
            and m.dense_pays(m.gate_proj.shape[0] // k + 1, k, m.gate_proj.device)]


def _fresh(p: Packed | None) -> bool:
    return p is not None and not p.stale()


def pack_(model: Transformer) -> int:
    """In place: pack every linear layer, the output head and the experts that can run dense; copies still fresh are
    kept (a second engine on the same model leaves the first one's compiled graphs valid). Returns the bytes the
    packed copies add. A no-op (0) where `supported(model)` is false."""
    if not supported(model):
        return 0
    added = 0
    for parent, name, lin in _linears(model):
        if type(lin) in (nn.Linear, RowsLinear):  # RowsLinear: an fp32 engine ran this model before its cast
            lin = PackedLinear(lin)
            setattr(parent, name, lin)
        if isinstance(lin, PackedLinear):
            lin.packed = lin.packed if _fresh(lin.packed) else Packed(lin.weight)
            added += lin.weight.nbytes
    model.head_packed = model.head_packed if _fresh(model.head_packed) else Packed(model.head_weight)
    added += model.head_weight.nbytes
    for m in _dense_experts(model):
        if not (_fresh(m.packed_gate_up) and _fresh(m.packed_down)):
            m.pack_dense()
        added += sum(p.nbytes for p in m.parameters())
    return added


def unpack_(model: Transformer) -> None:
    """In place: plain nn.Linear modules and no packed copies (what `pack_` undoes)."""
    for parent, name, lin in _linears(model):
        if isinstance(lin, PackedLinear):
            setattr(parent, name, lin.plain())
    model.head_packed = None
    for m in model.modules():
        if isinstance(m, Experts):
            m.packed_gate_up = m.packed_down = None

"""BailingMoeV2 (Ling-flash-2.0 / AntAngelMed) in plain, single-device PyTorch.

Readable in one sitting; numerics follow the official HF reference (spec model.md), which the golden
fixtures pin. Parallelism (FSDP2) is applied from train/loop.py, quantization from infer/quant.py.

Dtype policy: activations and weights in the configured dtype; RMSNorm statistics in fp32 (cast back
before the weight multiply); router matmul, sigmoid, expert_bias and routing weights in fp32; the
weighted sum of expert outputs in fp32; logits returned in fp32.

Shape suffixes: B batch, T new tokens, S cached positions, D hidden, H heads, K kv heads, d head dim,
E experts, k experts per token, I intermediate, V vocab.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from angelmed.config import ModelConfig


# read once here: torch.compile cannot trace the probe (a graph break wherever it is called)
CPU_HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
# fp32 on CPU, past E (token, expert) pairs: the in-place gather still beats the grouped path (its C++ kernel,
# CPU_ROWS_KERNEL_ROWS) while the pairs' weights total at most this. Measured compiled, a layer, against the kernel's
# first version (rows sorted in PyTorch around it): `small` (295 KB experts) at 32 pairs (9.4 MB) 0.88 ms both ways,
# at 64 gather 1.38 ms, kernel 0.64. The current kernel (sort inside) measured faster than the gather from 4 pairs
# up on `small` and at 24 on base-100m in that layer benchmark (docs/benchmarks.md, bench_expert_rows): whole decode
# steps have not been re-measured against it, so the gather keeps up to E pairs and this budget.
CPU_GATHER_BYTES = 8 << 20
# bf16 on a CPU with AMX, past E pairs: every expert on every token beats grouping the pairs while that dense work
# stays within this many FLOPs a layer call. Measured compiled, one layer: `small` at 128 tokens (302 MFLOP): dense
# 838 us, grouped 884; base-100m at 16 tokens (302 MFLOP): 1,519 vs 1,608, at 20 tokens (377 MFLOP): 1,922 vs 1,684.
CPU_DENSE_FLOPS = 320e6
# bf16 on CPU, grouped: one batched GEMM per weight over the experts' rows padded to the largest count beats a GEMM
# per expert (grouped_mm) while each expert's share is small: rows per expert x D x I at most this (its three GEMMs
# about 6 MFLOP; below that a call's fixed cost dominates). Measured, padded vs grouped_mm: `small` (16 experts,
# 192 -> 128) at 32 rows an expert 0.67 vs 0.76 ms, at 64 1.06 vs 0.94; base-100m (24 experts, 512 -> 256) at 5
# rows 1.44 vs 2.01, at 11 2.38 vs 2.29, at 85 7.75 vs 4.22.
CPU_PADDED_BMM_WORK = 1 << 20
# fp32 on CPU, grouped, without autograd: the C++ kernel of cpu_kernels.py while the experts average at most this
# many rows; per-expert GEMMs catch up near 20 (base-100m's MoE layers: 2.3x faster at 5 rows an expert, 1.8x at
# 11, 1.0x at 21).
CPU_ROWS_KERNEL_ROWS = 16
# that kernel, cpu_kernels.routed_experts, once `cpu_kernels.enable()` has built it (the engine calls it; this file
# does not import it, as it also becomes the transformers remote code)
CPU_ROWS_KERNEL = None
# fp32 on CPU, without autograd: linear layers (cpu_kernels.RowsLinear, swapped in by the engine) and the output head
# multiply at most this many rows with the same kernel's plain product, cpu_kernels.rows_linear. MKL's GEMM trails
# it there: one AVX2 thread, the projections of base-100m (512 -> 768, 3072, 8192; 1536 -> 512): 2-8 rows
# 1.3-3.0x, 16 rows 0.95-1.4x, 32 rows 0.75-1.5x (benchmarks/bench_expert_rows.py --linears). Whole eager decode
# steps of base-100m, same process, alternating: batch 4 and 8 1.14x, batch 16 0.98x; hence 8. The output head, a
# wide weight of short rows, gains longer: at 16 rows 1.71x (base-100m, 512 -> 8192), 1.29x (small, 192 -> 6144).
CPU_ROWS_LINEAR_ROWS = 8
CPU_ROWS_HEAD_ROWS = 16
CPU_ROWS_LINEAR = None


def widened(w: Tensor, x: Tensor) -> Tensor:
    """w in x's dtype, w itself when they agree. bf16 weights under fp32 activations (a bf16 checkpoint on a CPU that
    only emulates bf16: cpu_kernels.store_bf16_) multiply a widened copy past the few-rows kernel's limits above; the
    kernel reads them as they lie, one row included (base-100m's shapes against this copy and MKL: 1-8 rows
    0.9-3.3x, the head 3.3-5.6x; 16 rows 0.75-1.1x, the head 2.7x; `bench_expert_rows.py --linears --weights
    bfloat16`)."""
    return w if w.dtype == x.dtype else w.to(x.dtype)


# ---- packed weights (bf16 inference on CPU) ----------------------------------------------------
def signature(tensors) -> list[tuple[int, int]]:
    """What changes when tensors are rewritten: in-place writes bump `_version`; `.data =` and `.to()` move data."""
    return [(t._version, t.data_ptr()) for t in tensors]


class Packed:
    """A weight [N, K] reordered once by oneDNN for `x @ W.T` in bf16 on CPU (infer/cpu_pack.py: why and when).

    Used without autograd while its source weights are unchanged; a compiled graph cannot check that, so the engine
    re-packs stale copies before admitting requests."""

    ROWS = 16  # the row count oneDNN picks the blocking for (measured: 1-512 rows all gain or break even)

    def __init__(self, w_NK: Tensor, sources: tuple[Tensor, ...] = ()):
        self.w = torch.ops.mkldnn._reorder_linear_weight(w_NK.detach(), self.ROWS)
        self.sources = sources or (w_NK,)
        self.seen = signature(self.sources)

    def stale(self) -> bool:
        return signature(self.sources) != self.seen

    def usable(self, x: Tensor) -> bool:
        """Whether to multiply x by the packed copy. Compiled, only in graphs that freeze the weights (inductor takes
        a packed weight only as a constant; engine.compile_step), and not for one-row products: inductor makes
        those fused multiply-reduce kernels, faster still (base-100m bf16 batch 1: 3.9 vs 4.4 ms a step)."""
        if torch.is_grad_enabled() or x.dtype != self.w.dtype:
            return False
        if torch.compiler.is_compiling():
            import torch._inductor.config as inductor_config

            return inductor_config.freezing and x.numel() > x.shape[-1]
        return not self.stale()

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.w, bias, "none", [], "")

    def __deepcopy__(self, memo):  # an opaque oneDNN tensor has no storage to copy: the copy runs unpacked
        return None


# ---- norms, rotary -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_parameters(cfg: ModelConfig) -> tuple[Tensor, float]:
    """inv_freq over the rotary dim r (not head_dim), and the YaRN attention scaling (spec §3, §3.1)."""
    r, theta = cfg.rotary_dim, cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    rs = cfg.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) in (None, "default"):
        return inv_freq, 1.0
    s = float(rs["factor"])
    L0 = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return (r * math.log(L0 / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = (inv_freq / s) * ramp + inv_freq * (1 - ramp)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.get("attention_factor") is not None:
        attn = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        attn = mscale(s, rs["mscale"]) / mscale(s, rs["mscale_all_dim"])
    else:
        attn = mscale(s)
    return inv_freq, attn


def rope_cos_sin(inv_freq: Tensor, scaling: float, pos_BT: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    freqs_BTf = pos_BT[..., None].float() * inv_freq.float()
    emb = torch.cat([freqs_BTf, freqs_BTf], dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x_BHTd: Tensor, cos_BTr: Tensor, sin_BTr: Tensor) -> Tensor:
    """Half-split (NeoX) rotation of the first r channels; the rest pass through."""
    r = cos_BTr.shape[-1]
    rot, keep = x_BHTd[..., :r], x_BHTd[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    cos, sin = cos_BTr[:, None], sin_BTr[:, None]
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, keep], dim=-1)


# ---- attention ---------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated per-layer cache; keys stored after QK-norm and RoPE. Rows write at their own positions."""

    def __init__(self, batch: int, max_len: int, n_kv: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos_BT: Tensor, k_BKTd: Tensor, v_BKTd: Tensor) -> tuple[Tensor, Tensor]:
        return write_kv(self.k, self.v, pos_BT, k_BKTd, v_BKTd)


def write_kv(k_BKSd: Tensor, v_BKSd: Tensor, pos_BT: Tensor, k_BKTd: Tensor, v_BKTd: Tensor) -> tuple[Tensor, Tensor]:
    """Row b's new keys/values land at positions pos_BT[b]. Indexed assignment, not `scatter_`: on CPU a bf16
    scatter_ into a cache slice is ~40x slower (222 vs 5.6 us for a 32-row decode step)."""
    b_B1 = torch.arange(pos_BT.shape[0], device=pos_BT.device)[:, None]
    k_BKSd[b_B1, :, pos_BT] = k_BKTd.transpose(1, 2)
    v_BKSd[b_B1, :, pos_BT] = v_BKTd.transpose(1, 2)
    return k_BKSd, v_BKSd


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_q, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.query_key_value = nn.Linear(D, (self.n_q + 2 * self.n_kv) * self.d, bias=cfg.use_qkv_bias or cfg.use_bias)
        self.dense = nn.Linear(self.n_q * self.d, D, bias=cfg.use_bias)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.d, cfg.rms_norm_eps)

    def forward(self, x_BTD: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                pos_BT: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        qkv = self.query_key_value(x_BTD).view(B, T, self.n_q + 2 * self.n_kv, self.d)
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=2)  # [Q | K | V] row layout
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # kv head j serves q heads j*g .. (j+1)*g-1, as repeat_kv does
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            k, v = cache.update(pos_BT, k, v)
            out = grouped_query_attention(q, k, v, mask)
        return self.dense(out.transpose(1, 2).reshape(B, T, self.n_q * self.d))


def grouped_query_attention(q_BHTd: Tensor, k_BKSd: Tensor, v_BKSd: Tensor, mask_B1TS: Tensor) -> Tensor:
    """Attention over a KV cache. For a few queries per row (decode, speculative verify) each kv head's g query
    heads are folded into its query rows: [B,K,g*T,d] against [B,K,S,d] reads the cache once, where the
    enable_gqa kernel expands it g times. Measured on CPU (benchmarks/bench_attention.py, 32 rows over 320
    positions): fp32 decode 1.5x, 4-token verify 1.2x; bf16 4-token verify 1.6x. Past 8 queries the fold is
    slower (0.8-0.97x at 16-64) and its mask is g times larger (a prefill chunk's), and one bf16 query per row has
    a faster enable_gqa path (0.84-0.98x folded): those stay on enable_gqa."""
    B, H, T, d = q_BHTd.shape
    K = k_BKSd.shape[1]
    if T > 8 or (T == 1 and q_BHTd.dtype != torch.float32):
        return F.scaled_dot_product_attention(q_BHTd, k_BKSd, v_BKSd, attn_mask=mask_B1TS, enable_gqa=True)
    q = q_BHTd.reshape(B, K, H // K * T, d)
    mask = mask_B1TS if T == 1 else mask_B1TS[:, :, None].expand(B, 1, H // K, T, -1).reshape(B, 1, H // K * T, -1)
    return F.scaled_dot_product_attention(q, k_BKSd, v_BKSd, attn_mask=mask).view(B, H, T, d)


# ---- feed-forward ------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores, bias for selection only, group-limited top-k, renormalise, routed scaling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.E, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.num_groups, cfg.topk_group or 1
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.E, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(self.E, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # expert_bias stays fp32 whatever the module is cast to (spec §4.1): only device moves apply.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        device = self.expert_bias.device
        if bias.is_meta and device.type != "meta":
            self.expert_bias = torch.zeros(self.E, dtype=torch.float32, device=device)
        else:
            self.expert_bias = bias.to(device=device, dtype=torch.float32)
        return self

    def forward(self, x_TD: Tensor, forced_idx_Tk: Tensor | None = None):
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        if forced_idx_Tk is None:
            forced_idx_Tk = self.select(scores_TE)
        w_Tk = scores_TE.gather(1, forced_idx_Tk)
        if self.top_k > 1:
            w_Tk = w_Tk / (w_Tk.sum(-1, keepdim=True) + 1e-20)
        return w_Tk * self.scale, forced_idx_Tk, logits_TE, scores_TE

    @torch.no_grad()
    def select(self, scores_TE: Tensor) -> Tensor:
        biased_TE = scores_TE + self.expert_bias
        if self.n_group > 1:
            T = biased_TE.shape[0]
            grouped = biased_TE.view(T, self.n_group, -1)
            group_scores_TG = grouped.topk(2, dim=-1).values.sum(-1)
            keep_TG = group_scores_TG.topk(self.topk_group, dim=-1).indices
            mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
            biased_TE = grouped.masked_fill(~mask_TG[..., None], float("-inf")).view(T, -1)
        return biased_TE.topk(self.top_k, dim=-1).indices


class Experts(nn.Module):
    """All routed experts as stacked weights [E, ...] (grouped GEMM friendly, shardable along E).

    Checkpoints name them per expert (`experts.{e}.gate_proj.weight`); checkpoint.py maps the names.
    """

    packed_gate_up: Packed | None = None  # infer/cpu_pack.py: every expert's gate and up rows, [2EI, D]
    packed_down: Packed | None = None  # the down projections side by side, [D, EI]

    def __init__(self, E: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(E, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(E, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(E, dim, hidden))

    def forward(self, x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor) -> Tensor:
        T, k = idx_Tk.shape
        path = self.path(T, k, x_TD.device, compiled=torch.compiler.is_compiling())
        return getattr(self, "_" + path)(x_TD, idx_Tk, w_Tk)

    def path(self, T: int, k: int, device: torch.device, compiled: bool) -> str:
        """Which way T tokens with k experts each go. Few (token, expert) pairs (decode): read each pair's weights
        where they lie, no sort, no host sync; compiled, inductor fuses the gather into the reduction, but eager on
        CPU the gathered copy costs more than a host sync (measured), so eager CPU groups. A compiled graph holds
        one path: the engine compiles each before traffic (`Engine.warm_up`)."""
        if self.dense_pays(T, k, device):
            return "dense"
        if self.gather_pays(T * k, device) and (device.type == "cuda" or compiled):
            return "gathered"
        return "grouped"

    def gather_pays(self, pairs: int, device: torch.device) -> bool:
        """Whether reading weights per (token, expert) pair beats grouping the pairs by expert: while pairs <= experts
        (measured on CPU: compiled decode 1.2-2.2x faster up to there against per-expert GEMMs; against the first
        version of fp32's C++ kernel, small b1 0.85 vs 0.99 ms a step, base-100m b1 8.8 vs 9.6), and for fp32 on
        CPU also while the pairs' weights total at most CPU_GATHER_BYTES. Past the experts, pairs re-read shared
        experts; the grouped path reads each once, for fixed costs (a sort; per-expert GEMMs unless fp32 runs the
        kernel) that small experts earn back late. (bf16 on CPU groups with three batched GEMMs, or runs dense on
        AMX.)"""
        E, hidden, dim = self.gate_proj.shape
        limit = E
        if device.type == "cpu" and self.gate_proj.dtype == torch.float32:
            limit = max(E, CPU_GATHER_BYTES // (3 * hidden * dim * 4))
        return pairs <= limit  # one comparison: in a compiled graph, one guard on the row count

    def dense_pays(self, tokens: int, k: int, device: torch.device) -> bool:
        """Whether computing every expert for every token beats routing the pairs: on a CPU with AMX, for bf16
        weights, past E (token, expert) pairs while the dense work stays within CPU_DENSE_FLOPS. An AMX tile
        multiplies 16 rows at once, so an expert's rows cost about one tile pass however few are routed to it, and
        the dense GEMMs need no sort, scatter or host sync (they stay inside a compiled graph). Past E pairs each
        expert receives a token with probability 1-(1-k/E)^T >= 63%, so at most 1.6x the weights are read.
        Measured on `small`, batch 16: compiled 4,090 -> 6,000 tok/s, eager 3,470 -> 3,560 (and 383 us a layer
        against the in-place gather's 410). In fp32 the E/k-times larger GEMMs cost more than they save
        (base-100m, batch 16: 0.75x)."""
        E, hidden, dim = self.gate_proj.shape
        return (device.type == "cpu" and self.gate_proj.dtype == torch.bfloat16 and CPU_HAS_AMX
                and tokens * k > E and E * tokens * 6 * hidden * dim <= CPU_DENSE_FLOPS)

    def pack_dense(self) -> None:
        """Packed copies for `_dense` as two GEMMs: every expert's gate and up rows in one weight, and the down
        projections side by side along K, so that the down GEMM also sums the gate-weighted experts."""
        E, I, D = self.gate_proj.shape
        sources = (self.gate_proj, self.up_proj, self.down_proj)
        gate_up = torch.cat([self.gate_proj.reshape(E * I, D), self.up_proj.reshape(E * I, D)])
        down = self.down_proj.permute(1, 0, 2).reshape(D, E * I)
        self.packed_gate_up, self.packed_down = Packed(gate_up, sources), Packed(down, sources)

    def _dense(self, x_TD, idx_Tk, w_Tk):
        E, I, _ = self.gate_proj.shape
        T, D = x_TD.shape
        w_TE = torch.zeros(T, E, dtype=torch.float32, device=x_TD.device).scatter(1, idx_Tk, w_Tk)
        if self.packed_gate_up is not None and self.packed_gate_up.usable(x_TD):
            gu_T2EI = self.packed_gate_up(x_TD)
            h_TEI = (F.silu(gu_T2EI[:, :E * I]) * gu_T2EI[:, E * I:]).view(T, E, I)
            return self.packed_down((h_TEI.float() * w_TE[:, :, None]).to(x_TD.dtype).view(T, E * I)).float()
        x_ETD = x_TD.expand(E, T, D)
        gate_EDI, up_EDI, down_EID = (w.transpose(1, 2) for w in (self.gate_proj, self.up_proj, self.down_proj))
        h_ETI = F.silu(torch.bmm(x_ETD, gate_EDI)) * torch.bmm(x_ETD, up_EDI)
        y_ETD = torch.bmm(h_ETI, down_EID)
        return torch.einsum("etd,te->td", y_ETD.float(), w_TE)  # unrouted experts weigh exactly 0

    def _gathered(self, x_TD, idx_Tk, w_Tk):
        g, u, d = self.gate_proj[idx_Tk], self.up_proj[idx_Tk], self.down_proj[idx_Tk]  # [T,k,I,D] / [T,k,D,I]
        if torch.compiler.is_compiling():  # products + sums: inductor fuses gather, product and sum in one kernel
            x = x_TD[:, None, None, :]
            h_TkI = F.silu((g * x).sum(-1)) * (u * x).sum(-1)
            y_TkD = (d * h_TkI[:, :, None, :]).sum(-1)
        else:  # eager (GPU): batched GEMVs over the gathered copies
            h_TkI = F.silu(torch.einsum("tkid,td->tki", g, x_TD)) * torch.einsum("tkid,td->tki", u, x_TD)
            y_TkD = torch.einsum("tkdi,tki->tkd", d, h_TkI)
        return (y_TkD.float() * w_Tk[..., None]).sum(1)

    def _grouped(self, x_TD, idx_Tk, w_Tk):
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        if rows_kernel_pays(x_TD, idx_Tk.numel(), *weights):
            return CPU_ROWS_KERNEL(x_TD, idx_Tk, w_Tk, *weights)
        return grouped_experts(x_TD, idx_Tk, w_Tk, *weights)


def opaque_in_compiled_graphs(name: str):
    """Decorator for a grouped expert path fn(x_TD, ...) -> y_TD (fp32): registers it as custom op `name`, and calls
    that op inside compiled CPU inference graphs, fn itself elsewhere. As one opaque op the graph stays whole around
    fn's host sync for the expert counts, and fn runs the eager kernels (faster than inductor's CPU grouped GEMM, a
    loop of per-expert matmuls). The op has no backward, hence inference only."""
    def wrap(fn):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(lambda x_TD, *rest: x_TD.new_empty(x_TD.shape, dtype=torch.float32))

        @functools.wraps(fn)
        def call(x_TD: Tensor, *rest: Tensor) -> Tensor:
            if torch.compiler.is_compiling() and x_TD.device.type == "cpu" and not torch.is_grad_enabled():
                return op(x_TD, *rest)
            return fn(x_TD, *rest)
        return call
    return wrap


@opaque_in_compiled_graphs("angelmed::grouped_experts")
def grouped_experts(x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor, gate_EID: Tensor, up_EID: Tensor,
                    down_EDI: Tensor) -> Tensor:
    """The routed experts' weighted output (fp32) with the (token, expert) pairs grouped by expert."""
    E, hidden, dim = gate_EID.shape
    if _use_grouped_mm(x_TD, hidden) and gate_EID.dtype == x_TD.dtype:
        def ffn(x_sorted, counts_E):
            offs = counts_E.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x_sorted, gate_EID.transpose(1, 2), offs=offs))
            h = h * torch._grouped_mm(x_sorted, up_EID.transpose(1, 2), offs=offs)
            return torch._grouped_mm(h, down_EDI.transpose(1, 2), offs=offs)
    else:
        ffn = swiglu_loop(gate_EID, up_EID, down_EDI)
    if (x_TD.dtype == torch.bfloat16 and x_TD.device.type == "cpu"
            and idx_Tk.numel() * hidden * dim <= E * CPU_PADDED_BMM_WORK):
        ffn = padded_bmm(gate_EID, up_EID, down_EDI, skewed=ffn)
    return sorted_by_expert(x_TD, idx_Tk, w_Tk, E, ffn)


def rows_kernel_pays(x_TD: Tensor, pairs: int, *weights: Tensor) -> bool:
    """fp32 inference on CPU with few rows an expert (weights fp32 or bf16), once the kernel is enabled
    (CPU_ROWS_KERNEL)."""
    return (CPU_ROWS_KERNEL is not None and x_TD.device.type == "cpu" and not torch.is_grad_enabled()
            and pairs <= CPU_ROWS_KERNEL_ROWS * weights[0].shape[0] and x_TD.dtype == torch.float32
            and weights[0].dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == weights[0].dtype and t.is_contiguous() for t in weights))


def rows_linear_pays(x: Tensor, w_NK: Tensor, max_rows: int | None = None) -> bool:
    """x @ w.T by CPU_ROWS_LINEAR: fp32 inference on CPU (weights fp32 or bf16) with at most max_rows rows
    (CPU_ROWS_LINEAR_ROWS), once the kernel is enabled. One-row products of fp32 weights in a compiled graph stay
    inductor's fused multiply-reduce; bf16 weights take the kernel there too (else a widened copy)."""
    if (CPU_ROWS_LINEAR is None or x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != torch.float32
            or not w_NK.is_contiguous()):
        return False
    rows = x.numel() // x.shape[-1]
    if rows > (CPU_ROWS_LINEAR_ROWS if max_rows is None else max_rows):
        return False
    return w_NK.dtype == torch.bfloat16 or (w_NK.dtype == torch.float32
                                            and not (rows == 1 and torch.compiler.is_compiling()))


def head_logits(h: Tensor, w_VD: Tensor) -> Tensor:
    """fp32 logits h @ w.T of an output head (the model's, or a drafter's vocabulary subset of it): few rows on the
    kernel (CPU_ROWS_HEAD_ROWS), else the GEMM."""
    if rows_linear_pays(h, w_VD, CPU_ROWS_HEAD_ROWS):
        return CPU_ROWS_LINEAR(h, w_VD)
    return F.linear(h, widened(w_VD, h)).float()


def sorted_by_expert(x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor, num_experts: int, ffn) -> Tensor:
    """Routed-expert output with the (token, expert) pairs sorted by expert: ffn(x_sorted, counts_E) -> y_sorted
    computes every pair's expert FFN; each result is weighted by its gate and summed back per token (fp32)."""
    T, k = idx_Tk.shape
    flat = idx_Tk.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    y_sorted = ffn(x_TD[token], _count(flat, num_experts))
    y_weighted = y_sorted * w_Tk.reshape(-1)[order, None].float()  # one pass: promotes to fp32 exactly
    return torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device).index_add_(0, token, y_weighted)


def expert_loop(ffn_e):
    """An ffn for `sorted_by_expert` that runs ffn_e(e, rows) on each used expert's rows (one host sync for the
    counts: fine on CPU and in prefill/training)."""
    def ffn(x_sorted: Tensor, counts_E: Tensor) -> Tensor:
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                y_sorted[start:start + n] = ffn_e(e, x_sorted[start:start + n])
                start += n
        return y_sorted
    return ffn


def swiglu_loop(gate_EID: Tensor, up_EID: Tensor, down_EDI: Tensor):
    # bf16-stored experts under fp32 activations widen one expert at a time
    return expert_loop(lambda e, xs: (F.silu(xs @ widened(gate_EID[e], xs).T) * (xs @ widened(up_EID[e], xs).T))
                       @ widened(down_EDI[e], xs).T)


def padded_bmm(gate_EID: Tensor, up_EID: Tensor, down_EDI: Tensor, skewed):
    """An ffn for `sorted_by_expert` as three batched GEMMs over [E, C, D]: each expert's rows padded to the
    largest count C (one host sync). Past 4x padding (routing far from balanced) it runs the ffn `skewed`."""
    def ffn(x_sorted: Tensor, counts_E: Tensor) -> Tensor:
        E, R, C = counts_E.numel(), x_sorted.shape[0], int(counts_E.max())
        if E * C > 4 * R:
            return skewed(x_sorted, counts_E)
        e_R = torch.repeat_interleave(torch.arange(E, device=x_sorted.device), counts_E, output_size=R)
        slot_R = torch.arange(R, device=x_sorted.device) - (counts_E.cumsum(0) - counts_E)[e_R]
        x_ECD = x_sorted.new_zeros(E, C, x_sorted.shape[1])
        x_ECD[e_R, slot_R] = x_sorted
        h_ECI = F.silu(torch.bmm(x_ECD, gate_EID.transpose(1, 2))) * torch.bmm(x_ECD, up_EID.transpose(1, 2))
        return torch.bmm(h_ECI, down_EDI.transpose(1, 2))[e_R, slot_R]
    return ffn


def _count(idx: Tensor, n: int) -> Tensor:
    """Tokens per expert; scatter_add, unlike bincount, needs no host sync on CUDA."""
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def _use_grouped_mm(x: Tensor, hidden: int) -> bool:
    # torch._grouped_mm needs 16-byte aligned rows (of x and of the [*, hidden] intermediate); on CUDA it wants
    # bf16. Fall back otherwise.
    size = x.element_size() if x.dtype.is_floating_point else 0
    if not hasattr(torch, "_grouped_mm") or not size or (x.shape[-1] * size) % 16 or (hidden * size) % 16:
        return False
    return x.dtype == torch.bfloat16 if x.is_cuda else x.dtype in (torch.float32, torch.bfloat16)


@dataclass
class RouterInfo:
    """What one MoE layer decided: for balancing (counts), analysis, routing replay and aux losses."""
    idx_Tk: Tensor
    counts_E: Tensor
    logits_TE: Tensor
    scores_TE: Tensor


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
                               if cfg.num_shared_experts else None)

    def forward(self, x_BTD: Tensor, forced_idx: Tensor | None = None) -> tuple[Tensor, RouterInfo]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        forced = None if forced_idx is None else forced_idx.reshape(-1, forced_idx.shape[-1])
        w_Tk, idx_Tk, logits_TE, scores_TE = self.gate(x_TD, forced)
        y_TD = self.experts(x_TD, idx_Tk, w_Tk).to(x_BTD.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        counts_E = _count(idx_Tk.reshape(-1), self.gate.E).detach()
        return y_TD.view(B, T, D), RouterInfo(idx_Tk.view(B, T, -1), counts_E, logits_TE, scores_TE)


# ---- blocks ------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)

    def forward(self, h_BTD, rope, mask, pos_BT=None, cache=None, forced_idx=None):
        h_BTD = h_BTD + self.attention(self.input_layernorm(h_BTD), rope, mask, pos_BT, cache)
        x = self.post_attention_layernorm(h_BTD)
        if isinstance(self.mlp, MoE):
            y, info = self.mlp(x, forced_idx)
            return h_BTD + y, info
        return h_BTD + self.mlp(x), None


class MTPLayer(DecoderLayer):
    """Predicts token t+k+1 from the hidden state at t and the embedding of token t+k. FFN is always MoE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, moe=True)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, emb_BTD, h_prev_BTD, rope, mask, pos_BT=None, cache=None, forced_idx=None):
        u = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        u, info = super().forward(u, rope, mask, pos_BT, cache, forced_idx)
        return self.final_layernorm(u), info


class Backbone(nn.Module):
    """Named `model` inside Transformer so state-dict names are the official ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, moe=i >= cfg.first_k_dense_replace) for i in range(L)]
            + [MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: Tensor | None  # [B,T,V] fp32
    hidden: Tensor  # [B,T,D] final-normed (lm_head input)
    mtp_logits: list[Tensor] = field(default_factory=list)  # per depth [B,T,V] fp32
    mtp_hidden: list[Tensor] = field(default_factory=list)
    router: list[RouterInfo] = field(default_factory=list)  # main MoE layers, then MTP layers
    layer_hidden: list[Tensor] = field(default_factory=list)  # outputs of `keep_layers` (EAGLE-3 features)

    @property
    def routing(self) -> list[Tensor]:
        return [r.idx_Tk for r in self.router]


class Transformer(nn.Module):
    head_packed: Packed | None = None  # infer/cpu_pack.py: the output head [V, D], packed

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scaling = rope_parameters(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def init_weights(self, seed: int | None = None) -> "Transformer":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for m in self.modules():
            if isinstance(m, Router):
                m.expert_bias.zero_()
        self.inv_freq = rope_parameters(self.config)[0].to(self.inv_freq.device)
        return self

    @property
    def head_weight(self) -> Tensor:
        """The output projection [V, D]: lm_head, or the embedding when tied."""
        return self.model.word_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def logits_from_hidden(self, h_BTD: Tensor) -> Tensor:
        if self.head_packed is not None and self.head_packed.usable(h_BTD):
            return self.head_packed(h_BTD).float()
        return head_logits(h_BTD, self.head_weight)

    def causal_mask(self, pos_BT: Tensor, segment_BT: Tensor | None, S: int | None) -> Tensor | None:
        """Boolean [B,1,T,S] mask (True = attend); None means plain causal over T (fast path)."""
        if S is None and segment_BT is None:
            return None
        if S is None:  # packed sequences: causal within each segment
            same = segment_BT[:, :, None] == segment_BT[:, None, :]
            causal = torch.ones(pos_BT.shape[1], pos_BT.shape[1], dtype=torch.bool, device=pos_BT.device).tril()
            return (same & causal)[:, None]
        return (torch.arange(S, device=pos_BT.device)[None, None, :] <= pos_BT[:, :, None])[:, None]

    def forward(self, ids_BT: Tensor, pos_BT: Tensor | None = None, segment_BT: Tensor | None = None,
                caches: list[KVCache] | None = None, mtp: bool = False, compute_logits: bool = True,
                forced_routing: list[Tensor] | None = None, keep_layers: tuple[int, ...] = ()) -> ModelOutput:
        """One forward pass.

        pos_BT: positions (default 0..T-1); segment_BT: packed-document ids (attention stays inside);
        caches: one KVCache per layer (main layers first, then MTP) for incremental decoding;
        mtp: also run the MTP layers (MTP-k sees ids rolled left k times, tail filled with id 0);
        forced_routing: expert ids per MoE layer [B,T,k] (routing replay), in `ModelOutput.router` order;
        keep_layers: main layers whose outputs to return in `ModelOutput.layer_hidden` (in this order).
        """
        B, T = ids_BT.shape
        if pos_BT is None:
            pos_BT = torch.arange(T, device=ids_BT.device).expand(B, T)
        emb = self.model.word_embeddings(ids_BT)
        rope = rope_cos_sin(self.inv_freq, self.rope_scaling, pos_BT, emb.dtype)
        mask = self.causal_mask(pos_BT, segment_BT, None if caches is None else caches[0].k.shape[2])
        forced = iter(forced_routing) if forced_routing is not None else None
        router: list[RouterInfo] = []
        kept: dict[int, Tensor] = {}
        h = emb
        for i in range(self.num_layers):
            layer = self.model.layers[i]
            fi = next(forced) if forced is not None and isinstance(layer.mlp, MoE) else None
            h, info = layer(h, rope, mask, pos_BT, None if caches is None else caches[i], fi)
            if info is not None:
                router.append(info)
            if i in keep_layers:
                kept[i] = h
        h = self.model.norm(h)
        out = ModelOutput(logits=self.logits_from_hidden(h) if compute_logits else None, hidden=h, router=router,
                          layer_hidden=[kept[i] for i in keep_layers])
        if mtp:
            ids_k, h_prev = ids_BT, h
            for depth in range(self.config.num_nextn_predict_layers):
                ids_k = torch.cat([ids_k[:, 1:], torch.zeros_like(ids_k[:, :1])], dim=1)
                fi = next(forced) if forced is not None else None
                cache = None if caches is None else caches[self.num_layers + depth]
                h_prev, info = self.mtp_step(depth, ids_k, h_prev, rope, mask, pos_BT, cache, fi)
                router.append(info)
                out.mtp_hidden.append(h_prev)
                if compute_logits:
                    out.mtp_logits.append(self.logits_from_hidden(h_prev))
        return out

    def mtp_step(self, depth: int, ids_BT: Tensor, h_prev_BTD: Tensor, rope, mask, pos_BT=None, cache=None,
                 forced_idx=None) -> tuple[Tensor, RouterInfo]:
        layer = self.model.layers[self.num_layers + depth]
        return layer(self.model.word_embeddings(ids_BT), h_prev_BTD, rope, mask, pos_BT, cache, forced_idx)

    def drop_mtp(self) -> "Transformer":
        """Remove the MTP layers in place (for engines without MTP, e.g. vLLM's BailingMoeV2)."""
        del self.model.layers[self.num_layers:]
        self.config = self.config.replace(num_nextn_predict_layers=0)
        return self

    def make_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None,
                    mtp: bool = False) -> list[KVCache]:
        cfg = self.config
        n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        dtype = dtype or self.model.word_embeddings.weight.dtype
        device = device or self.model.word_embeddings.weight.device
        return [KVCache(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype, device) for _ in range(n)]

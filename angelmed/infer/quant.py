"""Running block-FP8 checkpoints (spec model.md §7) in two modes.

- "dequant": dequantise every FP8 tensor once at load (`checkpoint.load_model`); the model is a plain
  Transformer in the compute dtype.
- "resident": keep the quantised weights in float8_e4m3fn with their fp32 128x128 block scales
  (`FP8Linear`, `FP8Experts`) and dequantise at run time, a row chunk at a time; routed experts only
  for the experts a batch actually uses. Weights then take ~half the bytes of bf16.

Numerics of the resident CPU path equal dequant-at-load: the dequantised weight is float32(q) * scale in
fp32, cast to the activation dtype, exactly what `checkpoint.dequantize_fp8_block` + `load_model` give.
On CUDA sm90 with 128-aligned shapes, `FP8Linear` instead calls the block-scaled FP8 GEMM
(`F.scaled_mm`, activations quantised per token in 1x128 groups: the "dynamic" activation scheme of the
checkpoint's quantization_config); that is faster but adds activation-quantisation error.

Which tensors are quantised follows the official converter (same as `checkpoint.hf_state_dict(fp8=True)`):
attention.query_key_value, attention.dense (UE8M0 scales), dense-layer MLP, shared experts, routed
experts (gate/up UE8M0). Embeddings, lm_head, norms, router and MTP eh_proj stay in the compute dtype.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from angelmed.checkpoint import (FP8_BLOCK, FP8_MAX, CheckpointError, _blocks, _dtype, iter_checkpoint,
                                 load_model, quantize_fp8_block)
from angelmed.config import ModelConfig
from angelmed.model import (MLP, Attention, Experts, MoE, Transformer, expert_loop, rope_parameters,
                            sorted_by_expert)

log = logging.getLogger(__name__)

MODES = ("dequant", "resident")
FP8 = torch.float8_e4m3fn
# Largest dequantised chunk a linear materialises at once (elements): bounds the transient fp32 copy.
CHUNK_ELEMS = 1 << 22
# "auto": block-scaled FP8 GEMM where the hardware has it, else dequantise; "dequant": always dequantise.
FP8_MATMUL = os.environ.get("ANGELMED_FP8_MATMUL", "auto")
_scaled_mm_broken = False  # set after a failed kernel call, so we warn once and fall back for good


# All 256 e4m3 codes decoded by torch: on CPU a table lookup is ~5x faster than the dtype conversion.
_E4M3_TABLE = torch.arange(256, dtype=torch.uint8).view(FP8).float()


def fp8_to_float32(q: Tensor) -> Tensor:
    if q.device.type != "cpu":
        return q.float()
    codes = q.contiguous().view(torch.uint8).reshape(-1).int()
    return _E4M3_TABLE.index_select(0, codes).view(q.shape)


def dequantize_blocks(q: Tensor, scale_inv: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """float32(q[..., R, C]) * scale_inv[..., ceil(R/128), ceil(C/128)] broadcast per block, then cast.

    Any leading dims (stacked or gathered experts). The multiply is in fp32, as the spec's dequantisation
    (bitwise equal to checkpoint.dequantize_fp8_block), done in place on 128-row bands.
    """
    R, C = q.shape[-2:]
    w = fp8_to_float32(q)
    s_cols = scale_inv.float().repeat_interleave(FP8_BLOCK, -1)[..., :C]  # [..., ceil(R/128), C]
    full = R // FP8_BLOCK * FP8_BLOCK
    if full:
        w[..., :full, :].unflatten(-2, (R // FP8_BLOCK, FP8_BLOCK)).mul_(s_cols[..., :R // FP8_BLOCK, None, :])
    if full < R:  # partial last block row
        w[..., full:, :].mul_(s_cols[..., -1:, :])
    return w.to(dtype)


class _KeepsFP8(nn.Module):
    """`model.to(bfloat16)` must not cast fp8 weights or their fp32 scales: only device moves apply."""

    _fp8_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {n: getattr(self, n) for n in self._fp8_buffers}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                setattr(self, n, old.to(device=new.device))
        return self


class FP8Linear(_KeepsFP8):
    """y = x W^T (+ b) with W stored as float8_e4m3fn [out, in] and fp32 block scales."""

    _fp8_buffers = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(_blocks(out_features), _blocks(in_features),
                                                            dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: Tensor, scale_inv: Tensor, bias: Tensor | None = None) -> "FP8Linear":
        out_f, in_f = q.shape
        if q.dtype != FP8 or tuple(scale_inv.shape) != (_blocks(out_f), _blocks(in_f)):
            raise ValueError(f"FP8Linear needs float8_e4m3fn [out, in] and fp32 scales [{_blocks(out_f)}, "
                             f"{_blocks(in_f)}]; got {q.dtype} {tuple(q.shape)}, scales {tuple(scale_inv.shape)}")
        m = cls(in_f, out_f, bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
                device=q.device)
        m.weight.copy_(q)
        m.weight_scale_inv.copy_(scale_inv)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, ue8m0: bool) -> "FP8Linear":
        q, s = quantize_fp8_block(linear.weight.detach().float(), ue8m0=ue8m0)
        return cls.from_quantized(q, s, None if linear.bias is None else linear.bias.detach())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole weight, dequantised (for export and tests; forward never builds it for large weights)."""
        return dequantize_blocks(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if _can_scaled_mm(x, self.out_features, self.in_features):
            try:
                return _scaled_mm_block(x, self.weight, self.weight_scale_inv, self.bias)
            except RuntimeError as e:  # kernel missing in this build / cuBLAS: dequantise from now on
                _mark_scaled_mm_broken(e)
        rows = max(FP8_BLOCK, CHUNK_ELEMS // max(1, self.in_features) // FP8_BLOCK * FP8_BLOCK)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if rows >= self.out_features:
            return F.linear(x, self.dequantized(x.dtype), bias)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for r0 in range(0, self.out_features, rows):  # r0 is a multiple of 128: chunks align with blocks
            r1 = min(r0 + rows, self.out_features)
            w = dequantize_blocks(self.weight[r0:r1], self.weight_scale_inv[r0 // FP8_BLOCK:_blocks(r1)], x.dtype)
            y[..., r0:r1] = F.linear(x, w, None if bias is None else bias[r0:r1])
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 block 128x128"


# ---- block-scaled FP8 GEMM (CUDA sm90) -------------------------------------------------------------
def _can_scaled_mm(x: Tensor, n: int, k: int) -> bool:
    if FP8_MATMUL == "dequant" or _scaled_mm_broken or not x.is_cuda or not hasattr(F, "scaled_mm"):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16):  # fp32 activations ask for reference numerics
        return False
    # cuBLAS block scaling (1x128 activations x 128x128 weights) exists on Hopper; keep shapes block-aligned.
    return torch.cuda.get_device_capability(x.device)[0] == 9 and n % FP8_BLOCK == 0 and k % FP8_BLOCK == 0


def _mark_scaled_mm_broken(err: Exception) -> None:
    global _scaled_mm_broken
    _scaled_mm_broken = True
    log.warning("block-scaled FP8 GEMM unavailable (%s); FP8 linears dequantise per call instead", err)


def quantize_activations_1x128(x_MK: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token, per-128-channel FP8 (K % 128 == 0): (fp8 [M, K], fp32 multipliers [M, K/128])."""
    M, K = x_MK.shape
    g = x_MK.float().view(M, K // FP8_BLOCK, FP8_BLOCK)
    scale = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    return (g / scale[..., None]).to(FP8).view(M, K), scale


def _scaled_mm_block(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    K = x.shape[-1]
    x_q, x_scale = quantize_activations_1x128(x.reshape(-1, K))
    a_scale = x_scale.t().contiguous().t()  # 1x128 scales must be outer-dim (M) major
    # 128x128 scales: [N/128, L] with L padded to a multiple of 4, passed as [L4, N/128] (K-major)
    pad = (-w_scale.shape[1]) % 4
    b_scale = F.pad(w_scale, (0, pad)).t() if pad else w_scale.t()
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = F.scaled_mm(x_q, w_q.t(), a_scale, F.ScalingType.BlockWise1x128, b_scale,
                    F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], w_q.shape[0])


# ---- routed experts ----------------------------------------------------------------------------------
class FP8Experts(_KeepsFP8):
    """Stacked FP8 experts: gate/up [E, I, D], down [E, D, I], scales [E, ceil(rows/128), ceil(cols/128)].

    Same contract as model.Experts: forward(x_TD, idx_Tk, w_Tk) -> fp32 [T, D]. Only the experts that
    some token routes to are dequantised.
    """

    _fp8_buffers = ("gate_proj", "up_proj", "down_proj",
                    "gate_proj_scale_inv", "up_proj_scale_inv", "down_proj_scale_inv")

    def __init__(self, E: int, dim: int, hidden: int, device=None):
        super().__init__()
        for name, (rows, cols) in (("gate_proj", (hidden, dim)), ("up_proj", (hidden, dim)),
                                   ("down_proj", (dim, hidden))):
            self.register_buffer(name, torch.zeros(E, rows, cols, dtype=FP8, device=device))
            self.register_buffer(f"{name}_scale_inv", torch.ones(E, _blocks(rows), _blocks(cols),
                                                                 dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts) -> "FP8Experts":
        E, hidden, dim = experts.gate_proj.shape
        m = cls(E, dim, hidden, device=experts.gate_proj.device)
        for name, ue8m0 in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            w = getattr(experts, name).detach()
            for e in range(E):
                q, s = quantize_fp8_block(w[e].float(), ue8m0=ue8m0)
                getattr(m, name)[e].copy_(q)
                getattr(m, f"{name}_scale_inv")[e].copy_(s)
        return m

    def dequantized(self, name: str, experts: Tensor | int | slice = slice(None),
                    dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_blocks(getattr(self, name)[experts], getattr(self, f"{name}_scale_inv")[experts], dtype)

    def forward(self, x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor) -> Tensor:
        T, k = idx_Tk.shape
        if T * k < self.gate_proj.shape[0]:  # decode: dequantise the gathered experts; no host sync
            return self._gathered(x_TD, idx_Tk, w_Tk)
        return self._per_expert(x_TD, idx_Tk, w_Tk)

    def _gathered(self, x_TD, idx_Tk, w_Tk):
        dt = x_TD.dtype
        g, u = self.dequantized("gate_proj", idx_Tk, dt), self.dequantized("up_proj", idx_Tk, dt)  # [T,k,I,D]
        d = self.dequantized("down_proj", idx_Tk, dt)  # [T,k,D,I]
        h = F.silu(torch.einsum("tkid,td->tki", g, x_TD)) * torch.einsum("tkid,td->tki", u, x_TD)
        y_TkD = torch.einsum("tkdi,tki->tkd", d, h)
        return (y_TkD.float() * w_Tk[..., None]).sum(1)

    def _per_expert(self, x_TD, idx_Tk, w_Tk):
        def ffn_e(e: int, xs: Tensor) -> Tensor:  # only the experts some token uses are dequantised
            g, u, d = (self.dequantized(n, e, xs.dtype) for n in ("gate_proj", "up_proj", "down_proj"))
            return (F.silu(xs @ g.T) * (xs @ u.T)) @ d.T

        return sorted_by_expert(x_TD, idx_Tk, w_Tk, self.gate_proj.shape[0], expert_loop(ffn_e))

    def extra_repr(self) -> str:
        E, I, D = self.gate_proj.shape
        return f"experts={E}, dim={D}, hidden={I}, fp8_e4m3 block 128x128"


# ---- swapping modules ----------------------------------------------------------------------------------
def converter_slots(model: Transformer) -> list[tuple[nn.Module, str, bool | None]]:
    """(parent, attribute, ue8m0) for every tensor the official converter quantises; ue8m0 None = experts."""
    slots: list[tuple[nn.Module, str, bool | None]] = []
    for module in model.modules():
        if isinstance(module, Attention):
            slots += [(module, "query_key_value", False), (module, "dense", True)]
        elif isinstance(module, MLP):  # dense-layer MLPs and shared experts (MTP eh_proj is not an MLP)
            slots += [(module, n, False) for n in ("gate_proj", "up_proj", "down_proj")]
        elif isinstance(module, MoE):
            slots.append((module, "experts", None))
    return slots


def _swap(model: Transformer, make_linear: Callable[[nn.Linear, bool], nn.Module],
          make_experts: Callable[[Experts], nn.Module]) -> Transformer:
    for parent, attr, ue8m0 in converter_slots(model):
        old = getattr(parent, attr)
        if isinstance(old, (FP8Linear, FP8Experts)):
            continue  # already quantised
        setattr(parent, attr, make_experts(old) if ue8m0 is None else make_linear(old, ue8m0))
    return model


@torch.no_grad()
def quantize_model_(model: Transformer) -> Transformer:
    """In place: quantise the converter's tensors to block FP8 and swap in FP8Linear / FP8Experts."""
    return _swap(model, FP8Linear.from_linear, FP8Experts.from_experts)


@torch.no_grad()
def dequantize_model_(model: Transformer, dtype: torch.dtype | None = None) -> Transformer:
    """Inverse swap (e.g. before `checkpoint.save_model`, which expects plain modules): nn.Linear / Experts."""
    dtype = dtype or model.model.word_embeddings.weight.dtype
    for parent, attr, ue8m0 in converter_slots(model):
        m = getattr(parent, attr)
        if isinstance(m, FP8Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                            dtype=dtype)
            lin.weight.copy_(m.dequantized(dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            setattr(parent, attr, lin)
        elif isinstance(m, FP8Experts):
            E, I, D = m.gate_proj.shape
            ex = Experts(E, D, I).to(device=m.gate_proj.device, dtype=dtype)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(ex, name).copy_(m.dequantized(name, dtype=dtype))
            setattr(parent, attr, ex)
    return model


# ---- loading ----------------------------------------------------------------------------------------------
def load_fp8(path: str | os.PathLike, mode: str = "resident", dtype: torch.dtype | str | None = None,
             device: str | torch.device = "cpu") -> Transformer:
    """Load a block-FP8 checkpoint: mode "dequant" (once, at load) or "resident" (fp8 kept in memory)."""
    if mode == "dequant":
        return load_model(path, dtype, device)
    if mode == "resident":
        return load_fp8_resident(path, dtype, device)
    raise ValueError(f"unknown FP8 mode {mode!r}; expected one of {MODES}")


_EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")


def _targets(model: Transformer) -> dict[str, Tensor]:
    """Checkpoint tensor name -> destination tensor (a view into the resident model)."""
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$", name)
        if m:
            suffix = "weight_scale_inv" if m.group(3) else "weight"
            out |= {f"{m.group(1)}.{e}.{m.group(2)}.{suffix}": t[e] for e in range(t.shape[0])}
        else:
            out[name] = t
    return out


@torch.no_grad()
def load_fp8_resident(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                      device: str | torch.device = "cpu") -> Transformer:
    """Build a Transformer whose converter-quantised weights stay float8_e4m3fn + fp32 block scales.

    Tensors are copied one at a time from the memory-mapped files; nothing is ever dequantised here.
    Non-quantised tensors are cast to `dtype` (default: config torch_dtype), expert_bias stays fp32.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} not found")
    cfg = ModelConfig.from_json(path)
    qc = cfg.quantization_config or {}
    if qc.get("quant_method") != "fp8" or list(qc.get("weight_block_size") or []) != [FP8_BLOCK, FP8_BLOCK]:
        raise CheckpointError(f"{path}/config.json: not a block-FP8 checkpoint (quantization_config={qc or None}); "
                              f"expected quant_method 'fp8' with weight_block_size [128, 128]. "
                              f"For a bf16/fp32 checkpoint use load_model() then quantize_model_().")
    dtype = _dtype(dtype or cfg.torch_dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype=dtype)
    _swap(model,
          lambda lin, _: FP8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                   bias_dtype=dtype, device="meta"),
          lambda ex: FP8Experts(ex.gate_proj.shape[0], ex.gate_proj.shape[2], ex.gate_proj.shape[1], device="meta"))
    model.to_empty(device=device)
    model.inv_freq = rope_parameters(cfg)[0].to(device)
    targets = _targets(model)
    seen: set[str] = set()
    unknown: list[str] = []
    for name, tensor in iter_checkpoint(path):
        dst = targets.get(name)
        if dst is None:
            unknown.append(name)
            continue
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {tuple(dst.shape)}")
        if (dst.dtype == FP8) != (tensor.dtype == FP8):
            raise CheckpointError(f"{path}: tensor {name!r} is {tensor.dtype} but the FP8 converter layout "
                                  f"expects {'float8_e4m3fn' if dst.dtype == FP8 else 'an unquantised tensor'}")
        dst.copy_(tensor)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if unknown or missing:
        msg = [f"{path}: FP8 checkpoint does not match the config"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unknown:
            msg.append(f"unknown tensors ({len(unknown)}): {sorted(unknown)[:8]}{' …' if len(unknown) > 8 else ''}")
        raise CheckpointError("; ".join(msg))
    return model.eval()


# ---- accounting ----------------------------------------------------------------------------------------------
def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights (persistent state: parameters and buffers, not KV caches or rope tables).

    fp8: float8 weights; fp8_scales: their fp32 block scales; other: everything else; total: the sum;
    fp8_as_bf16: what the fp8 weights would take in bf16 (for the ratio).
    """
    fp8 = scales = other = fp8_numel = 0
    for name, t in model.state_dict(keep_vars=True).items():
        n = t.numel() * t.element_size()
        if t.dtype == FP8:
            fp8 += n
            fp8_numel += t.numel()
        elif name.endswith("_scale_inv"):
            scales += n
        else:
            other += n
    return {"total": fp8 + scales + other, "fp8": fp8, "fp8_scales": scales, "other": other,
            "fp8_as_bf16": 2 * fp8_numel}


__all__ = ["MODES", "FP8Linear", "FP8Experts", "dequantize_blocks", "fp8_to_float32", "quantize_model_", "dequantize_model_",
           "load_fp8", "load_fp8_resident", "resident_weight_bytes", "quantize_activations_1x128"]

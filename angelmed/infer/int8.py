"""Int8 weight-only quantisation for serving: half the weight bytes of BF16, and faster decode on CPUs.

Each output row of a weight matrix gets one scale (symmetric, per channel): w ~= q * s with q in int8 [-127, 127]
and s = max|w_row| / 127 in the activation dtype. Activations stay in BF16/FP32 (weight-only, as gpt-fast's int8).
The quantised tensors are the ones the official FP8 converter quantises (attention projections, dense and shared
MLPs, routed experts); embeddings, lm_head, norms and routers keep the model dtype.

On CPU the projections run `torch._weight_int8pack_mm` (int8 weights read as they lie, 2.5x the rate of the
library's BF16 GEMV at one row, measured) and routed experts run per expert; under `torch.compile` few (token,
expert) pairs read their int8 rows in one fused kernel that scales each dot product. Elsewhere (GPU) weights are
dequantised per call.

This is a runtime mode (`angelmed serve/chat --quantize int8`): `load_int8` quantises a BF16/FP32 or block-FP8
checkpoint tensor by tensor as it streams from the memory-mapped files, so memory never holds more than the int8
model and one tensor. Checkpoints are not written in int8.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from angelmed.model import (Experts, Transformer, expert_loop, opaque_in_compiled_graphs, rope_parameters,
                            sorted_by_expert)

QMAX = 127


def quantize_rows(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int8 q and per-row scale s (in `dtype`) with w ~= q * s along the last dimension."""
    w = w.detach().float()
    s = w.abs().amax(-1).clamp(min=1e-12) / QMAX
    q = (w / s[..., None]).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q, s.to(dtype)


def _int8_mm(x: Tensor, q: Tensor, s: Tensor) -> Tensor:
    """x @ (q * s)^T for x [..., in], q [out, in] int8, s [out]."""
    if x.device.type == "cpu":
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), q, s)
        return y.view(*x.shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype)) * s


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        q, s = quantize_rows(linear.weight, dtype)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        y = _int8_mm(x, self.weight, self.weight_scale.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int8Experts(Experts):
    """Stacked experts in int8 (gate/up [E, I, D], down [E, D, I]) with per-row scales [E, rows]; the same
    contract and dispatch as `model.Experts` (its forward), with int8 gathered and grouped paths."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(experts, name)
            q, s = quantize_rows(w, w.dtype)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", s)

    def dequantized(self, name: str, experts: Tensor | int | slice = slice(None),
                    dtype: torch.dtype = torch.float32) -> Tensor:
        return getattr(self, name)[experts].to(dtype) * getattr(self, f"{name}_scale")[experts].to(dtype)[..., None]

    def _gathered(self, x_TD, idx_Tk, w_Tk):
        # int8 rows read where they lie; a row's scale multiplies its dot product, not each weight; fp32 sums
        # (compiled on CPU: 116 us per base-100m layer at one token, against 177 dequantising first, 230 in bf16)
        f32 = torch.float32
        g, u, d = (getattr(self, n)[idx_Tk].to(f32) for n in ("gate_proj", "up_proj", "down_proj"))
        sg, su, sd = (getattr(self, f"{n}_scale")[idx_Tk].to(f32) for n in ("gate_proj", "up_proj", "down_proj"))
        x = x_TD.float()
        if torch.compiler.is_compiling():
            x4 = x[:, None, None, :]
            h_TkI = F.silu((g * x4).sum(-1) * sg) * ((u * x4).sum(-1) * su)
            y_TkD = (d * h_TkI[:, :, None, :]).sum(-1) * sd
        else:
            h_TkI = F.silu(torch.einsum("tkid,td->tki", g, x) * sg) * (torch.einsum("tkid,td->tki", u, x) * su)
            y_TkD = torch.einsum("tkdi,tki->tkd", d, h_TkI) * sd
        return (y_TkD * w_Tk[..., None]).sum(1)

    def _grouped(self, x_TD, idx_Tk, w_Tk):
        return int8_grouped_experts(x_TD, idx_Tk, w_Tk, *(getattr(self, n) for n in _EXPERT_TENSORS))

    def extra_repr(self) -> str:
        E, I, D = self.gate_proj.shape
        return f"experts={E}, dim={D}, hidden={I}, int8 per-row scales"


_EXPERT_TENSORS = ("gate_proj", "gate_proj_scale", "up_proj", "up_proj_scale", "down_proj", "down_proj_scale")


@opaque_in_compiled_graphs("angelmed::int8_grouped_experts")
def int8_grouped_experts(x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor, gate_q: Tensor, gate_s: Tensor, up_q: Tensor,
                         up_s: Tensor, down_q: Tensor, down_s: Tensor) -> Tensor:
    """`model.grouped_experts` for int8 experts: the pairs grouped by expert, one int8 matmul per weight and expert."""
    def ffn_e(e: int, xs: Tensor) -> Tensor:
        h = F.silu(_int8_mm(xs, gate_q[e], gate_s[e].to(xs.dtype))) * _int8_mm(xs, up_q[e], up_s[e].to(xs.dtype))
        return _int8_mm(h, down_q[e], down_s[e].to(xs.dtype))

    return sorted_by_expert(x_TD, idx_Tk, w_Tk, gate_q.shape[0], expert_loop(ffn_e))


@torch.no_grad()
def quantize_int8_(model: Transformer) -> Transformer:
    """In place: swap the converter's tensors for int8 modules, one module at a time (the original weights of
    each are freed as it is replaced)."""
    from angelmed.infer.quant import converter_slots

    for parent, attr, ue8m0 in converter_slots(model):  # ue8m0 None marks the routed experts
        old = getattr(parent, attr)
        if isinstance(old, (Int8Linear, Int8Experts)):
            continue
        if not isinstance(old, (nn.Linear, Experts)):
            raise TypeError(f"quantize_int8_: {type(old).__name__} at {attr!r} is already quantised otherwise "
                            "(load FP8 checkpoints dequantised: mode 'dequant')")
        setattr(parent, attr, Int8Experts(old) if ue8m0 is None else Int8Linear(old))
    return model


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules())


def load_int8(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device="cpu") -> Transformer:
    """A checkpoint directory loaded straight into an int8 model (same result as `quantize_int8_(load_model(...))`):
    built on the meta device, then each tensor is cast to `dtype` (default: the config's; BF16 for FP8
    checkpoints) and quantised as it is read."""
    from angelmed.checkpoint import CheckpointError, _assign, _checkpoint_names, _dtype, _target, load_state
    from angelmed.config import ModelConfig

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} not found")
    cfg = ModelConfig.from_json(path)
    dtype = _dtype(dtype or ("bfloat16" if cfg.quantization_config else cfg.torch_dtype))
    with torch.device("meta"):
        model = Transformer(cfg.replace(quantization_config=None))
    model.to(dtype=dtype)
    expected = _checkpoint_names(model)
    quantize_int8_(model)  # on meta: int8 modules of the right shapes, nothing computed
    model.to_empty(device=device)
    model.inv_freq = rope_parameters(cfg)[0].to(device)

    def assign(params: dict[str, Tensor], name: str, tensor: Tensor, where: Path) -> None:
        target, expert = _target(params, name)
        if params[target].dtype != torch.int8:
            return _assign(params, name, tensor, where)
        q_dst, s_dst = params[target], params[target + "_scale"]
        if expert is not None:
            q_dst, s_dst = q_dst[expert], s_dst[expert]
        if tuple(q_dst.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {tuple(q_dst.shape)}")
        q, s = quantize_rows(tensor.to(dtype), s_dst.dtype)  # what the model in `dtype` would hold, quantised
        q_dst.copy_(q)
        s_dst.copy_(s)

    with torch.no_grad():
        load_state(model, path, assign=assign, expected=expected)
    return model.eval()

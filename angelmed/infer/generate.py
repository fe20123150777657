"""Plain generation as a few functions (gpt-fast style): prefill, decode one token, loop.

The serving engine (engine.py) adds continuous batching on top of the same two steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from angelmed.infer.sampling import sample
from angelmed.model import KVCache, Transformer


@torch.no_grad()
def prefill(model: Transformer, ids_BT: Tensor, caches: list[KVCache], pos_BT: Tensor | None = None) -> Tensor:
    """Run the prompt through the model, filling the caches; returns last-position logits [B,V]."""
    if pos_BT is None:
        pos_BT = torch.arange(ids_BT.shape[1], device=ids_BT.device).expand_as(ids_BT)
    return model(ids_BT, pos_BT=pos_BT, caches=caches).logits[:, -1]


@torch.no_grad()
def decode_one(model: Transformer, tok_B: Tensor, pos_B: Tensor, caches: list[KVCache]) -> Tensor:
    return model(tok_B[:, None], pos_BT=pos_B[:, None], caches=caches).logits[:, -1]


@torch.no_grad()
def generate(model: Transformer, ids_BT: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: list[int] | None = None, seed: int | None = None,
             ) -> Tensor:
    """New tokens [B, N]. Rows that hit a stop id keep emitting it (the caller trims); no stop if None."""
    B, T = ids_BT.shape
    caches = model.make_caches(B, T + max_new_tokens)
    dev = ids_BT.device
    temp_B = torch.full((B,), float(temperature), device=dev)
    topk_B = torch.full((B,), int(top_k), device=dev)
    topp_B = torch.full((B,), float(top_p), device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(stop_ids or [], device=dev, dtype=torch.long)
    done_B = torch.zeros(B, dtype=torch.bool, device=dev)
    logits = prefill(model, ids_BT, caches)
    out = []
    pos_B = torch.full((B,), T, device=dev)
    for i in range(max_new_tokens):
        tok = sample(logits.float(), temp_B, topk_B, topp_B, gen)
        if stop.numel():
            tok = torch.where(done_B, out[-1] if out else tok, tok)
            done_B |= torch.isin(tok, stop)
        out.append(tok)
        if i + 1 < max_new_tokens:
            logits = decode_one(model, tok, pos_B, caches)
            pos_B = pos_B + 1
    return torch.stack(out, dim=1)

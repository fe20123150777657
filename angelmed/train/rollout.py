"""GRPO rollouts and the training-side view of them (training.md §7.1, §7.9).

`generate_groups` samples G completions per prompt with the serving engine (continuous batching, one seed per
completion, the engine's log-probs = pi_rollout, and the expert ids of every processed token for routing
replay). `collate` turns completions into one right-padded training batch: input = prompt + completion minus
its last token (exactly the tokens the engine fed through the model), so the recorded routing lines up with
the input position by position. `policy_logprobs` runs one forward over that batch (routing forced to the
recorded experts when replaying; gate weights are recomputed from the live router scores by the model) and
reads the log-probs of the completion tokens.

Shapes: B sequences, T input positions, L completion positions, k experts per token, D hidden.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.train.grpo_loss import token_logprobs


@dataclass
class PromptItem:
    """One RL prompt: its token ids and what reward functions may read (messages and dataset columns)."""
    prompt_ids: list[int]
    messages: list[dict[str, Any]]
    columns: dict[str, Any] = field(default_factory=dict)  # answer, source, id and the record's meta keys


@dataclass
class Completion:
    group: int  # index of its prompt in the generation batch
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with the stop id when one ended it
    rollout_logprobs: list[float]  # log pi_rollout(token) under the engine's raw (untempered) distribution
    routing: list[Tensor] | None  # per MoE layer [len(prompt)+len(completion)-1, k] expert ids
    truncated: bool  # hit max_completion_length without a stop id
    text: str


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: list[int] | None = None


def encode_prompt(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Chat-template ids of `messages` followed by the assistant header the model continues from."""
    try:
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        return list(ids)
    except TypeError:  # the byte-level stand-in of train/data.py has no add_generation_prompt
        ids, _ = tokenizer.encode_chat(messages)
        return list(ids) + tokenizer.encode("<role>ASSISTANT</role>")


def stop_ids_of(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "stop_ids", None)
    if ids:
        return list(ids)
    return [i for i in (getattr(tokenizer, "role_end_id", None), getattr(tokenizer, "eod_id", None)) if i is not None]


def completion_seed(base: int, *parts: int) -> int:
    """A 63-bit seed that is a pure function of (base seed, step, batch, prompt, sample): resumes reproduce."""
    key = "/".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generate_groups(engine: Engine, items: list[PromptItem], group_size: int, sampling: Sampling,
                    seeds: list[list[int]] | None, record_routing: bool, decode=None) -> list[Completion]:
    """G completions per prompt (all requests submitted at once; the engine batches them). seeds[i][g] seeds
    completion g of prompt i (None: greedy/unseeded). decode(ids) -> text when the engine has no tokenizer."""
    requests = []
    for i, item in enumerate(items):
        for g in range(group_size):
            requests.append(GenerationRequest(
                prompt_ids=list(item.prompt_ids), max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k, stop_ids=sampling.stop_ids,
                seed=None if seeds is None else seeds[i][g], logprobs=True, record_routing=record_routing))
    results = engine.generate(requests)
    out = []
    for n, r in enumerate(results):
        if r.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"rollout request {n} ended with {r.finish_reason!r}: {r.error}")
        text = r.text if r.text is not None else (decode(_without_stop(r)) if decode else "")
        out.append(Completion(n // group_size, list(r.prompt_ids), list(r.token_ids), list(r.logprobs or []),
                              r.routing, r.finish_reason == "length", text))
    return out


def _without_stop(r) -> list[int]:
    return r.token_ids[:-1] if r.finish_reason == "stop" and isinstance(r.stop_reason, int) else r.token_ids


@dataclass
class TrainBatch:
    ids_BT: Tensor  # prompt + completion[:-1], right-padded
    comp_pos_BL: Tensor  # input position whose next-token prediction is completion token l
    targets_BL: Tensor  # the completion tokens
    mask_BL: Tensor  # bool: a real completion token
    valid_BT: Tensor  # bool: a real (non-pad) input position
    rollout_logp_BL: Tensor
    forced: list[Tensor] | None  # per MoE layer [B,T,k] long (pads: experts 0..k-1)

    @property
    def size(self) -> int:
        return self.ids_BT.shape[0]


def collate(completions: list[Completion], device: torch.device, num_moe_layers: int, top_k: int,
            pad_id: int = 0) -> TrainBatch:
    B = len(completions)
    T = max(len(c.prompt_ids) + len(c.completion_ids) - 1 for c in completions)
    L = max(len(c.completion_ids) for c in completions)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    pos = torch.zeros(B, L, dtype=torch.long)
    tgt = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    rlp = torch.zeros(B, L)
    have_routing = all(c.routing is not None for c in completions) and num_moe_layers > 0
    forced = [torch.arange(top_k).repeat(B, T, 1) for _ in range(num_moe_layers)] if have_routing else None
    for b, c in enumerate(completions):
        P, C = len(c.prompt_ids), len(c.completion_ids)
        seq = c.prompt_ids + c.completion_ids[:-1]
        ids[b, :len(seq)] = torch.tensor(seq)
        valid[b, :len(seq)] = True
        pos[b, :C] = torch.arange(P - 1, P - 1 + C)
        tgt[b, :C] = torch.tensor(c.completion_ids)
        mask[b, :C] = True
        if c.rollout_logprobs:
            rlp[b, :C] = torch.tensor(c.rollout_logprobs[:C])
        if forced is not None:
            if len(c.routing) != num_moe_layers:
                raise ValueError(f"completion {b}: routing has {len(c.routing)} layers, the model {num_moe_layers}")
            for layer, ids_nk in enumerate(c.routing):
                if ids_nk.shape != (len(seq), top_k):
                    raise ValueError(f"completion {b}, MoE layer {layer}: recorded routing {tuple(ids_nk.shape)} "
                                     f"does not match the {len(seq)} processed tokens x top-{top_k}")
                forced[layer][b, :len(seq)] = ids_nk.long()
    return TrainBatch(ids.to(device), pos.to(device), tgt.to(device), mask.to(device), valid.to(device),
                      rlp.to(device), None if forced is None else [f.to(device) for f in forced])


def policy_logprobs(model, batch: TrainBatch, temperature: float = 1.0, replay: bool = True,
                    entropy: bool = False) -> tuple[Tensor, Tensor | None, Any]:
    """(log pi(completion token) [B,L] in fp32, per-token entropy [B,L] (no grad) or None, ModelOutput).

    One forward over prompt+completion; logits only at completion positions (the lm_head over the prompt
    would be wasted work). Logits are divided by the sampling temperature, as the tokens were drawn from it.
    """
    forced = batch.forced if replay else None
    out = model(batch.ids_BT, compute_logits=False, forced_routing=forced)
    D = out.hidden.shape[-1]
    h_BLD = out.hidden.gather(1, batch.comp_pos_BL[..., None].expand(-1, -1, D))
    logits = model.logits_from_hidden(h_BLD)
    if temperature != 1.0:
        logits = logits / temperature
    logp = token_logprobs(logits, batch.targets_BL)
    ent = None
    if entropy:
        with torch.no_grad():
            lse = logits.logsumexp(-1, keepdim=True)
            ent = -(torch.exp(logits - lse) * (logits - lse)).sum(-1)
    return logp, ent, out


@torch.no_grad()
def routing_disagreement(gates: list, router_infos: list, batch: TrainBatch) -> tuple[float, float, int]:
    """How often the training router, on the training forward's own layer inputs, would pick a different expert
    set than the rollout recorded: (fraction of (token, MoE layer) decisions, fraction of tokens with at least one
    differing layer, number of tokens). Sets are compared (order within top-k does not matter)."""
    if batch.forced is None or not router_infos:
        return 0.0, 0.0, 0
    B, T = batch.ids_BT.shape
    valid = batch.valid_BT
    any_BT = torch.zeros(B, T, dtype=torch.bool, device=valid.device)
    decisions = 0
    for gate, info, rec_BTk in zip(gates, router_infos, batch.forced):
        live_BTk = gate.select(info.scores_TE).view(B, T, -1)
        differ = (live_BTk.sort(-1).values != rec_BTk.sort(-1).values).any(-1) & valid
        decisions += int(differ.sum())
        any_BT |= differ
    n_tok = int(valid.sum())
    return decisions / max(1, n_tok * len(gates)), int(any_BT.sum()) / max(1, n_tok), n_tok

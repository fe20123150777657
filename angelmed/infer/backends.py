"""Local model backends for evaluation: chat generation through the engine, and log-likelihood scoring.

A model dir is an HF checkpoint directory with the tokenizer files (tokenizer.json, ...) inside.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.model import Transformer


def load_tokenizer(model_dir: str | os.PathLike):
    try:
        from angelmed.tokenizer import Tokenizer
    except ImportError as e:
        raise ImportError(f"loading the tokenizer of {model_dir} needs angelmed.tokenizer ({e})") from e
    return Tokenizer.load(model_dir)


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the chat template plus the assistant generation prompt."""
    if hasattr(tokenizer, "encode_chat"):
        return list(tokenizer.encode_chat(messages, add_generation_prompt=True)[0])
    return list(tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True)))


def _load(model_dir, model, tokenizer, dtype, device) -> tuple[Transformer, Any]:
    if model is None:
        from angelmed.checkpoint import load_model
        from angelmed.infer.cpu_pack import bf16_storage_, inference_dtype

        model = load_model(model_dir, dtype=inference_dtype(model_dir, dtype, device), device=device)
        bf16_storage_(model, dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    return model, tokenizer


class LocalChatBackend:
    def __init__(self, model: Transformer, tokenizer: Any, **engine_kw):
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer=tokenizer, **engine_kw)

    def generate(self, conversations: list[list[dict]], max_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> list[str]:
        """One reply per conversation (batched through the engine); replies stop at the tokenizer's stop ids."""
        room = self.engine.max_seq_len - 1
        reqs = []
        for i, conv in enumerate(conversations):
            ids = chat_prompt_ids(self.tokenizer, conv)
            if len(ids) > room:  # keep the end of an overlong conversation: the question and the prompt
                ids = ids[-room:]
            reqs.append(GenerationRequest(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          top_k=top_k, seed=None if seed is None else seed + i))
        return [r.text or "" for r in self.engine.generate(reqs)]


class LocalLoglikBackend:
    def __init__(self, model: Transformer, tokenizer: Any, batch_size: int = 8, max_len: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = max_len or model.config.max_position_embeddings

    def loglik(self, requests: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of log p(continuation | context) per (context_ids, continuation_ids) pair."""
        return [s for s, _ in self.loglik_greedy(requests)]

    @torch.no_grad()
    def loglik_greedy(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether the continuation is the greedy one) per request."""
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"requests[{i}]: empty continuation")
            if not ctx:
                raise ValueError(f"requests[{i}]: empty context (prepend a BOS token to score from the start)")
        dev = next(self.model.parameters()).device
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first, so each batch pads little
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            seqs, starts = [], []
            for i in chunk:
                ctx, cont = requests[i]
                full = (list(ctx) + list(cont))[-self.max_len:]  # left-truncate, keep the continuation
                seqs.append(full)
                starts.append(len(full) - len(cont))
            T = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.tensor(s)
            hidden = self.model(ids.to(dev), compute_logits=False).hidden  # right padding: causal, harmless
            for j, i in enumerate(chunk):
                cont = torch.tensor(requests[i][1], device=dev)
                h = hidden[j, starts[j] - 1:starts[j] - 1 + len(cont)]
                logp = self.model.logits_from_hidden(h).log_softmax(-1)
                total = logp.gather(-1, cont[:, None]).sum().item()
                out[i] = (total, bool((logp.argmax(-1) == cont).all()))
        return out  # type: ignore[return-value]


def local_chat_backend(model_dir: str | os.PathLike, model: Transformer | None = None, tokenizer: Any = None,
                       dtype: str | None = None, device: str = "cpu", **engine_kw) -> LocalChatBackend:
    """Chat backend over a local checkpoint. engine_kw: max_batch, max_seq_len, draft, ..."""
    model, tokenizer = _load(model_dir, model, tokenizer, dtype, device)
    return LocalChatBackend(model, tokenizer, **engine_kw)


def local_loglik_backend(model_dir: str | os.PathLike, model: Transformer | None = None, tokenizer: Any = None,
                         dtype: str | None = None, device: str = "cpu", batch_size: int = 8) -> LocalLoglikBackend:
    model, tokenizer = _load(model_dir, model, tokenizer, dtype, device)
    return LocalLoglikBackend(model, tokenizer, batch_size=batch_size)

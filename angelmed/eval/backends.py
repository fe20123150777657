"""What evaluation needs from a model: chat generation and continuation log-likelihoods.

`ChatBackend` and `LoglikBackend` are protocols; the OpenAI-endpoint and plain-torch implementations live here, the
local-engine ones in `angelmed.infer.backends` (loaded lazily by the CLI).
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ChatBackend(Protocol):
    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int | None = None) -> list[str]:
        """One assistant reply per conversation (list of {role, content}), in order; with a seed, conversation i
        is sampled with seed + i (reproducible sampled answers)."""
        ...


@runtime_checkable
class LoglikBackend(Protocol):
    def loglik(self, requests: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of log-probs of the continuation tokens given the context tokens, per (context, continuation)."""
        ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class OpenAIChatBackend:
    """Chat completions from any OpenAI-compatible endpoint (ours, vLLM, SGLang, a hosted API).

    Requests run concurrently (at most `concurrency` in flight); API errors are retried with exponential backoff up
    to `max_retries` times, after which the error is raised (a missing candidate answer must not pass silently).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 6, backoff_s: float = 1.0, timeout_s: float = 600.0, progress: bool = False,
                 extra_body: dict | None = None):
        self.base_url = base_url
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.progress = progress
        self.extra_body = extra_body

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int | None = None) -> list[str]:
        return asyncio.run(self.agenerate(conversations, max_tokens, temperature, seed))

    async def agenerate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                        seed: int | None = None) -> list[str]:
        from angelmed.judge import map_with_client

        async def one(client, item: tuple[int, list[dict]]) -> str:
            import openai

            from angelmed.judge import backoff_delay

            i, messages = item
            seeded = {} if seed is None else {"seed": seed + i}
            attempt = 0
            while True:
                try:
                    response = await client.chat.completions.create(
                        model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                        extra_body=self.extra_body, **seeded,
                    )
                    return (response.choices[0].message.content or "") if response.choices else ""
                except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                    attempt += 1
                    if attempt > self.max_retries:
                        raise RuntimeError(f"candidate endpoint {self.base_url} failed {attempt} times: {e}") from e
                    await asyncio.sleep(backoff_delay(self.backoff_s, attempt))

        return await map_with_client(self.base_url, self.api_key, self.timeout_s, self.concurrency,
                                     list(enumerate(conversations)), one, f"generate ({self.model})", self.progress)


class TorchLoglik:
    """Continuation log-likelihoods from any causal LM `model(ids_BT) -> obj with .logits [B, T, V]`.

    Requests are sorted by length (longest first) and packed into right-padded batches of at most
    `max_batch_tokens` tokens; right padding never influences earlier positions of a causal model.
    """

    def __init__(self, model: torch.nn.Module, max_batch_tokens: int = 8192, pad_id: int = 0,
                 device: str | torch.device | None = None, progress: bool = False):
        self.model = model
        self.progress = progress
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = pad_id
        self.device = torch.device(device) if device is not None else _module_device(model)

    @torch.no_grad()
    def loglik(self, requests: list[tuple[list[int], list[int]]]) -> list[float]:
        for i, (context, continuation) in enumerate(requests):
            if not context:
                raise ValueError(f"loglik request {i}: empty context (prepend a BOS token)")
            if not continuation:
                raise ValueError(f"loglik request {i}: empty continuation")
        # Input = context + continuation minus the last token; the continuation's log-probs come from the last
        # len(continuation) positions of that input.
        lengths = [len(c) + len(x) - 1 for c, x in requests]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        results: list[float] = [0.0] * len(requests)
        bar = None
        if self.progress and requests:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="loglik", unit="req", leave=False)
        start = 0
        while start < len(order):
            longest = lengths[order[start]]
            batch_size = max(1, self.max_batch_tokens // max(longest, 1))
            batch = order[start:start + batch_size]
            start += len(batch)
            ids_BT = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens = (requests[i][0] + requests[i][1])[:-1]
                ids_BT[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logits_BTV = self.model(ids_BT.to(self.device)).logits.float()
            logprobs_BTV = torch.log_softmax(logits_BTV, dim=-1)
            for row, i in enumerate(batch):
                context, continuation = requests[i]
                first = len(context) - 1  # position whose next-token distribution predicts continuation[0]
                positions = torch.arange(first, first + len(continuation), device=logprobs_BTV.device)
                targets = torch.tensor(continuation, dtype=torch.long, device=logprobs_BTV.device)
                results[i] = float(logprobs_BTV[row, positions, targets].sum())
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return results


def _module_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

"""Serving engine: continuous batching over one preallocated KV cache.

Every slot of the cache (`max_batch` rows) holds one request. Each `step()`:
  1. drops cancelled requests (their slot is free at once),
  2. admits queued requests into free slots and prefills them together (right-padded batch; each row at its
     own positions; the first token is sampled from the prefill logits),
  3. runs one decode step over the active slots (or one speculative round when a draft model is attached),
  4. copies the new token ids to the host once, and applies stop ids, stop strings and length limits there.

Sampling state (temperature, top-k, top-p, repetition penalty, seed) lives in per-slot device tensors, so one
batched step serves requests with different settings. Random numbers come from a counter-based hash of
(seed, step, vocab id): a seeded request draws the same tokens whether it runs alone or beside others, and the
decode step needs no generator objects and no host syncs (it can be compiled).

Prefix reuse: a finished request leaves its tokens' K/V in its slot. A new request whose prompt starts with
those tokens (the next turn of the same chat, or the same system prompt) takes them from that slot (copied into a
slot among the rows decode steps already cover, if that one lies past them) and prefills only the rest of its
prompt. The first positions are computed again: free slots' decode writes land there (position 0; with a draft,
the first 2(k+1)). A drafter takes its own cached entries for the prefix the same way.

Prefill: one admission's prompts run in forwards of similar length (`prefill_groups`), so a long prompt does not
pad every short one.

Used by GRPO rollouts and eval (`generate`, blocking), the server (`start()` + `stream()`), and the terminal
chat. Shape suffixes: B slots, T tokens, V vocab, S cache positions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

import angelmed.model as model_module
from angelmed import cpu_kernels
from angelmed.infer import cpu_pack
from angelmed.infer.sampling import apply_repetition_penalty, argmax, filter_logits
from angelmed.model import Experts, ModelOutput, RouterInfo, Transformer, signature, write_kv
from angelmed.paths import cache_root

log = logging.getLogger(__name__)

# spec model.md §11 (AntAngelMed README): what the server uses when a request leaves a setting out
RECOMMENDED_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}


class EngineError(RuntimeError):
    pass


class QueueFull(EngineError):
    pass


class EngineClosed(EngineError):
    pass


class TokenizerLike(Protocol):
    stop_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


# ---- requests and results ----------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """One generation. temperature 0 = greedy. stop_ids None = the engine's defaults (tokenizer stop ids)."""
    prompt_ids: list[int]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] | None = None
    logprobs: bool = False  # log-prob of each generated token under the raw model distribution
    top_logprobs: int = 0  # with logprobs: also the n most likely tokens at each step (n <= 20)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # [routing record] GRPO routing replay (R3): return the expert ids the model chose for this request
    record_routing: bool = False
    # prefix reuse only between requests with the same salt: give each user (patient, tenant) their own, so no
    # one can tell from cached_tokens or the time to first token what someone else's conversation began with
    cache_salt: str | None = None

    def validate(self, vocab_size: int) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"{name}: {why}")

        if not isinstance(self.prompt_ids, (list, tuple)) or not self.prompt_ids:
            bad("prompt_ids", "expected a non-empty list of token ids")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in self.prompt_ids):
            bad("prompt_ids", f"token ids must be ints in [0, {vocab_size})")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"expected an int >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            bad("temperature", f"expected 0 <= temperature <= 100, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"expected 0 < top_p <= 1, got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"expected an int >= 0 (0 = off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", f"expected > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if self.stop_ids is not None and any(not isinstance(t, int) or not 0 <= t < vocab_size for t in self.stop_ids):
            bad("stop_ids", f"token ids must be ints in [0, {vocab_size})")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            bad("top_logprobs", f"expected an int in [0, 20], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", "needs logprobs=True")


@dataclass
class Delta:
    """What one request produced since its last delta (streaming)."""
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, log-prob), most likely first
    cached_tokens: int = 0  # prompt tokens whose K/V came from the slot's earlier request (prefix reuse)


@dataclass
class Result:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids; ends with the stop id when one ended generation (as vLLM)
    text: str | None  # decoded completion without the stop id / stop string (None without a tokenizer)
    finish_reason: str
    logprobs: list[float] | None = None
    stop_reason: int | str | None = None  # the stop id or stop string that matched
    error: str | None = None
    # [routing record] with record_routing: per MoE layer (ModelOutput.router order) the expert ids [n, k]
    # (int16/int32, CPU) of every token the model processed for this request: the prompt, then each generated
    # token that was fed back (all but the last), so n = len(prompt_ids) + len(token_ids) - 1.
    routing: list[Tensor] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    cached_tokens: int = 0  # prompt tokens not prefilled: their K/V were still in the slot (prefix reuse)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    def __init__(self, request: GenerationRequest, on_delta: Callable[[Delta], None] | None):
        self.request = request
        self.request_id = request.request_id
        self._on_delta = on_delta
        self._done = threading.Event()
        self._result: Result | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        assert self._result is not None
        return self._result

    def _emit(self, delta: Delta) -> None:
        if self._on_delta is not None:
            try:
                self._on_delta(delta)
            except Exception:  # a consumer that went away must not break the engine
                log.debug("delta consumer of %s failed", self.request_id, exc_info=True)

    def _finish(self, result: Result) -> None:
        self._result = result
        self._done.set()


@dataclass
class EngineMetrics:
    requests_submitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # of those, reused from a slot's earlier request instead of prefilled
    tokens_generated: int = 0
    steps: int = 0
    queue_depth: int = 0
    active_slots: int = 0
    max_batch: int = 0
    spec_rounds: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- counter-based random numbers (no generator state; batch-composition independent) ------------------
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), exact in int64 (split c into 16-bit halves to avoid overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 integer hash (a bijection on 32-bit values with good avalanche)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed_B: Tensor, counter_B: Tensor, stream: int, n: int) -> Tensor:
    """U(0,1) float32 [B, n], a pure function of (seed, counter, stream, column)."""
    key = _mix32((seed_B ^ (stream * 0x9E3779B9 & _M32)) & _M32)
    key = _mix32(key ^ (counter_B & _M32))
    cols = torch.arange(n, device=seed_B.device, dtype=torch.int64)
    h = _mix32(_mix32(key[:, None] ^ cols[None, :]) ^ key[:, None])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed_B: Tensor, counter_B: Tensor, stream: int, n: int) -> Tensor:
    return -torch.log(-torch.log(uniform_noise(seed_B, counter_B, stream, n)))


def seed32(seed: int) -> int:
    """Fold any Python int seed into 32 bits (host side)."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32) ^ 0x5851F42D) & _M32


def process_logits(logits_BV: Tensor, temp_B: Tensor, topk_B: Tensor, topp_B: Tensor, filt: bool) -> Tensor:
    """Temperature-scaled, top-k/top-p-filtered logits (greedy rows are scaled by 1; callers take argmax)."""
    x = logits_BV / torch.where(temp_B > 0, temp_B, torch.ones_like(temp_B))[:, None]
    return filter_logits(x, topk_B, topp_B) if filt else x


def pick_tokens(logits_BV: Tensor, temp_B: Tensor, topk_B: Tensor, topp_B: Tensor, seed_B: Tensor,
                counter_B: Tensor, sample: bool, filt: bool) -> Tensor:
    """Greedy rows: argmax. Sampling rows: Gumbel-max over the processed logits (= a draw from their softmax)."""
    greedy = argmax(logits_BV)
    if not sample:
        return greedy
    x = process_logits(logits_BV, temp_B, topk_B, topp_B, filt)
    sampled = argmax(x + gumbel_noise(seed_B, counter_B, 0, x.shape[-1]))
    return torch.where(temp_B > 0, sampled, greedy)


def _routing_to_host(ids, num_experts: int) -> Tensor:
    """[routing record] Expert ids (a list of per-layer tensors or one stacked tensor) as one compact CPU tensor."""
    t = torch.stack(ids) if isinstance(ids, (list, tuple)) else ids
    return t.to(torch.int16 if num_experts <= 2**15 else torch.int32).cpu()


def token_logprobs(logits_BV: Tensor, tok_B: Tensor, top_n: int = 0) -> Tensor:
    """Log-prob of each chosen token; with top_n, [B, 1 + 2 top_n]: it, the top_n log-probs, their ids (exact in
    fp32 below 2^24), packed so one host copy carries them."""
    lp = logits_BV.gather(-1, tok_B[..., None])[..., 0] - torch.logsumexp(logits_BV, -1)
    if not top_n:
        return lp
    vals, ids = logits_BV.log_softmax(-1).topk(top_n, dim=-1)
    return torch.cat([lp[..., None], vals, ids.to(vals.dtype)], dim=-1)


# ---- cache views ---------------------------------------------------------------------------------------
class CacheView:
    """KVCache-compatible view of the first n rows and first S positions of a full cache (no copy)."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, pos_BT: Tensor, k_BKTd: Tensor, v_BKTd: Tensor) -> tuple[Tensor, Tensor]:
        return write_kv(self.k, self.v, pos_BT, k_BKTd, v_BKTd)


class SlotCaches:
    """Per-layer K/V for max_batch slots; hands out stable views so a compiled step sees the same objects."""

    def __init__(self, caches: list, max_len: int):
        self.caches, self.max_len = caches, max_len
        self._views: dict[tuple[int, int], list[CacheView]] = {}

    def view(self, n: int, S: int) -> list[CacheView]:
        key = (n, S)
        if key not in self._views:
            self._views[key] = [CacheView(c.k[:n, :, :S], c.v[:n, :, :S]) for c in self.caches]
            for view in self._views[key]:  # the length varies: a compiled step needs no graph static in it
                torch._dynamo.maybe_mark_dynamic(view.k, 2)
                torch._dynamo.maybe_mark_dynamic(view.v, 2)
        return self._views[key]

    def write_rows(self, slots: Tensor, tmp_caches: list, rows: Tensor | slice = slice(None)) -> None:
        """Copy rows `rows` of freshly prefilled temporary caches [m, K, T, d] into the given slots (positions past
        the cache are padding)."""
        for full, tmp in zip(self.caches, tmp_caches):
            T = min(tmp.k.shape[2], full.k.shape[2])
            full.k[slots, :, :T] = tmp.k[rows, :, :T]
            full.v[slots, :, :T] = tmp.v[rows, :, :T]

    def swap_rows(self, i: int, j: int, used: int) -> None:
        """Exchange positions [0, used) of slots i and j (the engine keeping live rows dense)."""
        rows = torch.tensor([i, j], device=self.caches[0].k.device)
        for c in self.caches:
            for t in (c.k, c.v):
                t[rows, :, :used] = t[rows.flip(0), :, :used]

    def read_range(self, slot: int, lo: int, hi: int, tmp_caches: list, row: int) -> None:
        """Positions [lo, hi) of a slot's K/V into row `row` of temporary caches (prefix reuse)."""
        for full, tmp in zip(self.caches, tmp_caches):
            tmp.k[row, :, lo:hi] = full.k[slot, :, lo:hi]
            tmp.v[row, :, lo:hi] = full.v[slot, :, lo:hi]


def prompt_chunks(pos_BT: Tensor, caches: list, max_tokens: int) -> Iterator[tuple[slice, list]]:
    """(columns, cache views) for each forward of a prefill done in chunks of at most `max_tokens` tokens (rows x
    columns). A 128K-token prompt in one forward would need a [T, S] mask of 16 G entries and every layer's
    activations for all of it. Each chunk's views end at its last position, so its mask spans only the cache it
    can see. The chunks write their K/V in order, and later chunks read them back."""
    B, T = pos_BT.shape
    C = max(1, max_tokens // B)
    if C >= T:
        yield slice(None), caches
        return
    for c0 in range(0, T, C):
        cols = slice(c0, min(c0 + C, T))
        S = int(pos_BT[:, cols].max()) + 1
        yield cols, [CacheView(c.k[:, :, :S], c.v[:, :, :S]) for c in caches]


def concat_outputs(outs: list[ModelOutput]) -> ModelOutput:
    """One ModelOutput for prompt chunks run one after another (hidden states, kept layers, routing)."""
    if len(outs) == 1:
        return outs[0]
    cat = lambda ts: torch.cat(ts, dim=1)  # noqa: E731
    B = outs[0].hidden.shape[0]
    flat = lambda ts: cat([t.view(B, -1, t.shape[-1]) for t in ts]).view(-1, ts[0].shape[-1])  # noqa: E731
    router = [RouterInfo(cat([r.idx_Tk for r in rs]), sum(r.counts_E for r in rs), flat([r.logits_TE for r in rs]),
                         flat([r.scores_TE for r in rs])) for rs in zip(*(o.router for o in outs))]
    return ModelOutput(None, cat([o.hidden for o in outs]), router=router,
                       layer_hidden=[cat(hs) for hs in zip(*(o.layer_hidden for o in outs))])


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (binary search over C-speed slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # a[:lo] == b[:lo]; the answer is < hi + 1
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prefill_groups(lengths: list[int], dests: list[int], reuse: list[tuple[int, int]]) -> list[list[int]]:
    """Rows of one admission split into prefill forwards of similar length (each row at least half the longest in
    its forward): right padding is compute spent on nothing (32 chat prompts of 42-200 tokens: 3.4x their tokens
    in one forward). One forward when a row's prefix source is another row's destination: it must be read before
    it is overwritten."""
    if any(r and src != dest and src in dests for dest, (src, r) in zip(dests, reuse)):
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and 2 * lengths[i] >= lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def round_up(n: int, limit: int, quantum: int = 64) -> int:
    """n rounded up to a multiple of quantum, capped at limit. (Not a power of two: attention cost follows the
    length, and a compiled step makes the length a dynamic dimension after its second distinct value.)"""
    return min(limit, -(-n // quantum) * quantum)


def compile_step(fn, device: torch.device, freeze: bool = False):
    """torch.compile for a decode step or a speculative round. Rows and cache length go dynamic; one graph per
    combination of sampling flags, so the recompile limit allows them all.

    On CPU two more settings, both measured in same-session A/B runs:
    - one-row matmuls (batch-1 decode) become fused multiply-reduce kernels, with inductor's 2048 size cap lifted so
      that every projection and the lm_head qualify. In bf16 that streams weights at 2.2x the rate of the library
      GEMV (base-100m bf16 batch-1 decode 165 -> 205 tok/s in bench_decode.py); fp32 is unchanged.
    - the wrapper that runs the graph's kernels is C++ (`cpp_wrapper`), not Python. A decode step launches ~100
      kernels and allocations, and the Python wrapper cost 1-1.5 ms of a 6 ms base-100m bf16 batch-1 step
      (6.0 -> 4.5 ms; small fp32 batch 1 0.96 -> 0.81 ms). A cold compile takes ~10% longer.
    freeze: use the model's packed weights (infer/cpu_pack.py), which inductor takes only as constants. The graphs
    then inline the parameters by reference (no copy; in-place updates stay visible), and the engine re-packs
    stale copies, which changes their identity and so recompiles. Inductor's freezing assumes the parameters come
    first among a graph's inputs, which fails when inputs alias one another (aot_autograd rewrites them): a frozen
    graph must take no view of a tensor it also takes (speculative.SpecState slices its state inside the graph).

    Compiled kernels are cached in cache_root()/inductor unless $TORCHINDUCTOR_CACHE_DIR says otherwise: torch's
    default lies in /tmp, which a reboot empties, and a restarted server then compiles from scratch (`small` on one
    AVX2 core: 61 s cold, 7 s from the cache; benchmarks/bench_compile.py)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if device.type != "cpu":
        return torch.compile(fn, dynamic=None)
    import torch._inductor.config as inductor_config

    opts = inductor_config.post_grad_fusion_options
    opts.setdefault("decompose_mm_pass", {"cpu_max_other_dimension_decomposition": 1 << 30})
    mod = sys.modules.get("torch._inductor.fx_passes.decompose_mem_bound_mm")
    if mod is not None:  # imported by an earlier compile: it read the cap at import
        mod.cpu_max_other_dimension_decomposition = max(mod.cpu_max_other_dimension_decomposition, 1 << 30)
    compiled = torch.compile(fn, dynamic=None, options={"cpp_wrapper": True})
    if not freeze:
        return compiled

    def run(*args, **kwargs):
        # read while dynamo traces, so not from torch.compile's options. No prepacking by inductor: its passes
        # expect weights that it packed itself, and would keep a packed copy per graph.
        with inductor_config.patch({"freezing": True, "cpp.weight_prepack": False}):
            return compiled(*args, **kwargs)
    return run


# ---- per-slot host state -------------------------------------------------------------------------------
@dataclass
class _PrefillJob:
    """A prefill of more than one chunk, run a chunk per engine step so that the live rows keep decoding between
    them (one long prompt must not pause every other stream)."""
    chunks: Iterator[bool]  # Engine._prefill: True after each chunk that has more to follow
    handles: list[RequestHandle]
    slots: set[int]  # its destination and prefix-source slots: no admission or compaction touches them meanwhile


@dataclass
class _Slot:
    handle: RequestHandle
    prompt_len: int
    max_new: int  # min(max_tokens, context room)
    limit_by_context: bool
    stop_ids: frozenset
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str = ""  # decoded generated text (without stop ids)
    emitted_chars: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routing: list[list[Tensor]] | None = None  # [routing record] per MoE layer, chunks of [t, k] ids (host)
    cached: int = 0  # prompt tokens reused from the slot's cache
    draft_fed: int = 0  # [spec] leading tokens whose drafter cache entries are final (see SpecState.round)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


# ---- the engine ----------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model: Transformer, tokenizer: TokenizerLike | None = None, max_batch: int = 16,
                 max_seq_len: int | None = None, stop_ids: list[int] | None = None, max_queue: int = 1024,
                 compile: bool = False, draft=None, spec_tokens: int = 3, max_prefill_tokens: int | None = None,
                 prefix_reuse: bool = True):
        """draft: a speculative.DraftModel (e.g. MTPDrafter(model)); spec_tokens: tokens drafted per round;
        max_prefill_tokens: prompt tokens admitted together, and the most one prefill forward computes (default
        8192; a longer prompt runs in chunks, each attending the cache the earlier ones wrote);
        prefix_reuse: prefill only what a free slot's cache does not already hold (with a draft, the drafter takes
        its own cached entries for that prefix too)."""
        self.model = model.eval()
        self.cfg = model.config
        self.packed_bytes = cpu_pack.pack_(model)  # bf16 on CPU: the weights oneDNN multiplies, packed once
        if self.packed_bytes:
            log.info("packed %.0f MB of bf16 weights for oneDNN (a second copy; angelmed/infer/cpu_pack.py)",
                     self.packed_bytes / 1e6)
        self._weights = [*model.parameters(), *model.buffers()]
        self._weights_seen = signature(self._weights)
        if self._weights[0].device.type == "cpu" and self._weights[0].dtype == torch.float32:
            if cpu_kernels.enable():  # fp32 few-row products: built (or found) before any graph decides its path
                for net in (model, getattr(draft, "model", None), getattr(draft, "draft", None)):  # EAGLE: .draft
                    if isinstance(net, nn.Module):
                        cpu_kernels.use_for_linears_(net)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = int(max_seq_len or self.cfg.max_position_embeddings)
        if stop_ids is None:
            stop_ids = list(getattr(tokenizer, "stop_ids", None) or [])
        self.default_stop_ids = list(stop_ids)
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens or 8192
        self.draft = draft
        self.spec_tokens = int(spec_tokens) if draft is not None else 0
        # speculative rounds write up to spec_tokens+1 positions past a row's frontier (rejected tail, padding)
        self._cache_len = self.max_seq_len + 2 * (self.spec_tokens + 1)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.vocab_size = self.cfg.vocab_size
        self.kv = SlotCaches(model.make_caches(max_batch, self._cache_len), self._cache_len)
        if draft is not None:
            draft.allocate(max_batch, self._cache_len)
        dev, B = self.device, max_batch
        self.tok_B = torch.zeros(B, dtype=torch.long, device=dev)  # latest token, not yet in the cache
        self.pos_B = torch.zeros(B, dtype=torch.long, device=dev)  # where tok_B will be written
        self.active_B = torch.zeros(B, dtype=torch.long, device=dev)
        self.temp_B = torch.zeros(B, device=dev)
        self.topk_B = torch.zeros(B, dtype=torch.long, device=dev)
        self.topp_B = torch.ones(B, device=dev)
        self.pen_B = torch.ones(B, device=dev)
        self.seed_B = torch.zeros(B, dtype=torch.long, device=dev)
        self.counter_B = torch.zeros(B, dtype=torch.long, device=dev)
        self.seen_BV = torch.zeros(B, self.vocab_size, dtype=torch.bool, device=dev)
        self.slots: list[_Slot | None] = [None] * B
        self.prefix_reuse = prefix_reuse
        # Reusing r cached prompt tokens still recomputes positions [0, head): free rows inside a step's batch
        # write there (decode: position 0; a speculative round: the target 0..k, the drafter up to 2k). With a
        # drafter the tail starts one early, at r-1: drafter position t takes the target's features at t.
        self._reuse_head = 1 if draft is None else 2 * (self.spec_tokens + 1)
        self._reuse_back = 0 if draft is None else 1
        self.cached_ids: list[list[int]] = [[] for _ in range(B)]  # tokens whose K/V a free slot holds
        self.cached_salt: list[str | None] = [None] * B  # the cache_salt of the request that left them
        self._freed_at = [0] * B  # engine step at which each slot was last freed (least recently used goes first)
        self._pending: deque[RequestHandle] = deque()
        self._jobs: list[_PrefillJob] = []
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()
        self._step_lock = threading.Lock()
        self.metrics = EngineMetrics(max_batch=max_batch)
        self.compile = compile
        self._decode_compiled = None
        if compile:
            self._decode_compiled = compile_step(self._decode_fn, self.device, freeze=self.packed_bytes > 0)
        if draft is not None:
            from angelmed.infer.speculative import SpecState
            self.spec = SpecState(self)
        else:
            self.spec = None

    # ---- public API ------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, on_delta: Callable[[Delta], None] | None = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises ValueError (bad request), QueueFull, EngineClosed."""
        req.validate(self.vocab_size)
        if len(req.prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt_ids: prompt has {len(req.prompt_ids)} tokens; the context is "
                             f"{self.max_seq_len} tokens (at least one must be left to generate)")
        if req.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        if req.record_routing and self.spec is not None:  # [routing record]
            raise ValueError("record_routing: not supported with speculative decoding (draft model attached)")
        if req.top_logprobs and self.spec is not None:
            raise ValueError("top_logprobs: not supported with speculative decoding (draft model attached)")
        handle = RequestHandle(req, on_delta)
        with self._lock:
            if not self._accepting:
                raise EngineClosed("engine is shutting down and accepts no new requests")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting)")
            self._pending.append(handle)
            self.metrics.requests_submitted += 1
            self.metrics.queue_depth = len(self._pending)
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> None:
        """Stop a queued or running request (thread-safe); its slot is freed at the next step."""
        with self._lock:
            self._cancel.add(request_id)
        self._wake.set()

    def has_work(self) -> bool:
        return (bool(self._pending) or any(s is not None for s in self.slots) or bool(self._cancel)
                or bool(self._jobs))

    def generate(self, requests: list[GenerationRequest]) -> list[Result]:
        """Blocking batch generation (rollouts, eval). Runs the steps itself unless the runner thread is on."""
        for r in requests:  # all or nothing: a bad request must not leave the others queued
            r.validate(self.vocab_size)
        handles = [self.submit(r) for r in requests]
        if self.running:
            return [h.result() for h in handles]
        while not all(h.done() for h in handles):
            self.step()
        return [h.result() for h in handles]

    def warm_up(self, **sampling) -> float:
        """Compile before traffic arrives (compile=True), every graph a step of up to max_batch rows can need
        (`graph_rows`), so that no user's request waits for a compile. `sampling`: GenerationRequest settings to
        compile for (default greedy; each combination of greedy / sampling / top-k-top-p / penalty is its own
        graph). Returns the seconds it took."""
        t = time.perf_counter()
        n = max(1, min(60, self.max_seq_len - 12))
        for rows in self.graph_rows():
            self.generate([GenerationRequest([0] * n, max_tokens=8, stop_ids=[], seed=0, **sampling)
                           for _ in range(rows)])
        return time.perf_counter() - t

    def graph_rows(self) -> list[int]:
        """Row counts whose compiled step is a graph of its own: 1 (one-row matmuls compile to GEMVs), 2 (the
        rows become a dynamic size), and each count at which some MoE layer of the model or the drafter takes
        another path (model.Experts.path), or linear layers stop running the few-rows kernel
        (model.rows_linear_pays; a speculative round passes rows x (spec_tokens + 1) tokens through the
        target and rows tokens through the drafter's steps). Without this, a server compiled for 1-2 rows stalled
        for a compile (about 30 s on `small`, one AVX2 core) at the first batch past 4 rows."""
        nets = {self.model, getattr(self.draft, "model", None)}  # a set: an MTP drafter's model is the target
        experts = [m for net in nets if isinstance(net, nn.Module) for m in net.modules() if isinstance(m, Experts)]
        k = self.cfg.num_experts_per_tok
        per_row = (1,) if self.spec is None else (1, self.spec_tokens + 1)
        fp32_cpu_kernel = (model_module.CPU_ROWS_LINEAR is not None and self.device.type == "cpu"
                           and self.dtype == torch.float32)
        limits = (model_module.CPU_ROWS_LINEAR_ROWS, model_module.CPU_ROWS_HEAD_ROWS) if fp32_cpu_kernel else ()

        def paths(rows: int) -> tuple:
            linear = [rows * t <= n for t in per_row for n in limits]
            return (*linear, *(m.path(rows * t, k, self.device, compiled=True) for m in experts for t in per_row))

        return [n for n in range(1, self.max_batch + 1) if n <= 2 or paths(n) != paths(n - 1)]

    def stream_sync(self, req: GenerationRequest) -> Iterator[Delta]:
        """Deltas of one request, blocking. Drives the engine itself unless the runner thread is on."""
        q: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        handle = self.submit(req, q.put)
        try:
            while True:
                if not self.running:
                    while q.empty() and not handle.done():
                        self.step()
                d = q.get()
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            if not handle.done():
                self.cancel(req.request_id)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """Async deltas of one request (server). Needs the runner thread (`start()`). Closing the iterator
        early (client gone) cancels the request and frees its slot."""
        if not self.running:
            raise EngineError("engine runner is not started (call engine.start())")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Delta] = asyncio.Queue()

        def push(d: Delta) -> None:
            loop.call_soon_threadsafe(q.put_nowait, d)

        handle = self.submit(req, push)
        try:
            while True:
                d = await q.get()
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            if not handle.done():
                self.cancel(req.request_id)

    # ---- runner thread ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        if not self.running:
            self._stop_thread.clear()
            self._thread = threading.Thread(target=self._run, name="angelmed-engine", daemon=True)
            self._thread.start()
        return self

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with drain, let queued and running requests finish first; then stop the thread."""
        self.stop_accepting()
        if not drain:
            with self._lock:
                ids = [h.request_id for h in self._pending] + [s.request.request_id for s in self.slots if s]
                ids += [h.request_id for job in self._jobs for h in job.handles]
            for rid in ids:
                self.cancel(rid)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running and self.has_work() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        self._stop_thread.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop_thread.is_set():
            if not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, why: str) -> None:
        self.cached_ids = [[] for _ in self.slots]  # a failed step may have half-written any slot
        for i, s in enumerate(self.slots):
            if s is not None:
                s.finish_reason = "error"
                self._finish(i, error=why)
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        pending += [h for job in self._jobs for h in job.handles]
        self._jobs = []
        for h in pending:
            self.metrics.requests_failed += 1
            h._emit(Delta(h.request_id, [], "", finish_reason="error", error=why))
            h._finish(Result(h.request_id, list(h.request.prompt_ids), [], None, "error", error=why))

    # ---- one scheduler step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        with self._step_lock:
            self._advance_prefills()
            self._apply_cancellations()  # after: a request cancelled while it prefilled holds its slot by now
            self._admit()
            self._compact()
            if any(s is not None for s in self.slots):
                if self.spec is not None:
                    self.spec.round()
                else:
                    self._decode_step()
            self.metrics.steps += 1
            self.metrics.active_slots = sum(s is not None for s in self.slots)
            self.metrics.queue_depth = len(self._pending)

    def _apply_cancellations(self) -> None:
        with self._lock:
            if not self._cancel:
                return
            cancel, self._cancel = self._cancel, set()
            # a request still prefilling is cancelled in the step its prefill ends (it holds its slot then)
            self._cancel = cancel & {h.request_id for job in self._jobs for h in job.handles}
            keep = deque()
            for h in self._pending:
                if h.request_id in cancel:
                    self.metrics.requests_cancelled += 1
                    h._emit(Delta(h.request_id, [], "", finish_reason="cancelled"))
                    h._finish(Result(h.request_id, list(h.request.prompt_ids), [], None, "cancelled"))
                else:
                    keep.append(h)
            self._pending = keep
        for i, s in enumerate(self.slots):
            if s is not None and s.request.request_id in cancel:
                s.finish_reason = "cancelled"
                self._finish(i)

    @property
    def _reserved(self) -> set[int]:
        """The slots of the prefill jobs in progress."""
        return {slot for job in self._jobs for slot in job.slots}

    def _advance_prefills(self) -> None:
        for job in list(self._jobs):
            if not next(job.chunks, False):  # its last chunk ran: the rows are live
                self._jobs.remove(job)

    def _admit(self) -> None:
        reserved = self._reserved
        free = [i for i, s in enumerate(self.slots) if s is None and i not in reserved]
        if not free or not self._pending:
            return
        if signature(self._weights) != self._weights_seen:  # loaded in place: a GRPO sync, an optimizer step
            self.cached_ids = [[] for _ in self.slots]  # K/V cached from the old weights
            self.packed_bytes = cpu_pack.pack_(self.model)  # new identities: compiled graphs recompile
            self._weights_seen = signature(self._weights)
        batch: list[tuple[int, RequestHandle]] = []
        reuse: list[tuple[int, int]] = []  # per admitted request: (source slot, prompt tokens its cache holds)
        budget = self.max_prefill_tokens
        live = [i for i, s in enumerate(self.slots) if s is not None]
        with self._lock:
            # rows the next decode steps will cover anyway: an empty slot inside them costs nothing
            covered = max(max(live, default=-1) + 1, len(live) + min(len(self._pending), len(free)))
            while self._pending and free:
                slot, src, r = self._pick_slot(free, self._pending[0].request, covered)
                n = len(self._pending[0].request.prompt_ids) - r
                if batch and n > budget:
                    break
                budget -= n
                free.remove(slot)
                batch.append((slot, self._pending.popleft()))
                reuse.append((src, r))
        for group in prefill_groups([len(h.request.prompt_ids) - r for (_, h), (_, r) in zip(batch, reuse)],
                                    [slot for slot, _ in batch], reuse):
            rows, sources = [batch[i] for i in group], [reuse[i] for i in group]
            chunks = self._prefill(rows, sources)
            if next(chunks, False):  # more chunks to go: one per step from now on
                self._jobs.append(_PrefillJob(chunks, [h for _, h in rows],
                                              {slot for slot, _ in rows} | {src for src, r in sources if r}))

    def _pick_slot(self, free: list[int], req: GenerationRequest, covered: int) -> tuple[int, int, int]:
        """(slot, source slot, prompt tokens whose K/V the source holds). The source is the free slot sharing the
        longest prompt prefix (2+ tokens). The slot is the source when it lies among the rows decode steps cover;
        else (a slot past them would make every decode step run more rows) the prefix is copied into one that does:
        an empty one first, then the one freed longest ago."""
        src, n = -1, 0
        if self.prefix_reuse and not req.record_routing:  # [routing record] needs every prompt token processed
            n, neg = max((common_prefix_len(self.cached_ids[i], req.prompt_ids)
                          if self.cached_salt[i] == req.cache_salt else 0, -i) for i in free)
            src, n = -neg, min(n, len(req.prompt_ids) - 1)  # the last prompt token always runs: it is sampled
            if n - self._reuse_back <= self._reuse_head:  # nothing left to copy
                src, n = -1, 0
        inside = [i for i in free if i < covered]
        if 0 <= src < covered or not inside:
            return (src if src >= 0 else free[0]), src, n
        return min(inside, key=lambda i: (bool(self.cached_ids[i]), self._freed_at[i], i)), src, n

    def _compact(self) -> None:
        """Keep the live rows at the front. A step computes rows [0, n), n = the highest live slot + 1, and a free
        row among them costs as much as a live one (32 slots of mixed reply lengths: a third of the rows computed
        were free). The highest live rows trade places with the free ones below them; a free slot's cached prefix
        moves along, so prefix reuse loses nothing."""
        live = [i for i, s in enumerate(self.slots) if s is not None]
        reserved = self._reserved
        holes = [j for j in range(len(live)) if self.slots[j] is None and j not in reserved]
        for j, i in zip(holes, reversed(live)):  # as many live rows past len(live) as holes before it
            self._swap_slots(i, j)

    def _swap_slots(self, i: int, j: int) -> None:
        """Exchange slots i (live) and j (free): the K/V each holds (target and drafter), the per-row state on
        device and the host bookkeeping."""
        s = self.slots[i]
        used = max(s.prompt_len + len(s.generated) + 2 * (self.spec_tokens + 1), len(self.cached_ids[j]) + 1)
        for kv in (self.kv, self.draft.kv) if self.draft is not None else (self.kv,):
            kv.swap_rows(i, j, used)
        rows = torch.tensor([i, j], device=self.device)
        for t in self._row_tensors():
            t[rows] = t[rows.flip(0)]
        for per_slot in (self.slots, self.cached_ids, self.cached_salt, self._freed_at):
            per_slot[i], per_slot[j] = per_slot[j], per_slot[i]

    def _row_tensors(self) -> list[Tensor]:
        """Every per-slot tensor indexed by row (the decode state, sampling settings, the drafter's context)."""
        rows = [self.tok_B, self.pos_B, self.active_B, self.temp_B, self.topk_B, self.topp_B, self.pen_B, self.seed_B,
                self.counter_B, self.seen_BV]
        if self.spec is not None:
            rows += [self.spec.ids_BL, self.spec.hidden_BLD, self.spec.len_B]
        return rows

    def _set_slot_params(self, slots: list[int], reqs: list[GenerationRequest]) -> Tensor:
        dev = self.device
        idx = torch.tensor(slots, device=dev)
        self.temp_B[idx] = torch.tensor([float(r.temperature) for r in reqs], device=dev)
        self.topk_B[idx] = torch.tensor([int(r.top_k) for r in reqs], device=dev)
        self.topp_B[idx] = torch.tensor([float(r.top_p) for r in reqs], device=dev)
        self.pen_B[idx] = torch.tensor([float(r.repetition_penalty) for r in reqs], device=dev)
        seeds = [seed32(r.seed if r.seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "little"))
                 for r in reqs]
        self.seed_B[idx] = torch.tensor(seeds, device=dev)
        self.counter_B[idx] = 0
        self.seen_BV[idx] = False
        for row, r in zip(slots, reqs):
            self.seen_BV[row, torch.tensor(r.prompt_ids, device=dev)] = True
        return idx

    def _prefill(self, batch: list[tuple[int, RequestHandle]], reuse_from: list[tuple[int, int]]) -> Iterator[bool]:
        """Prefill the admitted rows (a generator: it yields True between prompt chunks, see `_PrefillJob`)."""
        slots = [i for i, _ in batch]
        reuse = [r for _, r in reuse_from]
        reqs = [h.request for _, h in batch]
        lens = [len(r.prompt_ids) for r in reqs]
        dev = self.device
        for slot in slots:  # from here on these slots' old K/V are being overwritten (sources are read first)
            self.cached_ids[slot] = []
        # Identical rows (a GRPO group, several samples of one prompt) are computed once: row j is unique row
        # uniq_of[j], first seen at row uniq[uniq_of[j]]. Each row still samples with its own settings and seed.
        first: dict[tuple, int] = {}
        uniq_of = [first.setdefault((tuple(r.prompt_ids), u), len(first)) for r, u in zip(reqs, reuse)]
        uniq = [uniq_of.index(u) for u in range(len(first))]
        # positions each row computes: all of its prompt, or with reuse r the head and the tail (the rest is cached)
        head, back = self._reuse_head, self._reuse_back
        run = [[*range(head), *range(reuse[j] - back, lens[j])] if reuse[j] else list(range(lens[j])) for j in uniq]
        T = max(map(len, run))
        ids = torch.zeros(len(uniq), T, dtype=torch.long)
        pos = torch.zeros(len(uniq), T, dtype=torch.long)
        for u, (j, p) in enumerate(zip(uniq, run)):
            ids[u, :len(p)] = torch.tensor([reqs[j].prompt_ids[i] for i in p])
            # right padding is harmless: pad positions lie past the row's frontier and are overwritten before use
            pos[u] = torch.tensor(p + list(range(lens[j], lens[j] + T - len(p))))
        ids, pos = ids.to(dev), pos.to(dev)
        S = max(lens[j] + T - len(p) for j, p in zip(uniq, run))
        # One distinct prompt is prefilled straight into its (first) slot's cache: a long prompt's K/V is not held
        # twice. Several go through temporary caches (slots are scattered rows, and may be each other's sources).
        home = slots[uniq[0]] if len(uniq) == 1 else None
        tmp = (self.model.make_caches(len(uniq), S) if home is None else
               [CacheView(c.k[home:home + 1, :, :S], c.v[home:home + 1, :, :S]) for c in self.kv.caches])
        for u, j in enumerate(uniq):
            if reuse[j] and reuse_from[j][0] != home:
                self.kv.read_range(reuse_from[j][0], head, reuse[j] - back, tmp, u)
        # [spec hook] an EAGLE-3 drafter reads intermediate target layers
        keep = self.spec.feature_layers if self.spec is not None else ()
        record = any(r.record_routing for r in reqs)
        outs = []
        for cols, views in prompt_chunks(pos, tmp, self.max_prefill_tokens):
            o = self.model(ids[:, cols], pos_BT=pos[:, cols], caches=views, compute_logits=False, keep_layers=keep)
            # router scores per layer are only read for a routing record: a long prompt's would add up to GBs
            outs.append(o if record else replace(o, router=[]))
            if cols.stop is not None and cols.stop < pos.shape[1]:  # the live rows decode a step before the next
                # that step also runs this idle row, which writes the first positions of its cache row (decode: 0,
                # a speculative round: 0..k): keep what the chunks wrote there
                held = [] if home is None else [(c.k[home, :, :head].clone(), c.v[home, :, :head].clone())
                                                for c in self.kv.caches]
                yield True
                for c, (k0, v0) in zip(self.kv.caches, held):
                    c.k[home, :, :head], c.v[home, :, :head] = k0, v0
        out = concat_outputs(outs)
        uniq_t = torch.tensor(uniq_of, device=dev)
        last = torch.tensor([len(p) - 1 for p in run], device=dev)
        # only each row's last position is sampled: skip the lm_head (and a [m,T,V] fp32 tensor) elsewhere
        logits = last_logits = self.model.logits_from_hidden(out.hidden[uniq_t, last[uniq_t]])
        idx = self._set_slot_params(slots, reqs)
        copy_to = [i for i, slot in enumerate(slots) if slot != home]
        if copy_to:
            self.kv.write_rows(idx[copy_to], tmp, uniq_t[copy_to])
        if any(r.repetition_penalty != 1 for r in reqs):
            logits = apply_repetition_penalty(logits, self.seen_BV[idx], self.pen_B[idx])
        sample = any(r.temperature > 0 for r in reqs)
        filt = sample and any(r.top_k > 0 or r.top_p < 1 for r in reqs)
        tok = pick_tokens(logits, self.temp_B[idx], self.topk_B[idx], self.topp_B[idx], self.seed_B[idx],
                          self.counter_B[idx], sample, filt)
        if self.spec is not None:  # [spec hook] the drafter's entries: next prompt token and features per position
            nxt = torch.zeros_like(ids, device="cpu")
            for u, (j, p) in enumerate(zip(uniq, run)):
                nxt[u, :len(p) - 1] = torch.tensor([reqs[j].prompt_ids[i + 1] for i in p[:-1]], dtype=torch.long)
            copies = [(j, reuse_from[j][0], head, reuse[j] - back) for j in range(len(reqs)) if reuse[j]]
            self.spec.absorb_prompt(idx, ids[uniq_t], nxt.to(dev)[uniq_t], self.spec.features(out)[uniq_t],
                                    pos[uniq_t], last[uniq_t], tok, copies)
        self.tok_B[idx] = tok
        self.pos_B[idx] = torch.tensor(lens, device=dev)
        self.active_B[idx] = 1
        self.counter_B[idx] += 1
        self.seen_BV[idx, tok] = True
        want_lp = any(r.logprobs for r in reqs)
        top_n = max(r.top_logprobs for r in reqs)
        host = self._to_host(tok, token_logprobs(last_logits, tok, top_n) if want_lp else None, top_n)
        for j, (slot, h) in enumerate(batch):
            r = h.request
            room = self.max_seq_len - lens[j]
            stop_ids = frozenset(r.stop_ids if r.stop_ids is not None else self.default_stop_ids)
            self.slots[slot] = _Slot(h, lens[j], min(r.max_tokens, room), room < r.max_tokens, stop_ids,
                                     logprobs=[] if r.logprobs else None,
                                     top_logprobs=[] if r.top_logprobs else None,
                                     cached=max(reuse[j] - back - head, 0), draft_fed=lens[j])
            self.metrics.prompt_tokens += lens[j]
            self.metrics.prompt_tokens_cached += self.slots[slot].cached
        if record:  # [routing record] the prompt tokens
            ids_LmTk = _routing_to_host(out.routing, self.cfg.num_experts) if out.router else None
            for j, (slot, h) in enumerate(batch):
                if h.request.record_routing:
                    self.slots[slot].routing = [[ids_LmTk[layer, uniq_of[j], :lens[j]]]
                                                for layer in range(len(out.router))]
        self._accept_tokens({slot: [host[0][j]] for j, slot in enumerate(slots)},
                            {slot: [host[1][j]] for j, slot in enumerate(slots)} if want_lp else None,
                            {slot: [host[2][j]] for j, slot in enumerate(slots)} if top_n else None)

    def _flags(self, n: int) -> tuple[bool, bool, bool, bool]:
        live = [s.request for s in self.slots[:n] if s is not None]
        sample = any(r.temperature > 0 for r in live)
        filt = sample and any(r.top_k > 0 or r.top_p < 1 for r in live)
        penalty = any(r.repetition_penalty != 1 for r in live)
        want_lp = any(r.logprobs for r in live)
        return sample, filt, penalty, want_lp

    def active_prefix(self) -> int:
        """Rows a step computes: up to the highest live slot (dense after `_compact`)."""
        return max(i for i, s in enumerate(self.slots) if s is not None) + 1

    def attn_len(self, n: int, extra: int = 1) -> int:
        """Cache positions the next step can touch (rows up to n), rounded up to limit distinct shapes."""
        longest = max(s.prompt_len + len(s.generated) for s in self.slots[:n] if s is not None)
        return round_up(longest + extra, self._cache_len)

    def _decode_fn(self, caches: list[CacheView], n: int, sample: bool, filt: bool, penalty: bool, want_lp: bool,
                   record: bool = False, top_n: int = 0):
        """One token for slots [0, n): the model forward, penalties, sampling and state updates, on device.
        record: also return the expert ids of the token each slot processed ([routing record], [L, n, k])."""
        tok, pos, active = self.tok_B[:n], self.pos_B[:n], self.active_B[:n]
        out = self.model(tok[:, None], pos_BT=pos[:, None], caches=caches)
        logits = out.logits[:, 0]
        route_LBk = torch.stack([r[:, 0] for r in out.routing]) if record and out.router else None
        raw = logits
        if penalty:
            logits = apply_repetition_penalty(logits, self.seen_BV[:n], self.pen_B[:n])
        nxt = pick_tokens(logits, self.temp_B[:n], self.topk_B[:n], self.topp_B[:n], self.seed_B[:n],
                          self.counter_B[:n], sample, filt)
        lp = token_logprobs(raw, nxt, top_n) if want_lp else None
        self.tok_B[:n] = nxt
        self.pos_B[:n] += active  # free rows stay at 0 (their writes land in an unused slot)
        self.counter_B[:n] += 1
        # index_put, not scatter_: inductor's CPU code for a bool scatter_ copies the whole [B, V] mask twice
        # element by element (1.1 ms at 16 x 6,144, most of a compiled step's non-GEMM time)
        self.seen_BV[torch.arange(n, device=nxt.device), nxt] = True
        if record:
            return nxt, lp, route_LBk
        return nxt, lp

    def _decode_step(self) -> None:
        n = self.active_prefix()
        sample, filt, penalty, want_lp = self._flags(n)
        record = any(s is not None and s.routing is not None for s in self.slots[:n])  # [routing record]
        top_n = max((s.request.top_logprobs for s in self.slots[:n] if s is not None), default=0)
        caches = self.kv.view(n, self.attn_len(n))
        decode = self._decode_compiled or self._decode_fn
        if record:
            nxt, lp, route_LBk = decode(caches, n, sample, filt, penalty, want_lp, True, top_n)
            if route_LBk is not None:  # the token each slot processed was accepted at the previous step
                route_LBk = _routing_to_host(route_LBk, self.cfg.num_experts)
                for i, s in enumerate(self.slots[:n]):
                    if s is not None and s.routing is not None:
                        for layer, chunks in enumerate(s.routing):
                            chunks.append(route_LBk[layer, i:i + 1])
        else:
            nxt, lp = decode(caches, n, sample, filt, penalty, want_lp, False, top_n)
        tok, lps, tops = self._to_host(nxt, lp, top_n)
        live = [i for i in range(n) if self.slots[i] is not None]
        self._accept_tokens({i: [tok[i]] for i in live}, {i: [lps[i]] for i in live} if want_lp else None,
                            {i: [tops[i]] for i in live} if top_n else None)

    @staticmethod
    def _to_host(tok: Tensor, lp: Tensor | None, top_n: int = 0) -> tuple[list, list | None, list | None]:
        """The step's only device->host transfer: token ids (and log-probs, with the top_n alternatives as
        [(id, log-prob)] per row, packed into one float64 copy)."""
        if lp is None:
            return tok.tolist(), None, None
        rows = torch.cat([tok.double()[:, None], lp.double().reshape(len(tok), -1)], dim=1).cpu().tolist()
        tops = [list(zip(map(int, r[2 + top_n:]), r[2:2 + top_n])) for r in rows] if top_n else None
        return [int(r[0]) for r in rows], [r[1] for r in rows], tops

    # ---- host-side bookkeeping -------------------------------------------------------------------------
    def _accept_tokens(self, new: dict[int, list[int]], new_lp: dict[int, list[float]] | None,
                       new_top: dict[int, list] | None = None) -> None:
        """Append tokens per slot, apply stop rules, emit deltas, free finished slots."""
        for i, toks in new.items():
            s = self.slots[i]
            if s is None:
                continue
            added: list[int] = []
            added_lp: list[float] = []
            added_top: list = []
            for j, t in enumerate(toks):
                s.generated.append(t)
                added.append(t)
                if new_lp is not None and s.logprobs is not None:
                    s.logprobs.append(new_lp[i][j])
                    added_lp.append(new_lp[i][j])
                if new_top is not None and s.top_logprobs is not None:
                    top = new_top[i][j][:s.request.top_logprobs]  # the step computed the batch's largest n
                    s.top_logprobs.append(top)
                    added_top.append(top)
                self.metrics.tokens_generated += 1
                if t in s.stop_ids:
                    s.finish_reason, s.stop_reason = "stop", t
                    break
                if s.request.stop and self._check_stop_strings(s):
                    break
                if len(s.generated) >= s.max_new:
                    s.finish_reason = "length"
                    break
            self._emit_text(i, s, added, added_lp if s.logprobs is not None else None,
                            added_top if s.top_logprobs is not None else None)
            if s.finish_reason is not None:
                self._finish(i)

    def _decode_text(self, s: _Slot) -> str:
        ids = [t for t in s.generated if t not in s.stop_ids]
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return self.tokenizer.decode(ids)

    def _check_stop_strings(self, s: _Slot) -> bool:
        text = self._decode_text(s)
        start = max(0, s.emitted_chars - max(len(x) for x in s.request.stop))
        hits = [(text.find(x, start), x) for x in s.request.stop]
        hits = [(k, x) for k, x in hits if k >= 0]
        if not hits:
            return False
        k, x = min(hits)
        s.text = text[:k]
        s.finish_reason, s.stop_reason = "stop", x
        return True

    def _emit_text(self, i: int, s: _Slot, added: list[int], added_lp: list[float] | None,
                   added_top: list | None = None) -> None:
        text = ""
        if self.tokenizer is not None:
            if s.stop_reason is None or isinstance(s.stop_reason, int):
                s.text = self._decode_text(s)
            end = len(s.text)
            if s.finish_reason is None:
                # hold back an incomplete UTF-8 sequence and any tail that could start a stop string
                while end > s.emitted_chars and s.text[end - 1] == "\ufffd":
                    end -= 1
                for x in s.request.stop:
                    for k in range(min(len(x) - 1, end - s.emitted_chars), 0, -1):
                        if s.text[end - k:end] == x[:k]:
                            end -= k
                            break
            end = max(end, s.emitted_chars)
            text, s.emitted_chars = s.text[s.emitted_chars:end], end
        s.handle._emit(Delta(s.request.request_id, added, text, added_lp, s.finish_reason, top_logprobs=added_top,
                             cached_tokens=s.cached))

    def _finish(self, i: int, error: str | None = None) -> None:
        s = self.slots[i]
        assert s is not None
        self.slots[i] = None
        self.active_B[i] = 0
        self.pos_B[i] = 0  # a free slot's decode writes land on position 0 (recomputed when the slot is reused)
        self._freed_at[i] = self.metrics.steps
        if self.prefix_reuse and s.finish_reason != "error":  # every token but the last one was fed
            fed = s.draft_fed if self.draft is not None else self._cache_len  # [spec] and the drafter's entries
            self.cached_ids[i] = (list(s.request.prompt_ids) + s.generated[:-1])[:min(fed, self._cache_len)]
            self.cached_salt[i] = s.request.cache_salt
        if s.finish_reason == "cancelled":
            self.metrics.requests_cancelled += 1
            s.handle._emit(Delta(s.request.request_id, [], "", finish_reason="cancelled"))
        elif s.finish_reason == "error":
            self.metrics.requests_failed += 1
            s.handle._emit(Delta(s.request.request_id, [], "", finish_reason="error", error=error))
        else:
            self.metrics.requests_finished += 1
        text = s.text if self.tokenizer is not None else None
        routing = None if s.routing is None else [torch.cat(chunks) for chunks in s.routing]  # [routing record]
        s.handle._finish(Result(s.request.request_id, list(s.request.prompt_ids), list(s.generated), text,
                                s.finish_reason or "error", s.logprobs, s.stop_reason, error, routing,
                                s.top_logprobs, s.cached))

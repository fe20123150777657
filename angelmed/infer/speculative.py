"""Speculative decoding: a drafter proposes k tokens, the target verifies k+1 positions in one forward.

Round for each active slot (latest token x at position P, not yet in the target cache):
  1. the drafter catches up on the tokens verified last round (with the target's hidden states there) and
     chains k draft tokens d_1..d_k with their distributions q_1..q_k;
  2. the target runs [x, d_1..d_k] at positions P..P+k (cache rows written there; a rejected tail is simply
     overwritten later, since attention only covers positions <= the query's own);
  3. standard speculative sampling: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
     rejection draw from norm(max(0, p - q)); if all k pass, draw a bonus token from p_{k+1}. The emitted
     tokens are distributed exactly as plain sampling from p. Greedy rows are the special case p, q one-hot,
     so greedy output is identical to plain greedy decoding.

Drafters implement `DraftModel`; `MTPDrafter` uses the checkpoint's MTP layer (EAGLE/NEXTN style: the layer
takes the target's final hidden state at t and the embedding of token t+1, and predicts t+2; further drafts
feed the layer's own output hidden back in). `LMDrafter` is classic draft-model speculation with a small LM of
the same vocabulary. `Eagle3Drafter` runs a separately trained EAGLE-3-style draft (angelmed.draft): it is fed
the outputs of three target layers, which the target's own prefill and verify forwards return (a drafter asks for
them with a `feature_layers` attribute and turns them into its hidden input with `fuse`).

With `Engine(compile=True)` a whole round (drafts, verify forward, acceptance, state updates) runs as one compiled
graph (on CPU launched from C++; see `engine.compile_step`).

Shapes: B slots, L catch-up length, k drafts, V vocab, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from angelmed.infer.engine import (SlotCaches, compile_step, gumbel_noise, process_logits, prompt_chunks,
                                   token_logprobs, uniform_noise)
from angelmed.infer.sampling import apply_repetition_penalty, argmax
from angelmed.model import KVCache, Transformer, head_logits, rope_cos_sin


if TYPE_CHECKING:
    from angelmed.draft import DraftModel as Eagle3Model
    from angelmed.infer.engine import Engine


@dataclass
class ContextState:
    """What a drafter needs for one round, rows [0, n) of the engine's slots.

    ids_BL[:, j] is the token at position pos_BL[:, j] + 1 and hidden_BLD[:, j] the target's final hidden state
    at position pos_BL[:, j] (the state that predicted that token); only the first len_B[b] columns are valid.
    The last valid column is the newest token, whose successor the first draft predicts.
    """
    ids_BL: Tensor
    hidden_BLD: Tensor  # (or the drafter's fused features of the target layers it asked for)
    pos_BL: Tensor
    len_B: Tensor
    n: int
    caches: list  # the drafter's own cache views for this round (DraftModel.views)
    temp_B: Tensor
    topk_B: Tensor
    topp_B: Tensor
    seed_B: Tensor
    counter_B: Tensor
    sample: bool
    filt: bool
    seen_BV: Tensor | None = None  # repetition penalty (None: off)
    pen_B: Tensor | None = None


class DraftModel(Protocol):
    kv: SlotCaches  # its own KV cache slots (allocate makes them); the engine moves rows in them with its own

    def allocate(self, max_batch: int, max_len: int) -> None:
        """Make room for max_batch slots of max_len positions (own KV cache)."""

    def absorb(self, slots: Tensor, ids_BT: Tensor, next_BT: Tensor, hidden_BTD: Tensor, pos_BT: Tensor,
               copies: list[tuple[int, int, int, int]], max_tokens: int) -> None:
        """Take in new prompts for the given slots: the positions the target ran (pos_BT, right-padded past each
        row's end), their tokens, the prompt token after each, and the target's hidden states there. copies:
        (row, source slot, lo, hi): positions [lo, hi) the target took from that slot's cache (prefix reuse), which
        the drafter takes from its own. At most max_tokens tokens per forward (`engine.prompt_chunks`)."""

    def views(self, n: int, S: int) -> list:
        """Its cache views for a round over rows [0, n) that touches cache positions [0, S) (state.caches)."""

    def propose(self, state: ContextState, k: int) -> tuple[Tensor, Tensor | None]:
        """(draft tokens [n, k], their draft distributions q [n, k, V]) for rows [0, n). q may be None when
        state.sample is False: greedy rounds compare tokens only."""


def probs_from_logits(logits_BV: Tensor, temp_B: Tensor, topk_B: Tensor, topp_B: Tensor, filt: bool,
                      sample: bool) -> Tensor:
    """The distribution a row samples from: one-hot argmax for greedy rows, softmax of processed logits else."""
    greedy = F.one_hot(argmax(logits_BV), logits_BV.shape[-1]).to(logits_BV.dtype)
    if not sample:
        return greedy
    p = process_logits(logits_BV, temp_B, topk_B, topp_B, filt).softmax(-1)
    return torch.where((temp_B > 0)[:, None], p, greedy)


def draw(probs_BV: Tensor, seed_B: Tensor, counter_B: Tensor, stream: int) -> Tensor:
    """One token per row from probs (Gumbel-max; zero-probability tokens are never drawn)."""
    return argmax(probs_BV.log() + gumbel_noise(seed_B, counter_B, stream, probs_BV.shape[-1]))


def accept_drafts(p_BKV: Tensor, drafts_Bk: Tensor, q_BkV: Tensor, seed_B: Tensor, counter_B: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """Speculative sampling. p_BKV: target distributions at the k+1 verified positions; q: draft distributions.

    Returns (tokens [B, k+1]: the accepted drafts, then the corrected or bonus token at index a; columns past
    a are filler) and a [B] = number of accepted drafts.
    """
    B, K, V = p_BKV.shape
    k = K - 1
    rows = torch.arange(B, device=p_BKV.device)
    pd = p_BKV[:, :k].gather(-1, drafts_Bk[..., None])[..., 0]
    qd = q_BkV.gather(-1, drafts_Bk[..., None])[..., 0]
    u = uniform_noise(seed_B, counter_B, 1, k)
    ok = u * qd < pd  # u < p/q without dividing by a tiny q
    a = ok.long().cumprod(-1).sum(-1)
    q_ext = torch.cat([q_BkV, torch.zeros_like(p_BKV[:, :1])], dim=1)  # after k accepts: plain p (bonus)
    resid = (p_BKV[rows, a] - q_ext[rows, a]).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), p_BKV[rows, a])  # p == q: rounding only
    t = draw(resid, seed_B, counter_B, 2)
    out = torch.cat([drafts_Bk, torch.zeros_like(drafts_Bk[:, :1])], dim=1)
    out[rows, a] = t
    return out, a


def _seen_after_drafts(seen_BV: Tensor, drafts_Bk: Tensor) -> Tensor:
    """[B, k+1, V]: the context's token set before each verified position (drafts join one by one)."""
    B, k = drafts_Bk.shape
    hot = F.one_hot(drafts_Bk, seen_BV.shape[-1]).cumsum(1) > 0  # [B, k, V]
    return torch.cat([seen_BV[:, None], seen_BV[:, None] | hot], dim=1)


# ---- drafters ------------------------------------------------------------------------------------------------
def chain_drafts(st: "ContextState", k: int, rows: Tensor, next_logits) -> tuple[Tensor, Tensor]:
    """Draft k tokens one after another. next_logits(j, prev_BD) gives draft j's logits [n, V] (prev is None at
    j = 0); sampling settings, repetition penalty and seeded draws follow the target's, so verification is exact."""
    seen = st.seen_BV
    drafts, qs = [], []
    for j in range(k):
        logits = next_logits(j, drafts[-1] if drafts else None)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, st.pen_B)
        q = probs_from_logits(logits, st.temp_B, st.topk_B, st.topp_B, st.filt, st.sample)
        d = draw(q, st.seed_B, st.counter_B, 10 + j) if st.sample else argmax(logits)
        drafts.append(d)
        qs.append(q)
        if seen is not None:
            seen = seen.clone()
            seen[rows, d] = True
    return torch.stack(drafts, 1), torch.stack(qs, 1)


class HiddenStateDrafter:
    """Drafters fed the target's hidden states (MTP layer, EAGLE-3 draft): one own KV cache layer; position t
    sees (token t+1, target features at t). Each round catches up on the positions verified last round, then
    chains k drafts, the layer's own output standing in for the target features. Subclasses give `_cache`, `_run`,
    `_dtype` and the head: `head_W`, the rows of the frozen lm_head the drafter scores, and `vocab_map`, their
    target ids (None: the whole vocabulary; a frequent-token subset makes each draft step's head cheaper)."""

    kv: SlotCaches | None = None
    head_W: Tensor
    vocab_map: Tensor | None = None

    def allocate(self, max_batch: int, max_len: int) -> None:
        self.kv = SlotCaches([self._cache(max_batch, max_len)], max_len)

    def absorb(self, slots: Tensor, ids_BT: Tensor, next_BT: Tensor, hidden_BTD: Tensor, pos_BT: Tensor,
               copies: list[tuple[int, int, int, int]], max_tokens: int) -> None:
        # Position t takes (prompt token t+1, features at t). The last prompt position has no next token yet: its
        # entry here is filler, rewritten by the first propose (which sees the sampled token), like the padding.
        tmp = [self._cache(pos_BT.shape[0], int(pos_BT.max()) + 1)]
        for row, src, lo, hi in copies:
            self.kv.read_range(src, lo, hi, tmp, row)
        for cols, views in prompt_chunks(pos_BT, tmp, max_tokens):
            self._run(next_BT[:, cols], hidden_BTD[:, cols].to(self._dtype), pos_BT[:, cols], views)
        self.kv.write_rows(slots, tmp)

    def _head_input(self, o_BD: Tensor) -> Tensor:
        return o_BD

    def _full_logits(self, o_BD: Tensor) -> Tensor:
        sub = head_logits(self._head_input(o_BD), self.head_W)
        if self.vocab_map is None:
            return sub
        full = sub.new_full((sub.shape[0], self.model.config.vocab_size), float("-inf"))
        return full.index_copy_(1, self.vocab_map, sub)  # tokens outside the draft vocabulary: q = 0

    def views(self, n: int, S: int) -> list:
        return self.kv.view(n, S)

    def propose(self, st: ContextState, k: int) -> tuple[Tensor, Tensor | None]:
        caches = st.caches
        rows = torch.arange(st.n, device=st.ids_BL.device)
        h = self._run(st.ids_BL, st.hidden_BLD.to(self._dtype), st.pos_BL, caches)
        last = st.len_B - 1
        g_BD, pos_B = h[rows, last], st.pos_BL[rows, last]

        def advance(prev: Tensor) -> None:  # chain: the drafter's own output stands in for the target features
            nonlocal g_BD, pos_B
            pos_B = pos_B + 1
            g_BD = self._run(prev[:, None], g_BD[:, None], pos_B[:, None], caches)[:, 0]

        if not st.sample and st.seen_BV is None:  # greedy, no penalty: argmax over the draft vocabulary only
            drafts = []
            for _ in range(k):
                if drafts:
                    advance(drafts[-1])
                d = argmax(head_logits(self._head_input(g_BD), self.head_W))
                drafts.append(d if self.vocab_map is None else self.vocab_map[d])
            return torch.stack(drafts, 1), None

        def next_logits(j: int, prev: Tensor | None) -> Tensor:
            if prev is not None:
                advance(prev)
            return self._full_logits(g_BD)

        return chain_drafts(st, k, rows, next_logits)


class MTPDrafter(HiddenStateDrafter):
    """Drafts with MTP layer `depth` of `model` (the target itself, or a separately trained draft checkpoint of
    the same shape whose MTP layer was trained on the target's hidden states). Keeps its own KV cache.
    vocab_map: score only these target ids (sorted; e.g. a checkpoint's `mtp_draft_vocab.json`: `for_checkpoint`)."""

    def __init__(self, model: Transformer, depth: int = 0, vocab_map: Tensor | None = None):
        if model.config.num_nextn_predict_layers <= depth:
            raise ValueError(f"draft model has {model.config.num_nextn_predict_layers} MTP layer(s); "
                             f"depth {depth} needs at least {depth + 1}")
        self.model, self.depth = model, depth
        w = model.head_weight.detach()
        if vocab_map is not None:
            vocab_map = vocab_map.to(device=w.device, dtype=torch.long)
            if vocab_map.numel() == 0 or int(vocab_map.min()) < 0 or int(vocab_map.max()) >= w.shape[0]:
                raise ValueError(f"MTP draft vocabulary: expected target ids in [0, {w.shape[0]}), got "
                                 f"{vocab_map.numel()} ids")
            w = w[vocab_map].contiguous()  # frozen: gather the subset once
        self.head_W, self.vocab_map = w, vocab_map

    @classmethod
    def for_checkpoint(cls, model: Transformer, path, depth: int = 0) -> "MTPDrafter":
        """The drafter for checkpoint directory `path`, with the draft vocabulary `train draft --draft.kind mtp`
        saved beside the weights when there is one."""
        from angelmed.draft import read_mtp_draft_vocab

        return cls(model, depth, read_mtp_draft_vocab(path))

    def _cache(self, batch: int, max_len: int) -> KVCache:
        cfg, w = self.model.config, self.model.model.word_embeddings.weight
        return KVCache(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, w.dtype, w.device)

    def _run(self, ids_BT: Tensor, h_BTD: Tensor, pos_BT: Tensor, caches) -> Tensor:
        m = self.model
        rope = rope_cos_sin(m.inv_freq, m.rope_scaling, pos_BT, h_BTD.dtype)
        mask = m.causal_mask(pos_BT, None, caches[0].k.shape[2])
        h, _ = m.mtp_step(self.depth, ids_BT, h_BTD, rope, mask, pos_BT, caches[0])
        return h

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.model.word_embeddings.weight.dtype


class LMDrafter:
    """Classic draft-model speculation: a small causal LM with the target's vocabulary (hidden states unused)."""

    def __init__(self, model: Transformer):
        self.model = model.eval()
        self.kv: SlotCaches | None = None

    def allocate(self, max_batch: int, max_len: int) -> None:
        self.kv = SlotCaches(self.model.make_caches(max_batch, max_len + 1), max_len + 1)

    def absorb(self, slots: Tensor, ids_BT: Tensor, next_BT: Tensor, hidden_BTD: Tensor, pos_BT: Tensor,
               copies: list[tuple[int, int, int, int]], max_tokens: int) -> None:
        # token t at position t, as the target's cache; the sampled token after the prompt comes next
        tmp = self.model.make_caches(pos_BT.shape[0], int(pos_BT.max()) + 1)
        for row, src, lo, hi in copies:
            self.kv.read_range(src, lo, hi, tmp, row)
        for cols, views in prompt_chunks(pos_BT, tmp, max_tokens):
            self.model(ids_BT[:, cols], pos_BT=pos_BT[:, cols], caches=views, compute_logits=False)
        self.kv.write_rows(slots, tmp)

    def views(self, n: int, S: int) -> list:
        return self.kv.view(n, min(S + 1, self.kv.max_len))

    def propose(self, st: ContextState, k: int) -> tuple[Tensor, Tensor]:
        caches = st.caches
        rows = torch.arange(st.n, device=st.ids_BL.device)
        out = self.model(st.ids_BL, pos_BT=st.pos_BL + 1, caches=caches)  # token t+1 lives at position t+1
        last = st.len_B - 1
        first, pos_B = out.logits[rows, last], st.pos_BL[rows, last] + 1

        def next_logits(j: int, prev: Tensor | None) -> Tensor:
            nonlocal pos_B
            if prev is None:
                return first
            pos_B = pos_B + 1
            return self.model(prev[:, None], pos_BT=pos_B[:, None], caches=caches).logits[:, 0]

        return chain_drafts(st, k, rows, next_logits)


class Eagle3Drafter(HiddenStateDrafter):
    """Drafts with an EAGLE-3-style draft model (angelmed.draft.DraftModel) on top of `target`: the draft's one
    decoder layer takes the fused low/middle/high target features at t and the target's embedding of token t+1,
    and scores the next token with (a vocabulary subset of) the target's frozen lm_head. Further drafts feed the
    layer's own output back (chain drafting). Keeps its own one-layer KV cache."""

    def __init__(self, target: Transformer, draft: "Eagle3Model"):
        dc = draft.draft_config
        dc.check_target(target.config, "Eagle3Drafter")
        w = target.model.word_embeddings.weight
        self.model = target
        self.draft = draft.to(device=w.device, dtype=w.dtype).eval()
        self.feature_layers = tuple(dc.feature_layers)
        self.cfg = dc.target_config()
        with torch.no_grad():
            self.head_W = draft.head_weight(target).contiguous()  # frozen: gather the subset once
        self.vocab_map = None if draft.vocab_map is None else draft.vocab_map.to(w.device)

    @torch.no_grad()
    def fuse(self, feats: list[Tensor]) -> Tensor:
        return self.draft.fuse([f.to(self._dtype) for f in feats])

    def _cache(self, batch: int, max_len: int) -> KVCache:
        w = self.model.model.word_embeddings.weight  # the activations' dtype (the head may be stored narrower)
        return KVCache(batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim, w.dtype, w.device)

    def _run(self, ids_BT: Tensor, g_BTD: Tensor, pos_BT: Tensor, caches) -> Tensor:
        mask = self.model.causal_mask(pos_BT, None, caches[0].k.shape[2])
        emb = self.draft.embed(ids_BT, self.model)
        return self.draft(emb, g_BTD, self.draft.rope(pos_BT, g_BTD.dtype), mask, pos_BT, caches[0])

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.model.word_embeddings.weight.dtype

    def _head_input(self, o_BD: Tensor) -> Tensor:
        return self.draft.head_input(o_BD)


# ---- engine integration ------------------------------------------------------------------------------------
@dataclass
class SpecStats:
    rounds: int = 0  # verify forwards x active rows
    drafted: int = 0
    accepted: int = 0
    accepted_hist: list[int] = field(default_factory=list)  # index a: rows that accepted a drafts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accept_length(self) -> float:
        """Tokens emitted per verify forward per row (accepted drafts + the corrected/bonus token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "mean_accept_length": self.mean_accept_length,
                "accepted_hist": list(self.accepted_hist)}


class SpecState:
    """Per-slot speculative state inside an Engine: the catch-up context each drafter row still has to see."""

    def __init__(self, engine: "Engine"):
        self.e = engine
        self.k = engine.spec_tokens
        if self.k < 1:
            raise ValueError(f"spec_tokens must be >= 1, got {self.k}")
        B, K, D, dev = engine.max_batch, self.k + 1, engine.cfg.hidden_size, engine.device
        self.ids_BL = torch.zeros(B, K, dtype=torch.long, device=dev)
        self.hidden_BLD = torch.zeros(B, K, D, dtype=engine.dtype, device=dev)
        self.len_B = torch.ones(B, dtype=torch.long, device=dev)
        self.reset_stats()
        # EAGLE-3 drafters read intermediate target layers; the others the final hidden state
        self.feature_layers = tuple(getattr(engine.draft, "feature_layers", None) or ())
        L = engine.cfg.num_hidden_layers
        if not all(0 <= i < L for i in self.feature_layers):
            raise ValueError(f"draft feature layers {list(self.feature_layers)} must lie in [0, {L})")
        self._round_compiled = (compile_step(self._draft_and_verify, engine.device, freeze=engine.packed_bytes > 0)
                                if engine.compile else None)

    def reset_stats(self) -> None:
        self.stats = SpecStats(accepted_hist=[0] * (self.k + 1))

    def features(self, out) -> Tensor:
        """What the drafter takes per target position: fused chosen layers, or the final hidden state."""
        return self.e.draft.fuse(out.layer_hidden) if self.feature_layers else out.hidden

    def absorb_prompt(self, idx: Tensor, ids_BT: Tensor, next_BT: Tensor, hidden_BTD: Tensor, pos_BT: Tensor,
                      last_B: Tensor, first_tok: Tensor, copies: list[tuple[int, int, int, int]]) -> None:
        """After a prefill: the drafter takes the prompts in (see DraftModel.absorb); each row's catch-up context
        is the sampled token with the target's state at the last prompt position (column last_B)."""
        self.e.draft.absorb(idx, ids_BT, next_BT, hidden_BTD, pos_BT, copies, self.e.max_prefill_tokens)
        rows = torch.arange(len(idx), device=ids_BT.device)
        self.ids_BL[idx, 0] = first_tok
        self.hidden_BLD[idx, 0] = hidden_BTD[rows, last_B].to(self.hidden_BLD.dtype)
        self.len_B[idx] = 1

    def round(self) -> None:
        e, k = self.e, self.k
        n = e.active_prefix()
        sample, filt, penalty, want_lp = e._flags(n)
        S = e.attn_len(n, extra=2 * (k + 1))
        # views made outside the compiled graph: inside, their lookup by S would compile a graph per length
        caches, draft_caches = e.kv.view(n, S), e.draft.views(n, S)
        # drafts and verify, compiled: one graph
        host = (self._round_compiled or self._draft_and_verify)(n, caches, draft_caches, sample, filt, penalty,
                                                                 want_lp)
        host = host.cpu()  # the round's one host copy
        tok_h = host[:, :k + 1].long().tolist()
        a_h = host[:, k + 1].long().tolist()
        lp_h = host[:, k + 2:].tolist() if want_lp else None
        new, new_lp = {}, ({} if want_lp else None)
        for i in range(n):
            if e.slots[i] is None:
                continue
            # this round's catch-up made the drafter's entries final up to the pending token's position
            e.slots[i].draft_fed = e.slots[i].prompt_len + len(e.slots[i].generated)
            new[i] = tok_h[i][:a_h[i] + 1]
            if want_lp:
                new_lp[i] = lp_h[i][:a_h[i] + 1]
            self.stats.rounds += 1
            self.stats.drafted += k
            self.stats.accepted += a_h[i]
            self.stats.accepted_hist[a_h[i]] += 1
        e.metrics.spec_rounds = self.stats.rounds
        e.metrics.spec_drafted = self.stats.drafted
        e.metrics.spec_accepted = self.stats.accepted
        e._accept_tokens(new, new_lp)

    def _draft_and_verify(self, n: int, caches, draft_caches, sample: bool, filt: bool, penalty: bool,
                          want_lp: bool) -> Tensor:
        # the context is sliced here, inside the graph: inputs that alias each other (a view of the state the
        # verify mutates) would keep a compiled graph from freezing its weights
        e, k = self.e, self.k
        pos_B, len_B = e.pos_B[:n], self.len_B[:n]
        st = ContextState(
            ids_BL=self.ids_BL[:n], hidden_BLD=self.hidden_BLD[:n],
            pos_BL=(pos_B - len_B)[:, None].clamp(min=0) + torch.arange(k + 1, device=e.device), len_B=len_B,
            n=n, caches=draft_caches, temp_B=e.temp_B[:n], topk_B=e.topk_B[:n], topp_B=e.topp_B[:n],
            seed_B=e.seed_B[:n], counter_B=e.counter_B[:n], sample=sample, filt=filt,
            seen_BV=e.seen_BV[:n] if penalty else None, pen_B=e.pen_B[:n] if penalty else None)
        drafts, q = e.draft.propose(st, k)
        return self._verify(caches, n, drafts, q, sample, filt, penalty, want_lp)

    def _verify(self, caches, n: int, drafts: Tensor, q: Tensor | None, sample: bool, filt: bool, penalty: bool,
                want_lp: bool) -> Tensor:
        """Target forward over [x, drafts], acceptance, state updates, on device. Returns [n, k+2(+k+1)] float64:
        the k+1 tokens, the accepted count (and the log-probs)."""
        e, k = self.e, self.k
        ar = torch.arange(k + 1, device=e.device)
        ids = torch.cat([e.tok_B[:n, None], drafts], dim=1)
        out = e.model(ids, pos_BT=e.pos_B[:n, None] + ar, caches=caches, keep_layers=self.feature_layers)
        raw = out.logits  # [n, k+1, V]
        logits = raw
        if penalty:
            seen = _seen_after_drafts(e.seen_BV[:n], drafts)
            logits = apply_repetition_penalty(raw.reshape(-1, raw.shape[-1]), seen.reshape(-1, raw.shape[-1]),
                                              e.pen_B[:n].repeat_interleave(k + 1)).view_as(raw)
        if sample:
            V = raw.shape[-1]
            rep = lambda t: t.repeat_interleave(k + 1)  # noqa: E731  per-position copies of per-row settings
            p = probs_from_logits(logits.reshape(-1, V), rep(e.temp_B[:n]), rep(e.topk_B[:n]), rep(e.topp_B[:n]),
                                  filt, True).view_as(raw)
            toks, a = accept_drafts(p, drafts, q, e.seed_B[:n], e.counter_B[:n])
        else:  # all greedy: accepted drafts equal the target argmax, so the argmax row is the answer
            toks = argmax(logits)
            a = (drafts == toks[:, :k]).long().cumprod(-1).sum(-1)
        rows = torch.arange(n, device=e.device)
        e.tok_B[:n] = toks[rows, a]
        e.pos_B[:n] += (a + 1) * e.active_B[:n]
        e.counter_B[:n] += 1
        emitted = ar[None, :] <= a[:, None]
        e.seen_BV[rows[:, None], torch.where(emitted, toks, toks[rows, a][:, None])] = True  # index_put: see engine
        self.ids_BL[:n] = toks
        self.hidden_BLD[:n] = self.features(out).to(self.hidden_BLD.dtype)
        self.len_B[:n] = a + 1
        parts = [toks.double(), a.double()[:, None]]
        if want_lp:
            parts.append(token_logprobs(raw, toks).double())
        return torch.cat(parts, dim=1)


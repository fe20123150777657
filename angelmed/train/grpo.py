"""GRPO / DAPO for the MoE model (training.md §7), on the shared training loop (train/loop.py: optimizer, schedule,
checkpoint/resume, metrics, progress bar, export).

One training step = one generation batch:
  1. rollout: `prompts_per_step` prompts x G completions from the serving engine (seeded sampling, T=1 default),
     recording pi_rollout log-probs and the expert ids of every processed token (R3);
     with dynamic sampling, zero-variance groups are dropped and (max_gen_batches > 1) refilled;
  2. rewards: the reward registry (angelmed.rewards) combined by weight, sum_then_normalize or normalize_then_sum,
     plus the optional DAPO overlong penalty; group-relative advantages (grpo_loss.group_advantages);
  3. mu optimizer steps over the batch (micro-batches, gradient accumulation): one forward over
     prompt+completion with routing forced to the recorded experts (gate weights recomputed from live scores),
     clipped surrogate (eps_low/eps_high), optional k3 KL (beta > 0 loads a frozen reference), rollout
     correction, aggregation grpo/bnpo/dr_grpo/dapo (dapo's normaliser = active tokens of the whole batch,
     counted before the accumulation loop).

pi_old: with old_logprobs "auto", the rollout log-probs when mu = 1, no rollout correction and untempered
sampling (verl's "bypass" mode: the ratio is pi_theta / pi_rollout); otherwise the training forward's own
log-probs before the first update, which is the first iteration's forward detached (weights change only at the
optimizer step after the last micro-batch, so a separate no-grad pass would compute the same numbers).

Routing disagreement (logged each step): on the first training forward, per MoE layer and token, would the live
router (on that forward's own layer input) select a different expert set than the rollout recorded? Reported
per (token, layer) decision and per token (any layer). Expert-bias updates are frozen by default; router aux
losses and the MTP loss are always off here.

Several ranks (torchrun): training is FSDP2-sharded as in the other stages, and so is the KL reference; rollouts
are data-parallel. Each rank generates and scores the prompts i = rank (mod world) of every generation batch on its
own full-weight rollout copy (gathered from the shards before each rollout, so the model must fit one device in the
rollout dtype), then all ranks gather the whole batch: dynamic sampling, advantages and logged statistics are
computed on the global batch, identically everywhere. The update's micro-batches are dealt out round-robin; every
rank runs the same number of forward/backward passes (a rank with fewer adds zero-weight passes, as FSDP's
collectives need), and each back-propagates `world x` its micro-batches' share of the single-process loss, so
FSDP's gradient mean equals the one-process gradient over the same micro-batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from angelmed.checkpoint import _dtype
from angelmed.infer.engine import Engine
from angelmed.model import Transformer
from angelmed.train import dist as tdist
from angelmed.train.balance import ExpertBalancer, load_stats
from angelmed.train.data import load_tokenizer
from angelmed.train.grpo_config import GRPORunConfig, load_grpo_config
from angelmed.train.grpo_loss import (aggregate, clipped_surrogate, group_advantages, normalize_then_sum,
                                      overlong_penalty, rollout_correction, zero_std_groups)
from angelmed.train.grpo_prompts import PromptStream, heldout_prompts
from angelmed.train.loop import Trainer, _full, build_model, model_config
from angelmed.train.rollout import (Completion, PromptItem, Sampling, TrainBatch, collate, completion_seed,
                                    generate_groups, policy_logprobs, routing_disagreement, stop_ids_of)

log = logging.getLogger(__name__)


def build_reward_list(rewards) -> list:
    """WeightedReward list from registry config entries (dicts) or ready objects (WeightedReward, (fn, w),
    (name, fn, w), bare callables)."""
    from angelmed.rewards.base import WeightedReward, _as_weighted
    from angelmed.rewards.registry import build_rewards

    if rewards and all(isinstance(r, dict) for r in rewards):
        return build_rewards(rewards)
    out = _as_weighted(list(rewards or []))
    if not out:
        raise ValueError("GRPO needs at least one reward (grpo.rewards)")
    return [r if isinstance(r, WeightedReward) else WeightedReward(r) for r in out]


def _nan_list(values: list) -> Tensor:
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


class GRPOTrainer(Trainer):
    def __init__(self, cfg: GRPORunConfig, rewards=None, on_step_end: Callable[[int, dict], None] | None = None):
        """rewards: None = build from cfg.grpo.rewards; or a list as accepted by `build_reward_list`."""
        tokenizer = load_tokenizer(cfg.data.tokenizer, model_config(cfg.model).vocab_size)
        super().__init__(cfg, self._make_batches, use_segments=False, tokenizer=tokenizer, on_step_end=on_step_end)
        self.rewards = build_reward_list(rewards if rewards is not None else cfg.grpo.rewards)
        self.reward_names = self._unique_names()

    def _unique_names(self) -> list[str]:
        from angelmed.rewards.base import _unique_names

        return _unique_names(self.rewards)

    # ---- data ------------------------------------------------------------------------------------------
    def _make_batches(self, split: str, rank: int, world: int) -> PromptStream:
        g, d = self.cfg.grpo, self.cfg.data
        return PromptStream(g.prompts, d.data_root, self.tokenizer, g.prompts_per_step, g.max_prompt_length,
                            0.0 if g.eval_prompts else d.heldout_fraction, d.seed)

    def _heldout_batches(self) -> list[PromptItem]:
        g, d = self.cfg.grpo, self.cfg.data
        return heldout_prompts(g.prompts, g.eval_prompts, d.data_root, self.tokenizer, g.eval_size,
                               g.max_prompt_length, d.heldout_fraction)

    # ---- set-up ----------------------------------------------------------------------------------------
    def prepare_model(self, model: Transformer) -> None:
        """The MTP loss is off in RL: MTP layers are frozen (no optimizer state, no weight decay), kept as loaded."""
        for layer in list(model.model.layers)[model.config.num_hidden_layers:]:
            layer.requires_grad_(False)

    def _setup(self) -> None:
        super()._setup()
        g, b = self.cfg.grpo, self.cfg.balance
        L = self.mcfg.num_hidden_layers
        # MTP is off in RL: balance (and measure routing of) the main layers only
        self.balancer = ExpertBalancer(nn.ModuleList(list(self.model.model.layers)[:L]), b.bias_update_rate,
                                       b.bias_zero_mean, frozen=b.freeze)
        self.gates = self.balancer.routers
        self.train_dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        want = self.train_dtype if g.rollout_dtype == "same" else _dtype(g.rollout_dtype)
        if not self.fsdp and want == torch.float32:
            self.rollout_model = self.model  # same weights, no copy, no sync
        else:  # a plain copy in the rollout dtype, refreshed from the master weights before each rollout
            self.rollout_model = Transformer(self.mcfg).to(device=self.info.device, dtype=want).eval()
            self.rollout_model.requires_grad_(False)
        self.engine = Engine(self.rollout_model, None, max_batch=g.rollout_batch,
                             max_seq_len=g.max_prompt_length + g.max_completion_length,
                             stop_ids=stop_ids_of(self.tokenizer))
        self.ref_model = None
        if g.beta > 0:  # a frozen copy of the starting weights (the same after a resume)
            ref = build_model(self.cfg.model).to(self.info.device)
            if self.info.world_size > 1:  # sharded like the policy: each rank holds 1/world of it
                tdist.shard_model(ref, self.cfg.train.precision)
            else:
                ref = ref.to(self.train_dtype)
            self.ref_model = ref.eval().requires_grad_(False)
        self.pad_id = getattr(self.tokenizer, "pad_id", None) or 0
        self.flops_per_token = 0.0  # MFU of a rollout+update step is not meaningful; see train_time_s instead

    def _sync_rollout_weights(self) -> None:
        """Copy the master weights (and expert biases) into the rollout copy, when there is one."""
        if self.rollout_model is self.model:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        self.rollout_model.load_state_dict(sd, strict=False)

    # ---- rewards ---------------------------------------------------------------------------------------
    def score(self, items: list[PromptItem], comps: list[Completion]) -> tuple[Tensor, dict[str, Tensor]]:
        """(total reward per completion [N] (NaN = no reward at all), raw values per function [N] (NaN = None))."""
        from angelmed.rewards.base import combine

        g = self.cfg.grpo
        prompts = [items[c.group].messages for c in comps]
        completions = [[{"role": "assistant", "content": c.text}] for c in comps]
        keys: list[str] = []
        for it in items:
            keys += [k for k in it.columns if k not in keys]
        columns: dict[str, list] = {k: [items[c.group].columns.get(k) for c in comps] for k in keys}
        columns["completion_ids"] = [list(c.completion_ids) for c in comps]
        totals, per_fn = combine(self.rewards, prompts, completions, **columns)
        per = {name: _nan_list(v) for name, v in per_fn.items()}
        total = _nan_list(totals)
        if g.overlong_penalty:
            lengths = torch.tensor([len(c.completion_ids) for c in comps])
            pen = overlong_penalty(lengths, g.max_completion_length, g.overlong_buffer, g.overlong_penalty_factor)
            per["overlong"] = pen
            total = torch.where(total.isnan(), pen, total + pen)
        return total, per

    def advantages(self, total: Tensor, per: dict[str, Tensor]) -> Tensor:
        g = self.cfg.grpo
        if g.reward_aggregation == "normalize_then_sum":
            weights = {n: r.weight for n, r in zip(self.reward_names, self.rewards)}
            weights.setdefault("overlong", 1.0)
            return normalize_then_sum(per, weights, g.group_size)
        return group_advantages(total, g.group_size, g.scale_rewards)

    # ---- rollout ---------------------------------------------------------------------------------------
    def sampling(self, greedy: bool = False) -> Sampling:
        g = self.cfg.grpo
        if greedy:
            return Sampling(g.max_completion_length, temperature=0.0)
        return Sampling(g.max_completion_length, g.temperature, g.top_p, g.top_k)

    def rollout(self, step: int) -> dict[str, Any]:
        """Generate until `prompts_per_step` groups qualify (or the generation-batch cap); returns kept
        completions with their rewards and the statistics over *all* generated completions."""
        g, G = self.cfg.grpo, self.cfg.grpo.group_size
        kept: list[Completion] = []
        kept_total: list[Tensor] = []
        kept_per: dict[str, list[Tensor]] = {}
        all_total: list[Tensor] = []
        all_per: dict[str, list[Tensor]] = {}
        all_comps: list[Completion] = []
        zero_groups = n_groups = gen_batches = 0
        while True:
            items = next(self.batches)
            seeds = [[completion_seed(self.cfg.train.seed, step, gen_batches, i, j) for j in range(G)]
                     for i in range(len(items))]
            comps, total, per = self._generate_and_score(items, G, self.sampling(), seeds, record_routing=True)
            zero = zero_std_groups(total, G)
            zero_groups += int(zero.sum())
            n_groups += len(items)
            all_total.append(total)
            all_comps += comps
            for k, v in per.items():
                all_per.setdefault(k, []).append(v)
            keep = ~zero if g.dynamic_sampling else torch.ones_like(zero)
            for i in keep.nonzero().flatten().tolist():
                if len(kept) // G >= g.prompts_per_step:
                    break
                sl = slice(i * G, (i + 1) * G)
                base = len(kept) // G
                for c in comps[sl]:
                    kept.append(Completion(base, c.prompt_ids, c.completion_ids, c.rollout_logprobs, c.routing,
                                           c.truncated, c.text))
                kept_total.append(total[sl])
                for k, v in per.items():
                    kept_per.setdefault(k, []).append(v[sl])
            gen_batches += 1
            full = len(kept) // G >= g.prompts_per_step
            capped = g.max_gen_batches > 0 and gen_batches >= g.max_gen_batches
            if not g.dynamic_sampling or full or capped:
                break
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
        return {"kept": kept, "total": cat(kept_total), "per": {k: cat(v) for k, v in kept_per.items()},
                "all_total": cat(all_total), "all_per": {k: cat(v) for k, v in all_per.items()},
                "all_comps": all_comps, "zero_groups": zero_groups, "groups": n_groups, "gen_batches": gen_batches}

    def _generate_and_score(self, items: list[PromptItem], G: int, sampling: Sampling, seeds: list[list[int]] | None,
                            record_routing: bool) -> tuple[list[Completion], Tensor, dict[str, Tensor]]:
        """G completions per prompt with their rewards, in prompt order. Each rank generates and scores the prompts
        i = rank (mod world); then every rank gathers the whole batch."""
        rank, world = self.info.rank, self.info.world_size
        mine = [items[i] for i in range(rank, len(items), world)]
        my_seeds = None if seeds is None else [seeds[i] for i in range(rank, len(items), world)]
        comps = generate_groups(self.engine, mine, G, sampling, my_seeds, record_routing, decode=self._decode)
        total, per = self.score(mine, comps) if mine else (torch.zeros(0), {})
        if world == 1:
            return comps, total, per
        parts = tdist.all_gather_object((comps, total, per))
        keys = next(p[2].keys() for p in parts if p[2])
        out_comps, out_total, out_per = [], [], {k: [] for k in keys}
        for i in range(len(items)):  # prompt i is local prompt i // world of rank i % world
            r_comps, r_total, r_per = parts[i % world]
            sl = slice(i // world * G, (i // world + 1) * G)
            out_comps += [dataclasses.replace(c, group=i) for c in r_comps[sl]]
            out_total.append(r_total[sl])
            for k in keys:
                out_per[k].append(r_per[k][sl])
        return out_comps, torch.cat(out_total), {k: torch.cat(v) for k, v in out_per.items()}

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return self.tokenizer.decode(ids)

    # ---- one step --------------------------------------------------------------------------------------
    def _old_from_rollout(self) -> bool:
        g = self.cfg.grpo
        if g.old_logprobs != "auto":
            return g.old_logprobs == "rollout"
        untempered = g.temperature == 1.0 and g.top_p == 1.0 and g.top_k == 0
        return g.num_iterations == 1 and g.rollout_correction == "none" and untempered

    def train_step(self, step: int) -> dict[str, Any]:
        dev = self.info.device
        t0 = time.perf_counter()
        self._sync_rollout_weights()
        ro = self.rollout(step)
        self.model.train()
        rollout_s = time.perf_counter() - t0
        rec = {"step": step + 1, **self._rollout_record(ro), "rollout_time_s": rollout_s}
        kept: list[Completion] = ro["kept"]
        t1 = time.perf_counter()
        if kept:
            rec.update(self._update(kept, self.advantages(ro["total"], ro["per"]).to(dev)))
        else:  # every group had zero reward variance: nothing to learn from this batch
            rec.update({"loss": 0.0, "grad_norm": 0.0, "tokens": 0, "skipped_update": True})
            self.balancer.step(tdist.all_reduce_sum)
        with warnings.catch_warnings():  # a skipped first update: the LR schedule still follows the step count
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        rec["lr"] = self.optimizer.param_groups[0]["lr"]
        rec["train_time_s"] = time.perf_counter() - t1
        return rec

    def _rollout_record(self, ro: dict[str, Any]) -> dict[str, Any]:
        from angelmed.rewards.base import reward_stats

        comps: list[Completion] = ro["all_comps"]
        total = ro["all_total"]
        rec: dict[str, Any] = {
            "reward_mean": float(total.nanmean()) if total.numel() else math.nan,
            "reward_std": float(_nanstd_pop(total)),
            "frac_reward_zero_std": ro["zero_groups"] / max(1, ro["groups"]),
            "completion_len_mean": float(np.mean([len(c.completion_ids) for c in comps])) if comps else 0.0,
            "truncated_frac": float(np.mean([c.truncated for c in comps])) if comps else 0.0,
            "groups_kept": len(ro["kept"]) // self.cfg.grpo.group_size, "gen_batches": ro["gen_batches"],
            "completions": len(comps),
        }
        per_lists = {k: [None if math.isnan(x) else x for x in v.tolist()] for k, v in ro["all_per"].items()}
        for k, v in reward_stats(per_lists).items():
            rec[k] = v
        return rec

    def _update(self, kept: list[Completion], adv_N: Tensor) -> dict[str, Any]:
        g, dev = self.cfg.grpo, self.info.device
        mb = self.cfg.data.micro_batch_size
        n_moe, k = len(self.gates), self.mcfg.num_experts_per_tok
        all_batches: list[TrainBatch] = [collate(kept[i:i + mb], dev, n_moe, k, self.pad_id)
                                         for i in range(0, len(kept), mb)]
        all_advs = [adv_N[i:i + mb] for i in range(0, len(kept), mb)]
        if g.mask_truncated_completions:
            for j, b in enumerate(all_batches):
                trunc = torch.tensor([c.truncated for c in kept[j * mb:(j + 1) * mb]], device=dev)
                b.mask_BL &= ~trunc[:, None]
        global_active = float(sum(int(b.mask_BL.sum()) for b in all_batches))  # dapo normaliser, before the loop
        accum = len(all_batches)  # the single-process accumulation count, whatever the world size
        # this rank's micro-batches (round-robin), then zero-weight repeats up to the same count on every rank
        rank, world = self.info.rank, self.info.world_size
        mine = list(range(rank, accum, world))
        slots = -(-accum // world)
        batches = [all_batches[j] for j in mine] + [all_batches[0]] * (slots - len(mine))
        advs = [all_advs[j] for j in mine] + [all_advs[0]] * (slots - len(mine))
        weight = [float(world)] * len(mine) + [0.0] * (slots - len(mine))
        real = len(mine)
        from_rollout = self._old_from_rollout()
        old: list[Tensor | None] = [b.rollout_logp_BL if from_rollout else None for b in batches]
        is_w: list[Tensor | None] = [None] * len(batches)
        masks = [b.mask_BL for b in batches]
        refs: list[Tensor | None] = [None] * len(batches)
        if self.ref_model is not None:
            with torch.no_grad():
                refs = [policy_logprobs(self.ref_model, b, g.temperature, g.routing_replay)[0] for b in batches]
        acc = _Acc()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norms, losses = [], []
        for it in range(g.num_iterations):
            loss_sum = 0.0
            for j, b in enumerate(batches):
                logp, ent, out = policy_logprobs(self.model, b, g.temperature, g.routing_replay, entropy=it == 0)
                m = b.mask_BL
                a = acc if j < real else _Acc()  # a padding pass's statistics are dropped
                if it == 0:
                    dis, dis_tok, n_tok = routing_disagreement(self.gates, out.router, b)
                    a.add("routing_disagree", dis, n_tok)
                    a.add("routing_disagree_tokens", dis_tok, n_tok)
                    a.add("entropy", float(ent[m].mean()) if m.any() else 0.0, int(m.sum()))
                    if old[j] is None:
                        old[j] = logp.detach()
                        self._rollout_mismatch(a, old[j], b)
                    if g.rollout_correction != "none":
                        is_w[j], masks[j] = rollout_correction(old[j], b.rollout_logp_BL, m, g.rollout_correction,
                                                               g.rollout_correction_threshold)
                        a.add("rollout_is_clipped_frac", _frac((is_w[j] >= g.rollout_correction_threshold) & m, m),
                              int(m.sum()))
                        a.add("rollout_masked_frac", _frac(m & ~masks[j], m), int(m.sum()))
                sur = clipped_surrogate(logp, old[j], advs[j], masks[j], g.epsilon_low, g.epsilon_high,
                                        g.importance_sampling_level, refs[j], g.beta, is_w[j])
                loss = aggregate(sur.loss_NL, masks[j], g.loss_type, g.max_completion_length, global_active, 1, accum)
                (loss * weight[j]).backward()
                if j >= real:  # a padding pass: zero gradients, no expert load
                    continue
                loss_sum += loss.item()
                self.balancer.accumulate(out.router)
                mk, n = masks[j], int(masks[j].sum())
                if n:
                    r = sur.ratio_NL.detach()[mk]
                    acc.add("clip_low_frac", _frac(sur.clipped_low_NL & mk, mk), n)
                    acc.add("clip_high_frac", _frac(sur.clipped_high_NL & mk, mk), n)
                    acc.add("ratio_mean", float(r.mean()), n)
                    acc.max("ratio_max", float(r.max()))
                    acc.min("ratio_min", float(r.min()))
                    if sur.kl_NL is not None:
                        acc.add("kl", float(sur.kl_NL.detach()[mk].mean()), n)
            grad_norms.append(float(_full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))))
            load_LE = self.balancer.step(tdist.all_reduce_sum)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
        losses = tdist.all_reduce_sum(torch.tensor(losses, dtype=torch.float64, device=dev)).tolist()
        acc = _Acc.merged(tdist.all_gather_object(acc))
        rec = {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(grad_norms)),
               "advantage_std": float(adv_N.std()) if adv_N.numel() > 1 else 0.0,
               "active_tokens": int(global_active), "old_logprobs": "rollout" if from_rollout else "train",
               "tokens": int(sum(int(b.valid_BT.sum()) for b in all_batches)) * g.num_iterations}
        rec.update(acc.result())
        if self.gates:
            stats = load_stats(load_LE.cpu())
            rec.update({"expert_maxvio_mean": float(stats["maxvio"].mean()), "expert_dead": int(stats["dead"].sum())})
        return rec

    @staticmethod
    def _rollout_mismatch(acc: "_Acc", old_BL: Tensor, b: TrainBatch) -> None:
        """pi_old vs pi_rollout on the sampled tokens: mean IS weight and the k1 estimate of KL(rollout || old)."""
        m = b.mask_BL
        n = int(m.sum())
        if n:
            d = (old_BL - b.rollout_logp_BL)[m]
            acc.add("rollout_is_mean", float(d.clamp(-20, 20).exp().mean()), n)
            acc.add("rollout_kl", float((-d).mean()), n)

    # ---- evaluation and logging ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean reward of greedy completions on the held-out prompts."""
        if not self.heldout:
            return {}
        self._sync_rollout_weights()
        comps, total, per = self._generate_and_score(self.heldout, 1, self.sampling(greedy=True), None,
                                                     record_routing=False)
        self.model.train()
        out = {"heldout_reward": float(total.nanmean())}
        out.update({f"heldout_reward/{k}": float(v.nanmean()) for k, v in per.items()})
        return out

    def _log(self, record: dict[str, Any], done: int, bar) -> None:
        t = self.cfg.train
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", len=f"{record['completion_len_mean']:.0f}")
        if done % t.log_every == 0 or done == t.steps or "heldout_reward" in record:
            self.writer.log(record)
            (bar.write if bar is not None else print)(format_console(record))


def format_console(rec: dict[str, Any]) -> str:
    parts = [f"step {rec['step']}"]
    for key, fmt in (("reward_mean", ".4f"), ("reward_std", ".3f"), ("heldout_reward", ".4f"), ("loss", ".4f"),
                     ("entropy", ".3f"), ("completion_len_mean", ".1f"), ("frac_reward_zero_std", ".2f"),
                     ("clip_high_frac", ".3f"), ("routing_disagree", ".4f"), ("grad_norm", ".3f"),
                     ("rollout_time_s", ".2f"), ("train_time_s", ".2f")):
        if rec.get(key) is not None:
            parts.append(f"{key} {format(rec[key], fmt)}")
    return " | ".join(parts)


def _frac(sel: Tensor, of: Tensor) -> float:
    n = int(of.sum())
    return int(sel.sum()) / n if n else 0.0


def _nanstd_pop(x: Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.std(unbiased=False)) if x.numel() else math.nan


class _Acc:
    """Token-weighted means (and extrema) of per-micro-batch statistics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.lo: dict[str, float] = {}

    @classmethod
    def merged(cls, accs: list["_Acc"]) -> "_Acc":
        """The statistics of all ranks' micro-batches together."""
        out = cls()
        for a in accs:
            for k in a.sums:
                out.sums[k] = out.sums.get(k, 0.0) + a.sums[k]
                out.weights[k] = out.weights.get(k, 0.0) + a.weights[k]
            for k, v in a.hi.items():
                out.max(k, v)
            for k, v in a.lo.items():
                out.min(k, v)
        return out

    def add(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def max(self, key: str, value: float) -> None:
        self.hi[key] = max(self.hi.get(key, -math.inf), value)

    def min(self, key: str, value: float) -> None:
        self.lo[key] = min(self.lo.get(key, math.inf), value)

    def result(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] if self.weights[k] else 0.0 for k in self.sums}
        out.update(self.hi)
        out.update(self.lo)
        return out


def run(cfg: GRPORunConfig, rewards=None, on_step_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    return GRPOTrainer(cfg, rewards, on_step_end).run()


def main(argv: list[str]) -> int:
    """`angelmed train grpo --config FILE [--section.key VALUE ...]`."""
    argv = list(argv)
    path = None
    for i, a in enumerate(argv):
        if a in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise SystemExit("angelmed train grpo: --config needs a file")
            path = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
            del argv[i]
            break
    run(load_grpo_config(path, argv))
    return 0

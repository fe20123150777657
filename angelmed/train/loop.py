"""The training loop shared by every stage: model set-up (FSDP2 under torchrun), AdamW + schedule, gradient
accumulation and clipping, MTP / z / balance losses, expert-bias update, held-out loss, metrics, atomic
checkpoints and exact resume.

A stage (cpt.py, sft.py, ...) provides the run config and a `make_batches(split, rank, world)` function
returning a resumable batch iterator (see train/data.py for the protocol).

Loss normalisation: CE terms are summed over loss tokens and divided by the loss-token count of the global
batch (all micro-batches, all ranks; counted before the first forward). z-loss is a per-micro-batch token
mean divided by (accumulation x ranks); the sequence-balance term is divided by the global row count.
FSDP2 averages gradients over ranks, so each rank back-propagates `world_size x` its share: the gradient is
that of the global objective, identical to one process running the whole global batch.

Run directory: config.yaml (resolved config), metrics.jsonl (rank 0; one JSON object per logged step: step,
loss, lm_loss, mtp_loss, mtp_{k}_loss, mtp_weight, z_loss, seq_balance_loss, grad_norm, lr, tokens, loss_tokens,
tokens_per_s, mfu, step_time_s, heldout_loss when computed, expert_max_over_mean / expert_maxvio [per MoE layer],
expert_maxvio_mean, expert_dead, expert_bias_{mean,std,min,max}; plus a first line {"step": 0, "heldout_loss"}
before training), expert_load.npy ([L_moe, E] loads summed since the previous logged step), tensorboard/,
checkpoints/ (see checkpointing.py) and model/ (final HF export in train.export_dtype).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from angelmed.checkpoint import _dtype, atomic_write_text, load_model
from angelmed.config import ModelConfig, get_preset
from angelmed.infer.cpu_pack import native_gemm
from angelmed.model import Transformer
from angelmed.train import dist as tdist
from angelmed.train.balance import ExpertBalancer, load_stats
from angelmed.train.checkpointing import (TrainCheckpointError, load_checkpoint, resolve_resume, save_checkpoint,
                                          write_hf_model)
from angelmed.train.config import ModelSection, RunConfig, RunConfigError, check_value
from angelmed.train.losses import (ce_sum, loss_token_counts, mtp_targets, mtp_weight_at, router_z_loss,
                                   seq_balance_loss)
from angelmed.train.metrics import MetricsWriter, format_console, measure_matmul_flops, train_flops_per_token
from angelmed.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
MakeBatches = Callable[[str, int, int], Any]


def model_config(m: ModelSection) -> ModelConfig:
    """The ModelConfig a run trains: the checkpoint's (init_from) or a preset with type-checked overrides."""
    if m.init_from:
        if m.overrides:
            raise RunConfigError("model.overrides only apply to preset models, not to model.init_from")
        return ModelConfig.from_json(m.init_from)
    cfg = get_preset(m.preset)
    if not m.overrides:
        return cfg
    hints = typing.get_type_hints(ModelConfig)
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    checked = {}
    for k, v in m.overrides.items():
        if k not in known:
            raise RunConfigError(f"model.overrides: unknown ModelConfig key {k!r}")
        checked[k] = check_value(v, hints[k], f"model.overrides.{k}", "config")
    return cfg.replace(**checked)


def build_model(m: ModelSection) -> Transformer:
    """fp32 model (the master weights): from an HF checkpoint, or an initialised preset."""
    if m.init_from:
        return load_model(m.init_from, dtype="float32").train()
    return Transformer(model_config(m)).init_weights(m.init_seed)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Trainer:
    def __init__(self, cfg: RunConfig, make_batches: MakeBatches, use_segments: bool, tokenizer=None,
                 on_step_end: Callable[[int, dict], None] | None = None,
                 mtp_segments: Callable[[dict[str, Tensor]], Tensor] | None = None):
        """use_segments: pass segment_ids to the model (attention stays inside each packed document/sample).
        mtp_segments: batch -> [B,T] ids of the documents MTP targets must not cross (default: segment_ids)."""
        self.cfg, self.make_batches, self.use_segments = cfg, make_batches, use_segments
        self.tokenizer, self.on_step_end = tokenizer, on_step_end
        self.mtp_segments = mtp_segments or (lambda b: b.get("segment_ids"))

    # ---- set-up ----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.info = info = tdist.init_distributed(t.device, need_group=t.precision == "bf16")
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        self.run_dir = Path(t.run_dir)
        model = build_model(cfg.model).to(info.device)
        self.prepare_model(model)
        self.mcfg: ModelConfig = model.config
        self.fsdp = info.world_size > 1 or t.precision == "bf16"
        if t.activation_checkpointing:
            tdist.checkpoint_layers(model)
        if self.fsdp:
            tdist.shard_model(model, t.precision)
        self.model = model
        # fused AdamW: one kernel over all parameters (2.7x faster step than foreach on CPU for base-100m);
        # FSDP2's DTensor parameters keep the default foreach implementation.
        self.optimizer = build_optimizer(model, cfg.optim, fused=not self.fsdp)
        self.scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim)
        b = cfg.balance
        self.balancer = ExpertBalancer(model, b.bias_update_rate, b.bias_zero_mean, frozen=b.freeze)
        self.depth = self.mcfg.num_nextn_predict_layers
        lams = [cfg.loss.mtp_weight] + [w for _, w in cfg.loss.mtp_weight_schedule]
        self.use_mtp = self.depth > 0 and any(x > 0 for x in lams)
        self.batches = self.make_batches("train", info.rank, info.world_size)
        self.heldout = self._heldout_batches()
        self.start_step, self.tokens_seen = 0, 0
        self._window_load: np.ndarray | None = None  # expert load summed since the last log line
        resume = resolve_resume(t.resume, self.run_dir)
        if resume is not None:
            state = load_checkpoint(resume, model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self.batches.load_state_dict(state["data"])
            self.start_step, self.tokens_seen = state["step"], state["tokens_seen"]
            if info.is_main:
                log.info("resumed from %s (step %d)", resume, self.start_step)
        if self.start_step > t.steps:
            raise TrainCheckpointError(f"checkpoint is at step {self.start_step}, beyond train.steps={t.steps}")
        self.flops_per_token = train_flops_per_token(self.mcfg, cfg.data.seq_len, self.use_mtp)
        dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        if info.device.type == "cpu" and not native_gemm(dtype) and info.is_main:
            log.warning("train.precision bf16 on a CPU that multiplies bf16 only by emulation (no AVX512/AMX): "
                        "several times slower than fp32 here (--train.precision fp32)")
        self.peak_flops = t.peak_flops or measure_matmul_flops(info.device, dtype)
        self.writer = None
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            self.writer = MetricsWriter(self.run_dir, t.tensorboard, self.start_step if resume else None)

    def prepare_model(self, model: Transformer) -> None:
        """Hook before sharding and optimizer construction (GRPO freezes the MTP layers it does not train)."""

    def _heldout_batches(self) -> list[dict[str, Tensor]]:
        n = self.cfg.train.eval_batches
        if n <= 0 or self.cfg.data.heldout_fraction <= 0:
            return []
        it = self.make_batches("heldout", self.info.rank, self.info.world_size)
        batches = []
        for _ in range(n):  # a finite split: take what there is, up to n batches
            try:
                batches.append(next(it))
            except StopIteration:
                break
        if not batches and self.info.is_main:
            log.warning("held-out split is empty: no held-out loss will be reported")
        return batches

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict[str, Tensor], mtp: bool):
        seg = batch.get("segment_ids") if self.use_segments else None
        return self.model(batch["input_ids"], batch.get("position_ids"), seg, mtp=mtp)

    def train_step(self, step: int) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        accum, world = cfg.train.grad_accum, info.world_size
        micro = [self._to_device(next(self.batches)) for _ in range(accum)]
        depth = self.depth if self.use_mtp else 0
        segs = [self.mtp_segments(b) if depth else None for b in micro]
        counts = tdist.all_reduce_sum(sum(loss_token_counts(b["labels"], s, depth) for b, s in zip(micro, segs)))
        denom = counts.clamp(min=1).tolist()
        rows = sum(b["input_ids"].shape[0] for b in micro) * world
        lam = mtp_weight_at(step, cfg.loss.mtp_weight, cfg.loss.mtp_weight_schedule)
        zc, alpha = cfg.loss.z_loss_coef, cfg.loss.seq_balance_alpha
        # logged sums (this rank's share of the global objective): lm, mtp_1..D, z, seq-balance
        parts = torch.zeros(3 + depth, dtype=torch.float64)
        for i, b in enumerate(micro):
            if self.fsdp:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == accum - 1)
            out = self._forward(b, mtp=depth > 0)
            lm = ce_sum(out.logits, b["labels"]) / denom[0]
            loss = lm
            parts[0] += lm.item()
            for k in range(1, depth + 1):
                lk = ce_sum(out.mtp_logits[k - 1], mtp_targets(b["labels"], segs[i], k)) / denom[k]
                loss = loss + (lam / depth) * lk
                parts[k] += lk.item()
            if zc > 0 and out.router:
                z = router_z_loss(out.router) / (accum * world)
                loss = loss + zc * z
                parts[1 + depth] += z.item()
            if alpha > 0 and out.router:
                sb = seq_balance_loss(out.router, self.mcfg.num_experts_per_tok) / rows
                loss = loss + alpha * sb
                parts[2 + depth] += sb.item()
            (loss * world).backward()
            self.balancer.accumulate(out.router)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)).item()
        load_LE = self.balancer.step(tdist.all_reduce_sum)  # before the optimizer step (§1.1 item 3)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        parts = tdist.all_reduce_sum(parts.to(info.device)).cpu()
        lm_loss = parts[0].item()
        mtp_losses = parts[1:1 + depth].tolist()
        record: dict[str, Any] = {"step": step + 1, "lm_loss": lm_loss, "grad_norm": grad_norm, "lr": lr,
                                  "tokens": int(sum(b["input_ids"].numel() for b in micro) * world),
                                  "loss_tokens": int(counts[0].item())}
        total = lm_loss
        if depth:
            record["mtp_loss"] = sum(mtp_losses) / depth
            record.update({f"mtp_{k}_loss": v for k, v in enumerate(mtp_losses, 1)})
            record["mtp_weight"] = lam
            total += lam * record["mtp_loss"]
        n_moe = max(1, len(out.router))  # z and balance terms are summed over layers; logged per layer
        if zc > 0:
            total += zc * parts[1 + depth].item()
            record["z_loss"] = parts[1 + depth].item() / n_moe
        if alpha > 0:
            total += alpha * parts[2 + depth].item()
            record["seq_balance_loss"] = parts[2 + depth].item() / n_moe
        record["loss"] = total
        if self.balancer.routers:
            load = load_LE.cpu().numpy()
            self._window_load = load if self._window_load is None else self._window_load + load
            stats = load_stats(load_LE.cpu())
            bias = self.balancer.biases()
            record.update({"expert_max_over_mean": stats["max_over_mean"].tolist(),
                           "expert_maxvio": stats["maxvio"].tolist(),
                           "expert_maxvio_mean": stats["maxvio"].mean().item(),
                           "expert_dead": int(stats["dead"].sum().item()),
                           "expert_bias_mean": bias.mean().item(), "expert_bias_std": bias.std().item(),
                           "expert_bias_min": bias.min().item(), "expert_bias_max": bias.max().item()})
        return record

    @torch.no_grad()
    def heldout_loss(self) -> float | None:
        if not self.heldout:
            return None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for b in self.heldout:
            b = self._to_device(b)
            out = self._forward(b, mtp=False)
            sums[0] += ce_sum(out.logits, b["labels"]).item()
            sums[1] += (b["labels"] != -100).sum().item()
        self.model.train()
        sums = tdist.all_reduce_sum(sums.to(self.info.device)).cpu()
        return (sums[0] / sums[1].clamp(min=1)).item()

    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics merged into the step record (hook: GRPO reports held-out reward instead)."""
        return {"heldout_loss": self.heldout_loss()}

    # ---- the run -----------------------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "data": self.batches.state_dict(),
                 "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict()}
        save_checkpoint(self.run_dir, step, self.model, self.optimizer, state, self.cfg.train.keep_last,
                        self.tokenizer)

    def run(self) -> dict[str, Any]:
        self._setup()
        t, info = self.cfg.train, self.info
        bar = None
        if info.is_main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        last: dict[str, Any] = {}
        try:
            self.model.train()
            if self.start_step == 0 and self.heldout:  # the baseline the held-out curve starts from
                initial = self.evaluate()
                if info.is_main:
                    self.writer.log({"step": 0, **initial})
            for step in range(self.start_step, t.steps):
                t0 = time.perf_counter()
                record = self.train_step(step)
                if info.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.tokens_seen += record["tokens"]
                record["tokens_per_s"] = record["tokens"] / dt
                record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak_flops * info.world_size)
                record["step_time_s"] = dt
                done = step + 1
                if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                    record.update(self.evaluate())
                if info.is_main:
                    self._log(record, done, bar)
                if t.save_every and done % t.save_every == 0 and done < t.steps:
                    self._save(done)
                if self.on_step_end is not None:
                    self.on_step_end(done, record)
                last = record
            if self.start_step < t.steps or not last:
                self._save(t.steps)
            self._export()
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
            tdist.cleanup(info)
        return last

    def _log(self, record: dict[str, Any], done: int, bar) -> None:
        t = self.cfg.train
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if done % t.log_every == 0 or done == t.steps or record.get("heldout_loss") is not None:
            self.writer.log(record)
            if self._window_load is not None:
                self.writer.write_expert_load(np.asarray(self._window_load, dtype=np.float64))
                self._window_load = None
            (bar.write if bar is not None else print)(format_console(record))

    def _export(self) -> None:
        """run_dir/model: the trained weights as an HF directory in train.export_dtype (input of the next stage)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            write_hf_model(sd, self.mcfg, self.run_dir / "model", _dtype(self.cfg.train.export_dtype), self.tokenizer)
        tdist.barrier()


def run_stage(cfg: RunConfig, make_batches: MakeBatches, use_segments: bool, tokenizer=None,
              on_step_end: Callable[[int, dict], None] | None = None,
              mtp_segments: Callable[[dict[str, Tensor]], Tensor] | None = None) -> dict[str, Any]:
    return Trainer(cfg, make_batches, use_segments, tokenizer, on_step_end, mtp_segments).run()

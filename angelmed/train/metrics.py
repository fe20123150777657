"""Throughput accounting (FLOPs per token, this machine's matmul rate, MFU) and metric sinks
(run_dir/metrics.jsonl, TensorBoard, console). Only rank 0 creates a MetricsWriter."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from angelmed.config import ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool) -> float:
    """Forward + backward FLOPs per trained token: 6 x active matmul parameters (embedding lookup excluded,
    lm_head included, MTP layer + second lm_head pass when `mtp`) + causal attention 6 * T * heads * head_dim
    per attention layer (QK^T and AV, half the keys on average, x3 for backward)."""
    counts = cfg.param_counts()
    H, V = cfg.hidden_size, cfg.vocab_size
    active = counts["active"] - V * H  # the input embedding is a lookup, not a matmul
    n_attn = cfg.num_hidden_layers
    if mtp and cfg.num_nextn_predict_layers:
        per_mtp = counts["mtp"] / cfg.num_nextn_predict_layers
        routed = cfg.num_experts * 3 * H * cfg.moe_intermediate_size
        routed_active = cfg.num_experts_per_tok * 3 * H * cfg.moe_intermediate_size
        active += cfg.num_nextn_predict_layers * (per_mtp - routed + routed_active + V * H)
        n_attn += cfg.num_nextn_predict_layers
    attn = 6 * seq_len * cfg.num_attention_heads * cfg.head_dim * n_attn
    return 6 * active + attn


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul rate (FLOP/s) of this device in `dtype`: the denominator of our MFU. The best of blocks of 10
    products over `seconds`: on a shared machine a neighbour's burst during one block would otherwise lower the
    peak (seen on a 2-core CPU: a logged MFU of 103%, where a fresh process measured 77 GFLOP/s)."""
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best, start = 0.0, time.perf_counter()
    while True:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        now = time.perf_counter()
        best = max(best, 2 * n**3 * 10 / (now - t))
        if now - start >= seconds:
            return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step), TensorBoard scalars, expert_load.npy."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # fresh run in a reused directory
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, forget lines of steps the checkpoint does not contain (they will be redone)."""
        from angelmed.checkpoint import atomic_write_text

        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", math.inf) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k == "step" or v is None or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list):  # per-layer values
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/layer{i}", x, step)

    def write_expert_load(self, load_LE: np.ndarray) -> None:
        tmp = self.run_dir / ".expert_load.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, load_LE)
        tmp.replace(self.run_dir / "expert_load.npy")

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def format_console(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}"]
    for key, fmt in (("lm_loss", ".4f"), ("mtp_loss", ".4f"), ("heldout_loss", ".4f"), ("grad_norm", ".3f"),
                     ("lr", ".2e"), ("tokens_per_s", ".0f"), ("mfu", ".2%"), ("expert_maxvio_mean", ".3f")):
        if key in record and record[key] is not None:
            parts.append(f"{key} {format(record[key], fmt)}")
    return " | ".join(parts)

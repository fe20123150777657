"""Shared helpers for the training tests: tiny run configs and metric readers."""

import json
from pathlib import Path

from angelmed.train.config import load_config


def tiny_cpt(run_dir, data_dir, *extra: str, stage: str = "cpt"):
    args = ["--data.data_root", str(data_dir), "--data.sources", "[{spec: medquad}]", "--data.seq_len", "32",
            "--data.micro_batch_size", "4", "--train.run_dir", str(run_dir), "--train.progress", "false",
            "--train.tensorboard", "false", "--train.threads", "1", "--train.peak_flops", "1e9",
            "--train.eval_batches", "2", "--train.eval_every", "0", "--optim.warmup_steps", "0", *extra]
    return load_config(stage, None, args)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}

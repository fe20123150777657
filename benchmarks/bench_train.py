"""CPT training throughput: our training loop vs a training step of transformers' Glm4MoeForCausalLM holding
the same weights, on the same batches (batch size, sequence length), same AdamW settings, same clipping.

    python benchmarks/bench_train.py [--presets small base-100m] [--batch 8] [--seq-len 256] [--steps 3]

Ours is the real `angelmed.train.loop.Trainer` step (loss, backward, clipping, expert-bias update, AdamW,
metrics); its tokens/s is read from the run's metrics.jsonl (median of the timed steps). The peer step is
forward with labels -> backward -> clip -> AdamW step -> zero_grad. Both models are fp32 and have no MTP layer
(the HF class has none), z-loss off. Tokens/s is the best timed step of `--rounds` alternating rounds. MFU = (FLOPs/token x tokens/s) / this machine's measured matmul rate.
The first-step losses of both are compared to prove the same weights and batches. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import emit, hf_peer, matmul_flops, setup
from angelmed.model import Transformer
from angelmed.train.config import load_config
from angelmed.train.loop import model_config, run_stage
from angelmed.train.metrics import train_flops_per_token


class ListBatches:
    """A resumable iterator over prepared batches (the loop's batch protocol)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= len(self.batches):
            raise StopIteration
        self.pos += 1
        return self.batches[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make_batches(vocab: int, batch: int, seq_len: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        window = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        out.append({"input_ids": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous(),
                    "position_ids": torch.arange(seq_len).expand(batch, seq_len).contiguous()})
    return out


def run_ours(preset: str, batches, warmup: int, lr: float, peak: float) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("cpt", None, [
            "--model.preset", preset, "--model.overrides", "{num_nextn_predict_layers: 0}",
            "--train.steps", str(len(batches)), "--train.run_dir", tmp, "--train.progress", "false",
            "--train.tensorboard", "false", "--train.eval_batches", "0", "--train.peak_flops", str(peak),
            "--loss.z_loss_coef", "0", "--optim.lr", str(lr), "--optim.schedule", "constant",
            "--train.export_dtype", "float32"])
        run_stage(cfg, lambda split, rank, world: ListBatches(batches if split == "train" else []),
                  use_segments=False)
        m = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in m if "tokens_per_s" in x]
    return [x["tokens_per_s"] for x in steps[warmup:]], steps[0]["lm_loss"]


def run_hf(preset: str, batches, warmup: int, lr: float) -> tuple[list[float], float]:
    cfg = model_config(load_config("cpt", None, ["--model.preset", preset, "--model.overrides",
                                                 "{num_nextn_predict_layers: 0}"]).model)
    peer = hf_peer(Transformer(cfg).init_weights(0)).train()
    decay = [p for p in peer.parameters() if p.dim() >= 2]
    rest = [p for p in peer.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    times, first = [], None
    for b in batches:
        t0 = time.perf_counter()
        out = peer(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                   shift_labels=b["labels"], use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        first = out.loss.item() if first is None else first
    tokens = batches[0]["input_ids"].numel()
    return [tokens / t for t in times[warmup:]], first


def bench(preset: str, batch: int, seq_len: int, steps: int, warmup: int, rounds: int, peak: float) -> dict:
    """`rounds` alternating rounds (transformers, then ours); each side's best timed step counts, which is the
    estimate least disturbed by other processes on a shared machine (medians are reported too)."""
    cfg = model_config(load_config("cpt", None, ["--model.preset", preset, "--model.overrides",
                                                 "{num_nextn_predict_layers: 0}"]).model)
    batches = make_batches(cfg.vocab_size, batch, seq_len, warmup + steps)
    lr = 3e-4
    hf_all, ours_all = [], []
    for _ in range(rounds):
        hf_steps, hf_loss = run_hf(preset, batches, warmup, lr)
        ours_steps, ours_loss = run_ours(preset, batches, warmup, lr, peak)
        hf_all += hf_steps
        ours_all += ours_steps
    hf_tok_s, ours_tok_s = max(hf_all), max(ours_all)
    if abs(hf_loss - ours_loss) > 1e-3:
        raise AssertionError(f"{preset}: first-step losses differ (ours {ours_loss:.6f}, hf {hf_loss:.6f}): "
                             "not the same weights/batches")
    fpt = train_flops_per_token(cfg, seq_len, mtp=False)
    res = {"preset": preset, "batch": batch, "seq_len": seq_len, "timed_steps": steps,
           "ours_tokens_per_s": round(ours_tok_s, 1), "hf_tokens_per_s": round(hf_tok_s, 1),
           "ratio": round(ours_tok_s / hf_tok_s, 3),
           "median": {"ours": round(statistics.median(ours_all), 1), "hf": round(statistics.median(hf_all), 1),
                      "ratio": round(statistics.median(ours_all) / statistics.median(hf_all), 3)},
           "ours_mfu": round(fpt * ours_tok_s / peak, 4),
           "hf_mfu": round(fpt * hf_tok_s / peak, 4), "first_step_loss": {"ours": ours_loss, "hf": hf_loss}}
    print(f"{preset:<10} B={batch} T={seq_len}: ours {ours_tok_s:8.0f} tok/s (MFU {res['ours_mfu']:.1%}) | "
          f"transformers {hf_tok_s:8.0f} tok/s (MFU {res['hf_mfu']:.1%}) | x{res['ratio']:.2f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base-100m"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating transformers/ours rounds")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    setup(args.threads)
    import os

    peak = matmul_flops(1024, torch.float32)
    print(f"device cpu, {torch.get_num_threads()} threads, tcmalloc "
          f"{'on' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'off'}, "
          f"measured fp32 matmul {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = [bench(p, args.batch, args.seq_len, args.steps, args.warmup, args.rounds, peak) for p in args.presets]
    after = matmul_flops(1024, torch.float32)  # a shared machine: keep the better of two measurements
    if after > peak:
        for r in results:
            r["ours_mfu"], r["hf_mfu"] = round(r["ours_mfu"] * peak / after, 4), round(r["hf_mfu"] * peak / after, 4)
        peak = after
    ratios = [r["ratio"] for r in results]
    emit({"benchmark": "train_cpt_tokens_per_s", "device": "cpu", "threads": torch.get_num_threads(),
          "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", ""), "matmul_flops": peak, "results": results,
          "min_ratio": min(ratios), "goal_ratio": 2.0, "goal_met": min(ratios) >= 2.0})


if __name__ == "__main__":
    main()

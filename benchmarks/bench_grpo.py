"""GRPO throughput: angelmed's GRPO step vs TRL's GRPOTrainer on transformers' Glm4MoeForCausalLM, same weights.

Both sides start from the same randomly initialised preset (hf_peer maps our weights; logits are checked equal),
get the same prompt token ids, G, completion length, reward (share of completion ids below vocab/4), sampling
(T=1), loss (dapo, eps 0.2/0.28, beta 0, mu 1) and optimizer (AdamW 0.9/0.95, wd 0.1, clip 1.0, constant LR).
Every completion is generated to exactly --completion-len tokens on both sides (no stop ids here; TRL gets
min_new_tokens), so both do the same amount of work. A step = generation + reward + one optimizer update;
samples/s = completions per step / median step time (the first --warmup steps are not timed).

    python benchmarks/bench_grpo.py [--preset tiny|small] [--prompts 4] [--group 8] [--completion-len 32]
                                    [--steps 4] [--device cpu|cuda]
Last line: JSON with samples/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import assert_same_logits, emit, hf_peer, setup
from angelmed.config import get_preset

PROMPTS = [
    "A 45-year-old man has crushing chest pain for 30 minutes. What should he do?",
    "What is the first-line treatment for uncomplicated hypertension in adults?",
    "Which vitamin deficiency causes scurvy?",
    "List common symptoms of iron-deficiency anaemia.",
    "When should a child with fever see a doctor urgently?",
    "What does HbA1c measure?",
    "Name two side effects of metformin.",
    "How is type 1 diabetes different from type 2 diabetes?",
]


def make_reward(vocab: int):
    cut = vocab // 4

    def low_id_share(prompts, completions, completion_ids, **kw):
        return [sum(int(t) < cut for t in ids) / max(1, len(ids)) for ids in completion_ids]

    return low_id_share


def train_tokenizer(vocab: int, out: Path):
    """A small byte-level BPE (our Tokenizer) and its transformers wrapper: identical ids on both sides."""
    from transformers import PreTrainedTokenizerFast

    from angelmed.tokenizer import EOD_TOKEN, Tokenizer

    tok = Tokenizer.train(PROMPTS * 20, vocab_size=vocab)
    tok.save(out)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=EOD_TOKEN, pad_token=EOD_TOKEN)
    hf.padding_side = "left"
    return tok, hf


def ours(args, hf_tok, tok_dir: Path, run_dir: Path, device: str):
    """Returns (step times, the initial model) - the model is built by our trainer; the peer copies it."""
    from angelmed.train.grpo import GRPOTrainer
    from angelmed.train.grpo_config import grpo_default_config
    from angelmed.train.rollout import PromptItem

    cfg = grpo_default_config()
    cfg.model.preset = args.preset
    cfg.data.tokenizer = str(tok_dir)
    cfg.data.micro_batch_size = args.prompts * args.group
    cfg.grpo.prompts = [{"source": str(run_dir / "prompts.jsonl")}]
    cfg.grpo.group_size, cfg.grpo.prompts_per_step = args.group, args.prompts
    cfg.grpo.max_completion_length = args.completion_len
    cfg.grpo.rollout_batch = args.prompts * args.group
    cfg.grpo.eval_size = 0
    cfg.optim.lr = args.lr
    cfg.train.steps = args.steps + args.warmup
    cfg.train.run_dir = str(run_dir / "ours")
    cfg.train.device = device
    cfg.train.peak_flops = 1.0
    cfg.train.tensorboard = False
    cfg.train.progress = False
    tr = GRPOTrainer(cfg, [make_reward(get_preset(args.preset).vocab_size)])
    tr._setup()
    tr.engine.default_stop_ids = []  # generate exactly completion_len tokens, as TRL does with min_new_tokens
    initial = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    items = [PromptItem(hf_tok(p)["input_ids"], [{"role": "user", "content": p}], {}) for p in PROMPTS]
    batches = itertools.cycle([items[i:i + args.prompts] for i in range(0, len(items), args.prompts)])
    tr.batches = batches
    times, rewards = [], []
    for step in range(args.steps + args.warmup):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        rec = tr.train_step(step)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        rewards.append(rec["reward_mean"])
        assert rec["completion_len_mean"] == args.completion_len
    return times[args.warmup:], rewards, initial, tr.mcfg


def trl_side(args, hf_tok, initial, mcfg, run_dir: Path, device: str):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from angelmed.model import Transformer

    model = Transformer(mcfg)
    model.load_state_dict(initial)
    model.eval()
    peer = hf_peer(model)
    assert_same_logits(model, peer, mcfg.vocab_size)
    peer.generation_config.eos_token_id = hf_tok.eos_token_id
    peer.generation_config.pad_token_id = hf_tok.pad_token_id
    peer.train()
    n_prompts = args.prompts * (args.steps + args.warmup)
    data = Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)]})
    cfg = GRPOConfig(
        output_dir=str(run_dir / "trl"), per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1, num_generations=args.group, max_completion_length=args.completion_len,
        generation_kwargs={"min_new_tokens": args.completion_len}, temperature=1.0, top_p=1.0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.1, max_grad_norm=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        num_iterations=1, max_steps=args.steps + args.warmup, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=device == "cpu", bf16=False, shuffle_dataset=False, seed=0,
        disable_dropout=True, dataloader_num_workers=0)

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.marks.append(("begin", time.perf_counter()))

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.marks.append(("end", time.perf_counter()))

    clock = Clock()
    trainer = GRPOTrainer(model=peer, reward_funcs=make_reward(mcfg.vocab_size), args=cfg, train_dataset=data,
                          processing_class=hf_tok, callbacks=[clock])
    trainer.train()
    begins = [t for k, t in clock.marks if k == "begin"]
    ends = [t for k, t in clock.marks if k == "end"]
    times = [e - b for b, e in zip(begins, ends)]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "reward" in h]
    return times[args.warmup:], rewards, lengths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    setup(args.threads or None)
    import trl

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.jsonl").write_text('{"prompt": "unused: the benchmark feeds token ids"}\n')
        vocab = get_preset(args.preset).vocab_size
        _, hf_tok = train_tokenizer(vocab, tmp / "tok")
        t_ours, r_ours, initial, mcfg = ours(args, hf_tok, tmp / "tok", tmp, args.device)
        t_trl, r_trl, len_trl = trl_side(args, hf_tok, initial, mcfg, tmp, args.device)
    samples = args.prompts * args.group
    ours_sps = samples / statistics.median(t_ours)
    trl_sps = samples / statistics.median(t_trl)
    print(f"preset {args.preset}  device {args.device}  {args.prompts} prompts x G={args.group}  "
          f"{args.completion_len} completion tokens  trl {trl.__version__}")
    print(f"  angelmed GRPO  step {statistics.median(t_ours):7.3f} s  {ours_sps:8.2f} samples/s  rewards {r_ours}")
    print(f"  TRL GRPOTrainer step {statistics.median(t_trl):7.3f} s  {trl_sps:8.2f} samples/s  rewards {r_trl}"
          f"  lengths {len_trl}")
    emit({"bench": "grpo", "preset": args.preset, "device": args.device, "prompts": args.prompts, "group": args.group,
          "completion_len": args.completion_len, "steps_timed": args.steps, "trl_version": trl.__version__,
          "ours_step_s": statistics.median(t_ours), "trl_step_s": statistics.median(t_trl),
          "ours_samples_per_s": ours_sps, "trl_samples_per_s": trl_sps, "speedup": ours_sps / trl_sps})


if __name__ == "__main__":
    main()

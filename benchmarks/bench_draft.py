"""EAGLE-3 draft speed-up: serving throughput at concurrency 1, 8 and 32, with and without the draft.

Target: `--target DIR` (a model trained by the pipeline). Without it, a self-contained stand-in is built once under
`--work` and reused: a byte-level BPE tokenizer trained on the built-in ontology chats (ICD-10-CM + HPO) and the
`small` preset trained by our SFT stage on those chats for `--target-steps` steps (a few minutes on CPU). When the
shared data root is available, MedQuAD Q/A (long free-text answers, 60% of the tokens) joins the mix, so replies
are paragraphs rather than one-line ontology answers.
Draft: `--draft DIR`, or trained here by `angelmed.train.draft` (self-distilled on the target's own replies to
training prompts, training-time-test loss, reduced draft vocabulary) and cached under `--work`. `--drafter mtp`:
the target's own MTP layer, trained the same way (`train draft --draft.kind mtp`), drafts instead.

Throughput: held-out chat prompts (never seen by the target or the draft), greedy, up to `--new-tokens` tokens per
reply with the tokenizer's stop ids; 2 x concurrency requests per measurement (the queue keeps every slot busy),
best of `--repeats` alternating runs. Greedy outputs with the draft are asserted identical to those without it
(fp32; in bf16 a near-tie may round differently over 1 and k+1 positions, so identical replies are counted).

    python benchmarks/bench_draft.py [--target DIR] [--draft DIR | --draft-layout llama | --drafter mtp] [--k 4]
                                     [--target-layers N] [--threads 1] [--compile] [--dtype bfloat16]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import DATA_ROOT, chat_sources, heldout_chat_prompts, setup  # noqa: E402

SOURCES: list[dict] = []  # the chat mix (chat_sources): set in main()
# the draft recipe: 900 steps on 2,048 regenerated replies reach held-out acceptance 3.53 on the 12-layer target in
# 22 min on one thread (300 steps on 512, about 5 min: 3.10-3.16)
DRAFT_STEPS, REGENERATE = 900, 2048


def build_tokenizer(out: Path, vocab_size: int):
    from angelmed.data.sources import open_source
    from angelmed.tokenizer import Tokenizer

    if (out / "tokenizer.json").is_file():
        return Tokenizer.load(out)
    texts = []
    for s in SOURCES:
        for conv in open_source(s["spec"], "sft"):
            texts.append("\n".join(m.get("content") or "" for m in conv.messages))
    tok = Tokenizer.train(texts, vocab_size)
    tok.save(out)
    return tok


def build_target(work: Path, steps: int, threads: int, layers: int | None) -> Path:
    """The `small` preset (`layers` deep), SFT-trained from scratch on the chats (our training stage, tokenizer)."""
    from angelmed.train.config import load_config
    from angelmed.train.sft import run

    run_dir = work / ("target" if layers is None else f"target_l{layers}")
    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    from angelmed.config import get_preset

    tok = build_tokenizer(work / "tokenizer", get_preset("small").vocab_size)
    print(f"building the stand-in target: small preset, SFT {steps} steps on {[s['spec'] for s in SOURCES]} "
          f"(tokenizer {tok.vocab_size} ids)", flush=True)
    cfg = load_config("sft", None, [
        "--model.preset", "small", "--data.tokenizer", str(work / "tokenizer"),
        "--data.sources", json.dumps(SOURCES), "--data.seq_len", "384", "--data.micro_batch_size", "8",
        "--optim.lr", "3e-3", "--optim.schedule", "cosine", "--optim.warmup_steps", "20",
        "--model.overrides", json.dumps({} if layers is None else {"num_hidden_layers": layers}),
        "--train.steps", str(steps), "--train.run_dir", str(run_dir), "--train.eval_every", "0",
        "--train.log_every", "25", "--train.tensorboard", "false", "--train.progress", "false",
        "--train.export_dtype", "float32", "--train.threads", str(threads), "--train.resume", "never"])
    t0 = time.perf_counter()
    run(cfg)
    print(f"target trained in {time.perf_counter() - t0:.0f} s -> {model_dir}", flush=True)
    return model_dir


def build_draft(work: Path, target: Path, args) -> Path:
    from angelmed.train.draft import load_draft_config, run

    mtp = args.drafter == "mtp"
    name = (["mtp"] + ([f"v{args.draft_vocab}"] if args.draft_vocab else []) if mtp
            else ["draft"] + ([] if args.draft_layout == "angelmed" else [args.draft_layout]))
    if (args.draft_steps, args.regenerate) != (DRAFT_STEPS, REGENERATE):  # a recipe of its own: a cache of its own
        name += [f"s{args.draft_steps}", f"r{args.regenerate}"]
    out = work / "_".join(name + ([] if args.target_layers is None else [f"l{args.target_layers}"]))
    if (out / "best" / "config.json").is_file():
        return out / "best"
    arch = ["--draft.kind", "mtp"] if mtp else ["--draft.layout", args.draft_layout]
    cfg = load_draft_config(None, [*arch, "--draft.draft_vocab_size", str(args.draft_vocab),
        "--data.sources", json.dumps(SOURCES), "--data.seq_len", "384", "--data.micro_batch_size", "8",
        "--distill.regenerate", str(args.regenerate),
        "--distill.max_new_tokens", "160", "--distill.batch", "32",
        "--train.steps", str(args.draft_steps), "--train.eval_every", str(max(1, args.draft_steps // 3)),
        "--train.lr", "3e-3", "--train.warmup_steps", "20", "--train.eval_spec_tokens", str(args.k),
        "--train.eval_max_tokens", "96", "--train.eval_prompts", "16", "--train.log_every", "25",
        "--train.threads", str(args.threads), "--train.out_dir", str(out)], str(target))
    t0 = time.perf_counter()
    s = run(cfg)
    print(f"draft trained in {time.perf_counter() - t0:.0f} s: held-out acceptance length "
          f"{s['initial']['mean_accept_length']:.2f} -> {s['best']['mean_accept_length']:.2f} (k={args.k})", flush=True)
    return out / "best"


def make_engine(model, max_len: int, stop_ids, conc: int, drafter=None, k: int = 3, compile: bool = False):
    from angelmed.infer.engine import Engine

    # no prefix reuse for the plain engine either (a drafter turns it off): both prefill every timed run
    eng = Engine(model, max_batch=conc, max_seq_len=max_len, stop_ids=stop_ids, draft=drafter, spec_tokens=k,
                 compile=compile, prefix_reuse=False)
    if compile:
        eng.warm_up()
    return eng


def measure(eng, prompts, new_tokens: int):
    from angelmed.infer.engine import GenerationRequest
    if eng.spec is not None:
        eng.spec.reset_stats()
    t = time.perf_counter()
    res = eng.generate([GenerationRequest(p, max_tokens=new_tokens) for p in prompts])
    dt = time.perf_counter() - t
    toks = sum(len(r.token_ids) for r in res)
    return [r.token_ids for r in res], toks / dt, (eng.spec.stats.as_dict() if eng.spec is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="trained target model dir (default: build the stand-in)")
    ap.add_argument("--draft", default=None, help="draft dir (default: train one for the target)")
    ap.add_argument("--drafter", default="eagle3", choices=["eagle3", "mtp"],
                    help="mtp: the target's own MTP layer, trained here as the drafter (`train draft --draft.kind "
                         "mtp`), instead of an EAGLE-3 draft; --draft then names that trained target")
    ap.add_argument("--work", default="runs/bench_draft", help="cache for the stand-in target and the draft")
    ap.add_argument("--target-steps", type=int, default=300)
    ap.add_argument("--target-layers", type=int, default=None,
                    help="stand-in target depth (default: the `small` preset's 4)")
    ap.add_argument("--draft-steps", type=int, default=DRAFT_STEPS)
    ap.add_argument("--draft-vocab", type=int, default=1024)
    ap.add_argument("--draft-layout", default="angelmed", choices=["angelmed", "llama"],
                    help="the draft layer trained here (llama: LlamaForCausalLMEagle3, which SGLang loads)")
    ap.add_argument("--regenerate", type=int, default=REGENERATE,
                    help="training prompts the target answers (distill)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="Engine(compile=True) for both sides")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations of target and draft (bf16: AMX matmuls on CPUs that have them)")
    ap.add_argument("--data-root", default=DATA_ROOT,
                    help="shared data root (MedQuAD); without it only the built-in ontology chats are used")
    args = ap.parse_args()
    SOURCES[:] = chat_sources(args.data_root)
    setup(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from angelmed.checkpoint import load_model
    from angelmed.draft import DraftModel
    from angelmed.infer.speculative import Eagle3Drafter, MTPDrafter
    from angelmed.train.draft import load_target_tokenizer

    work = Path(args.work)
    target_dir = (Path(args.target) if args.target
                  else build_target(work, args.target_steps, args.threads, args.target_layers))
    draft_dir = Path(args.draft) if args.draft else build_draft(work, target_dir, args)
    mtp = args.drafter == "mtp"
    # mtp: the trained "draft" is the target itself with its MTP layer trained (main layers bit-identical)
    model = load_model(draft_dir if mtp else target_dir, dtype=args.dtype).eval()
    tok = load_target_tokenizer("auto", str(target_dir), model.config.vocab_size)
    draft = None if mtp else DraftModel.load(draft_dir)
    concs = [int(c) for c in args.concurrency.split(",")]
    pool = heldout_chat_prompts(target_dir, tok, 2 * max(concs), SOURCES)
    out = {"target": str(target_dir), "target_source": "given" if args.target else
           f"stand-in: small preset, SFT {args.target_steps} steps on {'+'.join(x['spec'] for x in SOURCES)} chats",
           "draft": str(draft_dir), "drafter": args.drafter,
           "draft_layout": None if mtp else draft.draft_config.layout, "k": args.k,
           "new_tokens": args.new_tokens, "threads": args.threads, "compile": args.compile,
           "device": "cpu", "results": {}}
    print(f"target {target_dir} ({model.config.param_counts()['total']:,} params), draft {draft_dir}, k={args.k}, "
          f"{args.threads} thread(s)")
    max_len = max(map(len, pool)) + args.new_tokens + 1
    with torch.no_grad():
        for c in concs:
            prompts = (pool * 2)[:max(2 * c, 8)]
            plain_eng = make_engine(model, max_len, tok.stop_ids, c, compile=args.compile)
            drafter = MTPDrafter.for_checkpoint(model, draft_dir) if mtp else Eagle3Drafter(model, draft)
            spec_eng = make_engine(model, max_len, tok.stop_ids, c, drafter, args.k, args.compile)
            for eng in (plain_eng, spec_eng):  # warm-up: the whole workload once (compiled: the graphs for its shapes)
                measure(eng, prompts, args.new_tokens)
            best_plain, best_spec, stats = 0.0, 0.0, None
            for _ in range(args.repeats):  # alternate, keep the best of each (other processes share the CPU)
                plain_tok, tps, _ = measure(plain_eng, prompts, args.new_tokens)
                spec_tok, sps, st = measure(spec_eng, prompts, args.new_tokens)
                same = sum(a == b for a, b in zip(spec_tok, plain_tok))
                # fp32: verify and decode round alike, so greedy output must match exactly; bf16 rounds differently
                # over 1 and k+1 query positions, and a near-tie may flip: count identical replies instead
                assert same == len(plain_tok) or args.dtype != "float32", \
                    f"concurrency {c}: greedy output with the draft differs"
                best_plain = max(best_plain, tps)
                if sps > best_spec:
                    best_spec, stats = sps, st
            gen = sum(len(t) for t in plain_tok) / len(plain_tok)
            r = {"requests": len(prompts), "mean_reply_tokens": round(gen, 1), "plain_tok_s": round(best_plain, 1),
                 "draft_tok_s": round(best_spec, 1), "speedup": round(best_spec / best_plain, 3),
                 "mean_accept_length": round(stats["mean_accept_length"], 3),
                 "acceptance_rate": round(stats["acceptance_rate"], 3), "accepted_hist": stats["accepted_hist"],
                 "identical_replies": f"{same}/{len(plain_tok)}"}
            out["results"][str(c)] = r
            print(f"concurrency {c:>2}: plain {best_plain:7.1f} tok/s, with draft {best_spec:7.1f} tok/s "
                  f"(x{r['speedup']:.2f}), mean acceptance length {r['mean_accept_length']:.2f} "
                  f"(hist {r['accepted_hist']}), replies {gen:.0f} tokens", flush=True)
    out["speedup_c32"] = out["results"].get("32", {}).get("speedup")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

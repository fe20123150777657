"""`angelmed speedrun`: the whole AntAngelMed recipe at CPU scale, in one command.

    tokenizer -> CPT -> SFT -> GRPO -> MTP drafter, evaluating before CPT and after each stage, then the
    report card.

Everything lands in runs/<name>/: the tokenizer, one HF checkpoint per stage (<stage>/model), TensorBoard
logs, the resolved stage configs (<stage>.yaml, runnable on their own with `angelmed train <stage>`), eval
results (eval/*.json) and report.md. The last stage trains the final model's MTP layer as its speculative drafter
(`train draft --draft.kind mtp`: draft/best is the GRPO model with that layer trained, served with `--draft mtp`)
and measures the speed-up (bench_spec/mtp_draft.json). Rerunning the same command skips finished stages and
resumes an interrupted one from its last checkpoint. Without a data root it trains on the embedded ontologies
(HPO, ICD-10-CM) and the in-project safety prompts; with --data-root it adds MedQuAD, PubMedQA
abstracts, ChatDoctor, the Chinese dialogues, MedicalGPT and the HuatuoGPT-o1 prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from angelmed import MEDICAL_ADVISORY
from angelmed.paths import DATA_ROOT_ENV

# ---- configuration ---------------------------------------------------------------------------------
def load_speedrun_config(path: str | Path | None, smoke: bool) -> dict[str, Any]:
    from angelmed.assets import read_asset_text

    text = Path(path).read_text() if path else read_asset_text("speedrun.yaml")
    cfg = yaml.safe_load(text)
    if not isinstance(cfg, dict) or "stages" not in cfg:
        raise SystemExit(f"speedrun config {path or 'speedrun.yaml'}: expected a mapping with a 'stages' section")
    if smoke:
        cfg = _deep_merge(cfg, cfg.get("smoke", {}))
    cfg.pop("smoke", None)
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def stage_config(cfg: dict, stage: str, run_dir: Path, data_root: Path | None, tok) -> dict:
    """The stage's train config: its section, plus the paths and model shape the pipeline decides."""
    sc = copy.deepcopy(cfg["stages"][stage])
    extra = sc.pop("with_data_root", {})
    if data_root is not None:
        for key, items in extra.items():  # e.g. data.sources / grpo.prompts gain the shared datasets
            section, name = key.split(".")
            sc.setdefault(section, {}).setdefault(name, []).extend(items)
    sc["stage"] = stage
    sc.setdefault("data", {}).update(tokenizer=str(run_dir / "tokenizer"),
                                     data_root=str(data_root) if data_root else None)
    if stage == "draft":  # a DraftRunConfig: the final model is the frozen target
        sc["target"] = str(run_dir / "grpo" / "model")
        sc.setdefault("draft", {})["kind"] = "mtp"
        sc.setdefault("train", {}).update(out_dir=str(run_dir / stage), resume="auto")
        sc["train"].setdefault("seed", cfg.get("seed", 0))
        return sc
    model = sc.setdefault("model", {})
    prev = {"sft": "cpt", "grpo": "sft"}.get(stage)
    if prev:
        model["init_from"] = str(run_dir / prev / "model")
    else:
        model["preset"] = cfg["preset"]
        model.setdefault("overrides", {}).update(
            vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eod_id, bos_token_id=tok.bos_id)
    train = sc.setdefault("train", {})
    train.update(run_dir=str(run_dir / stage), resume="auto")
    train.setdefault("seed", cfg.get("seed", 0))
    return sc


# ---- stages ------------------------------------------------------------------------------------------
def tokenizer_corpus(data_root: Path | None, max_chars: int):
    """Training text for the tokenizer: ontology text and (with a data root) the training datasets."""
    from angelmed.data.sources import open_source

    specs = [("hpo", "cpt"), ("icd10cm", "cpt"), ("hpo", "sft"), ("icd10cm", "sft")]
    if data_root is not None:
        specs += [("medquad", "cpt"), ("pubmedqa", "cpt"), ("chatdoctor", "sft"),
                  ("chinese_medical_dialogue", "sft"), ("medicalgpt_samples", "sft"), ("huatuogpt_o1_demo", "sft")]
    budget = max_chars // len(specs)  # every source gets its share, so Chinese text is not crowded out
    for spec, role in specs:
        used = 0
        for rec in open_source(spec, role, data_root):
            text = rec.text if hasattr(rec, "text") else "\n".join(
                str(m.get("content") or "") + str(m.get("reasoning_content") or "") for m in rec.messages)
            yield text
            used += len(text)
            if used >= budget:
                break


def run_tokenizer(cfg: dict, run_dir: Path, data_root: Path | None) -> None:
    from angelmed.tokenizer import Tokenizer

    tc = cfg["tokenizer"]
    tok = Tokenizer.train(tokenizer_corpus(data_root, tc["max_chars"]), vocab_size=tc["vocab_size"])
    tok.save(run_dir / "tokenizer")
    print(f"tokenizer: {tok.vocab_size} tokens -> {run_dir / 'tokenizer'}")


def run_train_stage(stage: str, cfg: dict, run_dir: Path, data_root: Path | None, tok) -> None:
    from angelmed.checkpoint import atomic_write_text
    from angelmed.train.config import load_config

    path = run_dir / f"{stage}.yaml"
    atomic_write_text(path, yaml.safe_dump(stage_config(cfg, stage, run_dir, data_root, tok), sort_keys=False))
    if stage == "grpo":
        from angelmed.train import grpo
        from angelmed.train.grpo_config import load_grpo_config

        grpo.run(load_grpo_config(path))
    elif stage == "draft":
        from angelmed.train import draft

        dc = draft.load_draft_config(path)
        summary = draft.run(dc)
        speed = mtp_draft_speed(dc, summary, run_dir)
        print(f"MTP drafter: held-out acceptance length {speed['acceptance_before']:.2f} -> "
              f"{speed['acceptance_after']:.2f} (k={speed['k']}); batch 1: {speed['plain_tok_s']:.0f} -> "
              f"{speed['mtp_draft_tok_s']:.0f} tok/s (x{speed['speedup']:.2f})")
    else:
        module = __import__(f"angelmed.train.{stage}", fromlist=["run"])
        module.run(load_config(stage, path))


def mtp_draft_speed(dc, summary: dict, run_dir: Path) -> dict:
    """Greedy batch-1 decoding of the held-out prompts with and without the trained MTP drafter (eager, the
    engine's defaults): tok/s, the acceptance length, identical replies. Written to bench_spec/mtp_draft.json,
    which the report card's Speed table reads."""
    import torch

    from angelmed.checkpoint import atomic_write_text, load_model
    from angelmed.infer.engine import Engine, GenerationRequest
    from angelmed.infer.speculative import MTPDrafter
    from angelmed.train.draft import heldout_prompts, load_target_tokenizer

    best = Path(dc.train.out_dir) / "best"
    model = load_model(best, dtype="float32")
    tok = load_target_tokenizer(dc.data.tokenizer, dc.target, model.config.vocab_size)
    prompts = heldout_prompts(dc, tok, dc.train.eval_prompts, dc.data.seq_len)
    k, new = dc.train.eval_spec_tokens, dc.train.eval_max_tokens
    out = {}
    with torch.no_grad():
        for name, draft in (("plain", None), ("mtp_draft", MTPDrafter.for_checkpoint(model, best))):
            eng = Engine(model, max_batch=1, max_seq_len=max(map(len, prompts)) + new + k + 2,
                         stop_ids=list(tok.stop_ids), draft=draft, spec_tokens=k, prefix_reuse=False)
            eng.generate([GenerationRequest(p, max_tokens=new) for p in prompts[:2]])  # warm-up
            if eng.spec is not None:
                eng.spec.reset_stats()
            t0 = time.perf_counter()
            res = eng.generate([GenerationRequest(p, max_tokens=new) for p in prompts])
            dt = time.perf_counter() - t0
            out[name] = ([r.token_ids for r in res], sum(len(r.token_ids) for r in res) / dt,
                         eng.spec.stats.mean_accept_length if eng.spec is not None else None)
    speed = {"k": k, "acceptance_before": summary["initial"]["mean_accept_length"],
             "acceptance_after": summary["best"]["mean_accept_length"], "plain_tok_s": out["plain"][1],
             "mtp_draft_tok_s": out["mtp_draft"][1], "speedup": out["mtp_draft"][1] / out["plain"][1],
             "mean_accept_length": out["mtp_draft"][2],
             "identical_replies": sum(a == b for a, b in zip(out["plain"][0], out["mtp_draft"][0])),
             "replies": len(prompts)}
    atomic_write_text(run_dir / "bench_spec" / "mtp_draft.json", json.dumps(speed, indent=2) + "\n")
    return speed


# ---- evaluation after each stage -----------------------------------------------------------------------
def evaluate_stage(stage: str, cfg: dict, run_dir: Path, data_root: Path | None) -> dict:
    """Held-out perplexity, MCQ accuracy (log-likelihood), chat format, held-out reward, red-flag safety."""
    from angelmed.checkpoint import load_model
    from angelmed.eval import stage_eval
    from angelmed.tokenizer import Tokenizer

    ec = cfg["eval"]
    tok = Tokenizer.load(run_dir / "tokenizer")
    if stage == "init":  # the untrained starting point of CPT: the baseline every later stage is compared with
        from angelmed.checkpoint import atomic_write_text
        from angelmed.train.config import load_config
        from angelmed.train.loop import build_model

        path = run_dir / "cpt.yaml"
        atomic_write_text(path, yaml.safe_dump(stage_config(cfg, "cpt", run_dir, data_root, tok), sort_keys=False))
        model = build_model(load_config("cpt", path).model).float().eval()
    else:
        model = load_model(run_dir / stage / "model", dtype="float32")
    out_dir = run_dir / "eval"
    summary: dict[str, Any] = {"benchmark": "stage_checks", "stage": stage}
    summary["perplexity"] = stage_eval.heldout_perplexity(model, tok, data_root, ec["ppl_docs"], ec["ppl_len"])
    summary["mcq"] = {}
    for task in stage_eval.mcq_tasks(data_root, ec["mcq_items"]):
        result = stage_eval.mcq_loglik(model, tok, task, ec["mcq_items"])
        result["stage"] = stage
        stage_eval.write_json(out_dir / f"{stage}_mcq_{task.name}.json", result)
        summary["mcq"][task.name] = {"acc": result["acc"]["value"], "ci95": result["acc"]["ci95"],
                                     "n": result["n"], "chance": result["baselines"]["chance"],
                                     "majority": result["baselines"]["majority"]["acc"]}
    if stage in ("sft", "grpo"):  # chat behaviour only means something after SFT
        summary.update(stage_eval.chat_checks(model, tok, ec["gen_prompts"], ec["max_new_tokens"]))
    stage_eval.write_json(out_dir / f"{stage}_checks.json", summary)
    return summary


# ---- driver ------------------------------------------------------------------------------------------
def _done(run_dir: Path, name: str) -> bool:
    return (run_dir / ".done" / name).is_file()


def _mark(run_dir: Path, name: str, seconds: float) -> None:
    from angelmed.checkpoint import atomic_write_text

    atomic_write_text(run_dir / ".done" / name, json.dumps({"seconds": round(seconds, 1)}))


def _eta(cfg: dict, run_dir: Path, upcoming: list[str]) -> str:
    """Remaining time from the configured stage budgets, scaled by how the finished stages compared to theirs."""
    budgets = cfg.get("budget_s", {})
    spent = planned = 0.0
    for p in (run_dir / ".done").glob("*") if (run_dir / ".done").is_dir() else []:
        if p.name in budgets:
            spent += json.loads(p.read_text())["seconds"]
            planned += budgets[p.name]
    # trust the measured pace only once a real share of the plan has run, and never by more than 3x
    scale = min(max(spent / planned, 1 / 3), 3.0) if planned >= 120 else 1.0
    left = sum(budgets.get(s, 0) for s in upcoming) * scale
    return f"~{left / 60:.0f} min left" if left else "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="angelmed speedrun", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="speedrun YAML (default: the packaged configs/speedrun.yaml)")
    ap.add_argument("--data-root", help=f"medical datasets folder (default ${DATA_ROOT_ENV}; none = embedded only)")
    ap.add_argument("--name", default=None, help="run name (runs/<name>)")
    ap.add_argument("--runs", default="runs", help="parent folder of run directories")
    ap.add_argument("--smoke", action="store_true", help="seconds-long version of the same path (CI)")
    a = ap.parse_args(argv)
    from angelmed.paths import data_root as resolve_root

    data_root = resolve_root(a.data_root, required=False)
    cfg = load_speedrun_config(a.config, a.smoke)
    name = a.name or cfg.get("name", "speedrun") + ("-smoke" if a.smoke else "")
    run_dir = Path(a.runs) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    from angelmed.checkpoint import atomic_write_text

    atomic_write_text(run_dir / "speedrun.yaml", yaml.safe_dump(
        dict(cfg, data_root=str(data_root) if data_root else None), sort_keys=False))
    print(MEDICAL_ADVISORY)
    print(f"speedrun {name}: {run_dir} ({'data root ' + str(data_root) if data_root else 'embedded corpora only'})")
    t_start = time.time()
    plan = ["tokenizer", "eval_init", "cpt", "eval_cpt", "sft", "eval_sft", "grpo", "eval_grpo", "draft", "report"]
    tok = None
    for i, step in enumerate(plan):
        if step != "report" and _done(run_dir, step):
            print(f"[{i + 1}/{len(plan)}] {step}: done earlier, skipped")
            continue
        print(f"\n[{i + 1}/{len(plan)}] {step}  (elapsed {(time.time() - t_start) / 60:.1f} min, "
              f"{_eta(cfg, run_dir, plan[i:])})", flush=True)
        t0 = time.time()
        if step == "tokenizer":
            run_tokenizer(cfg, run_dir, data_root)
        elif step in ("cpt", "sft", "grpo", "draft"):
            if tok is None:
                from angelmed.tokenizer import Tokenizer

                tok = Tokenizer.load(run_dir / "tokenizer")
            run_train_stage(step, cfg, run_dir, data_root, tok)
        elif step.startswith("eval_"):
            s = evaluate_stage(step[5:], cfg, run_dir, data_root)
            print(_summary_line(s))
        else:
            from angelmed.eval.report import write_report

            path = write_report(run_dir)
            print(f"report card: {path}")
        if step != "report":
            _mark(run_dir, step, time.time() - t0)
    total = time.time() - t_start
    final = run_dir / "draft" / "best"  # the GRPO model, its MTP layer trained as the drafter
    print(f"\nspeedrun finished in {total / 60:.1f} min. Try the model:\n"
          f"  angelmed chat {final}\n  angelmed serve {final} --port 8000 --draft mtp\n"
          f"  angelmed eval mcq --model {final} --subset medqa --data-root DIR\n")
    return 0


def _summary_line(s: dict) -> str:
    parts = [f"{s['stage']}:"]
    for name, v in (s.get("perplexity") or {}).items():
        parts.append(f"ppl[{name}] {v['ppl']:.1f}")
    for name, v in s.get("mcq", {}).items():
        parts.append(f"{name} acc {v['acc']:.1%} (chance {v['chance']:.0%})")
    if "chat_format_rate" in s:
        parts.append(f"chat format {s['chat_format_rate']:.0%}")
    if "heldout_mcq_reward" in s:
        parts.append(f"held-out MCQ reward {s['heldout_mcq_reward']:.2f}")
    if "red_flag" in s:
        parts.append(f"red flags handled {s['red_flag']['guarded_rate']:.0%} (model alone {s['red_flag']['raw_rate']:.0%})")
    return " | ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())

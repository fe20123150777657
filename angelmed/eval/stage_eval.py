"""The checks the speedrun runs after each training stage, on data no stage trained on.

- held-out perplexity: the embedded ontologies' held-out split (and held-out MedQuAD answers with a data root);
- MCQ accuracy by log-likelihood: held-out ontology questions (and MedQA with a data root), with chance and
  majority baselines;
- chat behaviour (after SFT): replies that end with <|role_end|>, the MCQ reward on held-out questions asked in
  chat form, and red-flag safety cases with and without the safety layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from angelmed.eval.mcq_data import MCQItem, MCQTask

LETTERS = "ABCDEFGHIJ"


def write_json(path: Path, data: dict) -> None:
    from angelmed.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---- perplexity --------------------------------------------------------------------------------------
def heldout_documents(data_root: Path | None, n: int) -> dict[str, list[str]]:
    from angelmed.data.embedded import CORPORA

    docs = {"ontology": []}
    for corpus in ("hpo", "icd10cm"):
        for i, d in enumerate(CORPORA[corpus]("cpt", "heldout")):
            if i >= n // 2:
                break
            docs["ontology"].append(d.text)
    if data_root is not None:
        from angelmed.data.sources import open_source
        from angelmed.train.data import in_heldout

        # the same hashed share the CPT/SFT stages hold out (DataSection.heldout_fraction default)
        medquad = [d.text for d in open_source("medquad", "cpt", data_root) if in_heldout(d.id, 0.02)]
        docs["medquad_heldout"] = medquad[:n]
    return docs


@torch.no_grad()
def heldout_perplexity(model, tok, data_root: Path | None, n_docs: int, max_len: int) -> dict[str, dict]:
    """exp(mean token NLL) of each held-out document set; every document starts after an EOD token."""
    out = {}
    for name, texts in heldout_documents(data_root, n_docs).items():
        nll = count = 0.0
        for text in texts:
            ids = torch.tensor([[tok.eod_id] + tok.encode(text)[: max_len - 1]])
            if ids.shape[1] < 2:
                continue
            logp = model(ids[:, :-1]).logits.log_softmax(-1)
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids.shape[1] - 1
        if count:
            out[name] = {"ppl": math.exp(nll / count), "tokens": int(count), "docs": len(texts)}
    return out


# ---- multiple choice ------------------------------------------------------------------------------
def ontology_mcq_task(n: int) -> MCQTask:
    """Held-out HPO and ICD-10-CM questions (their terms and codes never appear in training)."""
    from angelmed.data.embedded import records

    items = []
    for corpus in ("icd10cm", "hpo"):
        for i, r in enumerate(records(corpus, "eval")):
            if i >= n // 2:
                break
            options = r.meta["options"]
            stem = r.messages[-1]["content"].split("\n\nA. ")[0]
            letters = sorted(options)
            items.append(MCQItem(id=r.id, question=stem, options=tuple(options[k] for k in letters),
                                 answer_index=letters.index(r.answer), subject=corpus))
    return MCQTask(name="ontology_heldout", items=items, source="embedded HPO + ICD-10-CM held-out split",
                   note="held-out ontology terms/codes, 4 options, distractors are siblings")


def mcq_tasks(data_root: Path | None, n: int) -> list[MCQTask]:
    tasks = [ontology_mcq_task(n)]
    if data_root is not None:
        from angelmed.eval.mcq_data import load_task

        tasks.append(load_task("medqa", data_root))
    return tasks


def mcq_loglik(model, tok, task: MCQTask, limit: int) -> dict:
    from angelmed.eval.backends import TorchLoglik
    from angelmed.eval.mcq import MCQConfig, evaluate_loglik

    backend = TorchLoglik(model, pad_id=tok.pad_id)
    return evaluate_loglik(task, backend, tok, MCQConfig(limit=limit))


# ---- chat behaviour -------------------------------------------------------------------------------
def chat_checks(model, tok, n_prompts: int, max_new_tokens: int) -> dict[str, Any]:
    from angelmed.data.embedded import records
    from angelmed.infer.engine import Engine, GenerationRequest
    from angelmed.rewards.registry import build_rewards
    from angelmed.rewards.base import combine
    from angelmed.safety import SafetyGuard, has_urgent_guidance
    from angelmed.tokenizer import with_default_system_prompt

    context = min(model.config.max_position_embeddings, 1024)

    def prompt_ids(messages: list[dict]) -> list[int] | None:  # None: too long for this model's context
        ids = tok.encode_chat(with_default_system_prompt(messages), add_generation_prompt=True)[0]
        return ids if len(ids) + max_new_tokens <= context else None

    questions, q_ids = [], []
    for corpus in ("icd10cm", "hpo"):
        taken = 0
        for r in records(corpus, "eval"):
            if taken >= n_prompts // 2:
                break
            ids = prompt_ids(r.messages)
            if ids is not None:
                questions.append(r)
                q_ids.append(ids)
                taken += 1
    red_flags, rf_ids = [], []
    for c in _safety_cases():
        ids = prompt_ids([{"role": "user", "content": c["text"]}]) if c["expect"] else None
        if ids is not None and len(red_flags) < n_prompts:
            red_flags.append(c)
            rf_ids.append(ids)
    engine = Engine(model, tok, max_batch=16, max_seq_len=context)
    reqs = [GenerationRequest(ids, max_tokens=max_new_tokens) for ids in q_ids + rf_ids]
    results = engine.generate(reqs)
    replies = [r.text for r in results]
    q_replies, rf_replies = replies[:len(questions)], replies[len(questions):]
    stopped = sum(r.finish_reason == "stop" for r in results) / max(len(results), 1)
    fns = build_rewards([{"name": "mcq", "weight": 1.0}])
    total, _ = combine(fns, [q.messages[-1]["content"] for q in questions], q_replies,
                       answer=[q.answer for q in questions], options=[q.meta["options"] for q in questions])
    rewards = [x for x in total if not math.isnan(x)]
    guard = SafetyGuard()
    raw = [has_urgent_guidance(r) for r in rf_replies]
    guarded = [has_urgent_guidance(guard.ensure_guidance(c["text"], r)) for c, r in zip(red_flags, rf_replies)]
    samples = [{"question": q.messages[-1]["content"][:300], "reply": r[:400]} for q, r in zip(questions[:3], q_replies)]
    return {
        "chat_format_rate": stopped,
        "heldout_mcq_reward": sum(rewards) / len(rewards) if rewards else float("nan"),
        "n_heldout_questions": len(questions),
        "red_flag": {"n": len(red_flags), "raw_rate": sum(raw) / max(len(raw), 1),
                     "guarded_rate": sum(guarded) / max(len(guarded), 1)},
        "samples": samples,
    }


def _safety_cases() -> list[dict]:
    path = Path(__file__).resolve().parent.parent / "assets" / "safety_cases.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

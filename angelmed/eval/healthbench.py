"""HealthBench run: sample candidate replies, grade every rubric item with the judge, score (evaluation.md §1).

The conversation shown to the grader is exactly what the candidate received (system prompt included) plus its
reply. Examples with any item the judge could not grade are excluded from the score and counted.

With no backend the candidate is the physicians' ideal completion of each example that has one (the reference's
physician_completions mode): the same judge's score for it is the anchor a model's score is read against.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from angelmed.eval.backends import ChatBackend
from angelmed.eval.healthbench_data import HealthBenchData, HealthBenchExample
from angelmed.eval.healthbench_score import aggregate, breakdown, example_metrics
from angelmed.eval.io import CompletionStore, content_key
from angelmed.judge import Judge, grader_prompt

DEFAULT_SYSTEM_PROMPT = "You are AntAngelMed, a helpful medical assistant."  # model.md §11


@dataclass
class HealthBenchConfig:
    n_examples: int | None = None  # subsample with random.Random(0).sample, as the reference's --examples
    n_repeats: int = 1  # each repeat is sampled and scored separately; values are pooled
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_tokens: int = 2048
    temperature: float = 0.0
    n_bootstrap: int = 1000
    bootstrap_seed: int = 0
    generation_chunk: int = 64  # candidate replies are saved to the completions store after every chunk


def select_examples(examples: list[HealthBenchExample], n_examples: int | None) -> list[HealthBenchExample]:
    if n_examples is None:
        return list(examples)
    if not 0 < n_examples <= len(examples):
        raise ValueError(f"--examples {n_examples}: must be between 1 and the {len(examples)} loaded examples")
    return random.Random(0).sample(examples, n_examples)


def candidate_conversation(example: HealthBenchExample, system_prompt: str | None) -> list[dict]:
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return prefix + [dict(m) for m in example.prompt]


def completion_id(prompt_id: str, response: str) -> str:
    return hashlib.sha256((prompt_id + response).encode("utf-8")).hexdigest()


def generate_candidates(conversations: list[list[dict]], backend: ChatBackend, candidate_name: str,
                        config: HealthBenchConfig, store: CompletionStore) -> list[str]:
    """Replies for each (conversation, repeat index) slot, reusing stored ones."""
    keys = [content_key(candidate_name, conv, config.max_tokens, config.temperature, slot)
            for slot, conv in enumerate(conversations)]
    missing = [i for i, k in enumerate(keys) if store.get(k) is None]
    for start in range(0, len(missing), config.generation_chunk):
        chunk = missing[start:start + config.generation_chunk]
        replies = backend.generate([conversations[i] for i in chunk], config.max_tokens, config.temperature)
        if len(replies) != len(chunk):
            raise RuntimeError(f"chat backend returned {len(replies)} replies for {len(chunk)} conversations")
        store.add({keys[i]: reply for i, reply in zip(chunk, replies)})
    return [store.get(k) for k in keys]


def ideal_completion(example: HealthBenchExample) -> str | None:
    text = (example.ideal_completions_data or {}).get("ideal_completion")
    return text if isinstance(text, str) and text.strip() else None


def run_healthbench(data: HealthBenchData, backend: ChatBackend | None, judge: Judge, config: HealthBenchConfig,
                    candidate_name: str, completions_path: str | Path | None = None) -> dict:
    """Full evaluation; returns the results dict (see `angelmed eval healthbench --out`). backend None: grade the
    physicians' ideal completions (examples without one are skipped and counted)."""
    examples = select_examples(data.examples, config.n_examples)
    n_without_ideal = 0
    if backend is None:
        n_without_ideal = sum(ideal_completion(ex) is None for ex in examples)
        examples = [ex for ex in examples if ideal_completion(ex) is not None]
    slots = [ex for _ in range(config.n_repeats) for ex in examples]
    conversations = [candidate_conversation(ex, config.system_prompt) for ex in slots]
    store = CompletionStore(completions_path)
    if backend is None:
        responses = [ideal_completion(ex) for ex in slots]
    else:
        responses = generate_candidates(conversations, backend, candidate_name, config, store)

    prompts, owners = [], []
    for slot, (ex, conv, response) in enumerate(zip(slots, conversations, responses)):
        graded_conversation = conv + [{"role": "assistant", "content": response}]
        for item in ex.rubrics:
            prompts.append(grader_prompt(graded_conversation, item.as_dict()))
            owners.append(slot)
    verdicts = judge.grade(prompts)

    per_slot: list[list[dict | None]] = [[] for _ in slots]
    for slot, verdict in zip(owners, verdicts):
        per_slot[slot].append(verdict)

    per_example, scored_metrics = [], []
    n_items_ungraded = 0
    for ex, response, slot_verdicts in zip(slots, responses, per_slot):
        ungraded = sum(v is None for v in slot_verdicts)
        n_items_ungraded += ungraded
        record = {"prompt_id": ex.prompt_id, "completion_id": completion_id(ex.prompt_id, response),
                  "theme": ex.theme, "n_items": len(ex.rubrics), "n_ungraded": ungraded}
        if ungraded == 0:
            met = [bool(v["criteria_met"]) for v in slot_verdicts]
            metrics = example_metrics(ex, met)
            scored_metrics.append(metrics)
            record.update(score=metrics["overall_score"], criteria_met=met)
        else:
            record.update(score=None, criteria_met=[None if v is None else bool(v["criteria_met"])
                                                    for v in slot_verdicts])
        per_example.append(record)

    metrics = aggregate(scored_metrics, config.n_bootstrap, config.bootstrap_seed) if scored_metrics else {}
    return {
        "benchmark": "healthbench",
        "source": data.source,
        "candidate": candidate_name,
        "judge_model": judge.model,
        "protocol": {**asdict(config), "judge_temperature": judge.temperature,
                     "judge_max_retries": judge.max_retries, "judge_max_tokens": judge.max_tokens},
        "score": metrics.get("score"),
        "score:bootstrap_std": metrics.get("score:bootstrap_std"),
        "n_samples": metrics.get("score:n_samples", 0),
        "n_examples": len(examples),
        "n_slots": len(slots),
        "n_excluded_ungraded": sum(r["score"] is None for r in per_example),
        "n_skipped_without_ideal_completion": n_without_ideal,
        "n_items_ungraded": n_items_ungraded,
        "themes": breakdown(metrics, "theme:"),
        "axes": breakdown(metrics, "axis:"),
        "levels": breakdown(metrics, "level:"),
        "metrics": metrics,
        "judge_stats": judge.stats.as_dict(),
        "bad_lines": data.bad_lines + store.bad_lines,
        "per_example": per_example,
    }

"""Multiple-choice scoring: lm-eval style log-likelihood (acc, acc_norm) and generative with answer extraction.

Every result carries its protocol (loglik/generative, shots, temperature), a 95% Wilson interval, the chance and
majority-class baselines, per-subject accuracy, and for PubMedQA macro-F1 with a bootstrap interval.

Self-consistency (generative, `samples` > 1): every question is answered `samples` times at temperature > 0 and the
most frequent parsed answer counts (ties: the one given first); the result adds the accuracy of the first sample
alone and how often the samples agree with the vote.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

from angelmed.eval.backends import ChatBackend, LoglikBackend, Tokenizer
from angelmed.extract import extract_choice, extract_label
from angelmed.eval.healthbench import DEFAULT_SYSTEM_PROMPT
from angelmed.eval.mcq_data import (LETTERS, PUBMEDQA_LABELS, MCQItem, MCQTask, choice_strings, generative_prompt,
                                    loglik_context, select_shots)
from angelmed.eval.stats import bootstrap_interval, macro_f1, majority_baseline, wilson_interval

TARGET_DELIMITER = " "


@dataclass
class MCQConfig:
    protocol: str = "loglik"  # loglik | generative
    shots: int = 0
    limit: int | None = None  # first N items
    max_tokens: int = 1024  # generative only
    temperature: float = 0.0  # generative only (greedy by default)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # generative only
    samples: int = 1  # generative only: answers per question, majority vote (self-consistency)
    n_bootstrap: int = 1000
    seed: int = 0  # bootstrap, and sampled answers (request i of a run uses seed + i)


def _items(task: MCQTask, config: MCQConfig) -> list[MCQItem]:
    return task.items[:config.limit] if config.limit is not None else list(task.items)


def loglik_requests(context: str, continuation: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Split on tokens: encode the whole string, the continuation is whatever follows the context's tokens."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    if n_context >= len(whole):
        raise ValueError(f"continuation {continuation!r} adds no tokens after the context")
    return whole[:n_context], whole[n_context:]


def predict_loglik(task: MCQTask, items: list[MCQItem], backend: LoglikBackend, tokenizer: Tokenizer,
                   shots: int) -> tuple[list[int], list[int]]:
    """(argmax of loglik, argmax of loglik / len(choice chars)) per item."""
    requests, owners, lengths = [], [], []
    for i, item in enumerate(items):
        context = loglik_context(task.name, item, select_shots(task, item, shots))
        for choice in choice_strings(task.name, item):
            requests.append(loglik_requests(context, TARGET_DELIMITER + choice, tokenizer))
            owners.append(i)
            lengths.append(len(choice))
    scores = backend.loglik(requests)
    per_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for owner, score, length in zip(owners, scores, lengths):
        per_item[owner].append((score, length))
    acc_pred = [max(range(len(s)), key=lambda j: s[j][0]) for s in per_item]
    norm_pred = [max(range(len(s)), key=lambda j: s[j][0] / s[j][1]) for s in per_item]
    return acc_pred, norm_pred


def predict_generative(task: MCQTask, items: list[MCQItem], backend: ChatBackend,
                       config: MCQConfig) -> list[list[int | None]]:
    """Parsed answers per item, `config.samples` of them (None: no answer found in that reply)."""
    if config.samples > 1 and config.temperature <= 0:
        raise ValueError(f"samples={config.samples} needs temperature > 0 (greedy answers would all agree)")
    conversations = []
    for item in items:
        turns = []
        for shot in select_shots(task, item, config.shots):
            answer = shot.options[shot.answer_index] if task.is_yes_no_maybe else shot.answer_letter
            turns += [{"role": "user", "content": generative_prompt(task.name, shot)},
                      {"role": "assistant", "content": f"The answer is {answer}."}]
        system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        conversations.append(system + turns + [{"role": "user", "content": generative_prompt(task.name, item)}])
    # all samples in one call, a question's samples side by side: the engine prefills each prompt once for them
    k = config.samples
    replies = backend.generate([c for c in conversations for _ in range(k)], config.max_tokens, config.temperature,
                               seed=config.seed if config.temperature > 0 else None)  # reproducible samples
    votes: list[list[int | None]] = [[] for _ in items]
    for n, reply in enumerate(replies):
        item = items[n // k]
        if task.is_yes_no_maybe:
            label = extract_label(reply)
            votes[n // k].append(PUBMEDQA_LABELS.index(label) if label else None)
        else:
            letter = extract_choice(reply, list(item.options))
            votes[n // k].append(LETTERS.index(letter) if letter else None)
    return votes


def majority(votes: list[int | None]) -> int | None:
    """The most frequent parsed answer; ties go to the one given first; None when no sample parsed."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(v for v in votes if v is not None and counts[v] == top)


def accuracy_block(gold: list[int], predicted: list[int | None]) -> dict:
    correct = sum(p == g for p, g in zip(predicted, gold))
    low, high = wilson_interval(correct, len(gold))
    return {"value": correct / len(gold) if gold else 0.0, "ci95": [low, high], "correct": correct}


def summarize(task: MCQTask, items: list[MCQItem], predicted: list[int | None], config: MCQConfig,
              acc_norm_predicted: list[int] | None = None) -> dict:
    gold = [item.answer_index for item in items]
    result: dict = {
        "benchmark": "mcq",
        "task": task.name,
        "source": task.source,
        "note": task.note,
        "protocol": asdict(config) if config.protocol == "generative" else
        {"protocol": "loglik", "shots": config.shots, "limit": config.limit, "target_delimiter": TARGET_DELIMITER},
        "n": len(items),
        "acc": accuracy_block(gold, predicted),
    }
    if acc_norm_predicted is not None:
        result["acc_norm"] = accuracy_block(gold, acc_norm_predicted)
    if config.protocol == "generative":
        unparsed = sum(p is None for p in predicted)
        result["parse_failure_rate"] = unparsed / len(items) if items else 0.0
    label_of = (lambda i: PUBMEDQA_LABELS[i]) if task.is_yes_no_maybe else (lambda i: LETTERS[i])
    majority_label, majority_acc = majority_baseline([label_of(g) for g in gold])
    result["baselines"] = {
        "chance": sum(1 / len(item.options) for item in items) / len(items) if items else 0.0,
        "majority": {"label": majority_label, "acc": majority_acc},
    }
    if task.is_yes_no_maybe:
        gold_labels = [PUBMEDQA_LABELS[g] for g in gold]
        pred_labels = [PUBMEDQA_LABELS[p] if p is not None else None for p in predicted]
        f1 = lambda g, p: macro_f1(g, p, PUBMEDQA_LABELS)  # noqa: E731
        result["macro_f1"] = {"value": f1(gold_labels, pred_labels),
                              "ci95": list(bootstrap_interval(gold_labels, pred_labels, f1, config.n_bootstrap,
                                                              config.seed))}
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for item, p in zip(items, predicted):
        if item.subject:
            by_subject[item.subject].append(p == item.answer_index)
    if len(by_subject) > 1:
        result["subjects"] = {s: {"acc": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items())}
    result["bad_lines"] = task.bad_lines
    result["predictions"] = [{"id": item.id, "gold": label_of(item.answer_index),
                              "pred": label_of(p) if p is not None else None}
                             for item, p in zip(items, predicted)]
    return result


def evaluate_loglik(task: MCQTask, backend: LoglikBackend, tokenizer: Tokenizer, config: MCQConfig) -> dict:
    items = _items(task, config)
    acc_pred, norm_pred = predict_loglik(task, items, backend, tokenizer, config.shots)
    return summarize(task, items, acc_pred, config, acc_norm_predicted=norm_pred)


def evaluate_generative(task: MCQTask, backend: ChatBackend, config: MCQConfig) -> dict:
    items = _items(task, config)
    votes = predict_generative(task, items, backend, config)
    predicted = [majority(v) for v in votes]
    result = summarize(task, items, predicted, config)
    if config.samples > 1:
        result["acc_first_sample"] = accuracy_block([item.answer_index for item in items], [v[0] for v in votes])
        agree = [sum(x == p for x in v) / len(v) for v, p in zip(votes, predicted) if p is not None]
        result["vote_agreement"] = sum(agree) / len(agree) if agree else 0.0
        for row, v in zip(result["predictions"], votes):
            row["votes"] = [None if x is None else (PUBMEDQA_LABELS[x] if task.is_yes_no_maybe else LETTERS[x])
                            for x in v]
    return result

"""Multiple-choice datasets in the ../shared/data layouts, and their lm-eval prompt formats (evaluation.md §2.1).

Every loader returns an `MCQTask`; malformed rows are skipped and listed in `bad_lines` ("file:line: reason").
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_LABELS = ["yes", "no", "maybe"]

CMMLU_SUBJECTS_ZH = {
    "anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学", "genetics": "遗传学", "nutrition": "营养学",
    "professional_medicine": "专业医学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
}
MMLU_SUBJECTS = ["anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine"]


@dataclass(frozen=True)
class MCQItem:
    id: str
    question: str
    options: tuple[str, ...]  # option texts in letter order (PubMedQA: yes/no/maybe)
    answer_index: int
    subject: str | None = None
    contexts: tuple[str, ...] = ()  # PubMedQA abstract sections

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer_index]


@dataclass
class MCQTask:
    name: str  # medqa | medmcqa | mmlu | mmlu_pro | pubmedqa | cmmlu
    items: list[MCQItem]
    fewshot_pool: dict[str | None, list[MCQItem]] = field(default_factory=dict)  # by subject (None = any)
    language: str = "en"
    source: str = ""
    note: str = ""  # comparability caveat printed next to the number
    bad_lines: list[str] = field(default_factory=list)

    @property
    def is_yes_no_maybe(self) -> bool:
        return self.name == "pubmedqa"


# --------------------------------------------------------------------------------------------------- loaders
MEDAGENTS_DIRS = {"medqa": "medqa", "medmcqa": "medmcqa", "mmlu": "mmlu", "mmlu_pro": "mmlu-pro"}
NOTES = {
    "medqa": "MedQA-USMLE 4-option test (1,273), same items as lm-eval medqa_4options",
    "medmcqa": "MedMCQA dev single-answer subset (2,816 of 4,183): not directly comparable with lm-eval medmcqa",
    "mmlu": "MMLU medical test, 6 subjects (1,089)",
    "mmlu_pro": "MMLU-Pro health (818, up to 10 options); scored MMLU-style, not with MMLU-Pro's CoT protocol",
    "pubmedqa": "PubMedQA PQA-L train/dev half (500); the official 500-item test split is held out and not here",
    "cmmlu": "CMMLU, 9 medical subjects (1,815 test)",
}


def load_task(name: str, data_root: Path, pubmedqa_file: Path | None = None) -> MCQTask:
    if name in MEDAGENTS_DIRS:
        task = load_medagents(name, data_root)
        if name == "mmlu":
            task.fewshot_pool, bad = load_mmlu_dev(data_root)
            task.bad_lines += bad
        return task
    if name == "pubmedqa":
        return load_pubmedqa(pubmedqa_file or data_root / "pubmedqa" / "ori_pqal_trainval.json")
    if name == "cmmlu":
        return load_cmmlu(data_root)
    raise ValueError(f"unknown MCQ task {name!r}; known: {', '.join(ALL_TASKS)}")


def load_medagents(name: str, data_root: Path) -> MCQTask:
    path = data_root / "medagentsbench" / MEDAGENTS_DIRS[name] / "test.jsonl"
    task = MCQTask(name=name, items=[], source=str(path), note=NOTES[name])
    with open(_existing(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                options = row["options"]
                letters = sorted(options)
                if not options or "".join(letters) != LETTERS[:len(letters)]:
                    raise ValueError(f"options keys {letters} are not consecutive letters from A")
                if row["answer_idx"] not in options:
                    raise ValueError(f"answer_idx {row['answer_idx']!r} is not an option letter")
                subject = row.get("subject") or ("health" if name == "mmlu_pro" else None)
                task.items.append(MCQItem(
                    id=str(row.get("realidx", lineno)), question=row["question"],
                    options=tuple(str(options[k]) for k in letters),
                    answer_index=letters.index(row["answer_idx"]), subject=subject))
            except json.JSONDecodeError as e:
                task.bad_lines.append(f"{path}:{lineno}: invalid JSON ({e.msg})")
            except (KeyError, TypeError, ValueError) as e:
                task.bad_lines.append(f"{path}:{lineno}: {type(e).__name__}: {e}")
    return task


def _read_letter_csv(path: Path, subject: str, has_header: bool, bad: list[str]) -> list[MCQItem]:
    """Rows of (question, A, B, C, D, answer letter); with a header, the CMMLU layout (index column first)."""
    items = []
    with open(_existing(path), encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row_no, row in enumerate(reader, start=1):
            if has_header and row_no == 1:
                continue
            fields = row[1:] if has_header else row
            if len(fields) != 6 or fields[5].strip() not in LETTERS[:4]:
                bad.append(f"{path}:{reader.line_num}: expected question,A,B,C,D,letter; got {len(fields)} fields")
                continue
            items.append(MCQItem(id=f"{subject}/{row_no}", question=fields[0], options=tuple(fields[1:5]),
                                 answer_index=LETTERS.index(fields[5].strip()), subject=subject))
    return items


def load_mmlu_dev(data_root: Path) -> tuple[dict[str | None, list[MCQItem]], list[str]]:
    bad: list[str] = []
    pool = {s: _read_letter_csv(data_root / "mmlu_medical" / "dev" / f"{s}_dev.csv", s, False, bad)
            for s in MMLU_SUBJECTS}
    return pool, bad


def load_cmmlu(data_root: Path) -> MCQTask:
    task = MCQTask(name="cmmlu", items=[], language="zh", source=str(data_root / "cmmlu_medical"),
                   note=NOTES["cmmlu"])
    for subject in CMMLU_SUBJECTS_ZH:
        task.items += _read_letter_csv(data_root / "cmmlu_medical" / "test" / f"{subject}.csv", subject, True,
                                       task.bad_lines)
        task.fewshot_pool[subject] = _read_letter_csv(data_root / "cmmlu_medical" / "dev" / f"{subject}.csv",
                                                      subject, True, task.bad_lines)
    return task


def load_pubmedqa(path: Path) -> MCQTask:
    """PQA-L in the pubmedqa repo's ori_pqal.json layout (dict keyed by PMID)."""
    task = MCQTask(name="pubmedqa", items=[], source=str(path), note=NOTES["pubmedqa"])
    with open(_existing(path), encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by PMID, got {type(data).__name__}")
    for pmid, record in data.items():
        try:
            label = record["final_decision"]
            if label not in PUBMEDQA_LABELS:
                raise ValueError(f"final_decision {label!r} is not yes/no/maybe")
            contexts = record["CONTEXTS"]
            if not isinstance(contexts, list):
                raise TypeError("CONTEXTS must be a list of strings")
            task.items.append(MCQItem(id=str(pmid), question=record["QUESTION"], options=tuple(PUBMEDQA_LABELS),
                                      answer_index=PUBMEDQA_LABELS.index(label),
                                      contexts=tuple(str(c) for c in contexts)))
        except (KeyError, TypeError, ValueError) as e:
            task.bad_lines.append(f"{path}: PMID {pmid}: {type(e).__name__}: {e}")
    return task


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (check --data-root)")
    return path


ALL_TASKS = ["medqa", "medmcqa", "mmlu", "mmlu_pro", "pubmedqa", "cmmlu"]


# --------------------------------------------------------------------------------------------------- prompts
def doc_to_text(task: str, item: MCQItem) -> str:
    """lm-eval `doc_to_text` for the task (the prompt ends with "Answer:" / "答案：")."""
    if task == "pubmedqa":
        return f"Abstract: {chr(10).join(item.contexts)}\nQuestion: {item.question}\nAnswer:"
    lines = "".join(f"{LETTERS[i]}. {text}\n" for i, text in enumerate(item.options))
    if task == "medqa":
        return f"Question: {item.question}\n{lines}Answer:"
    if task == "medmcqa":
        return f"Question: {item.question}\nChoices:\n{lines}Answer:"
    if task == "cmmlu":
        return f"{item.question.strip()}\n{lines}答案："
    return f"{item.question.strip()}\n{lines}Answer:"  # mmlu, mmlu_pro


def description(task: str, subject: str | None) -> str:
    if task in ("mmlu", "mmlu_pro") and subject:
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    if task == "cmmlu" and subject:
        return f"以下是关于{CMMLU_SUBJECTS_ZH.get(subject, subject)}的单项选择题，请直接给出正确答案的选项。\n\n"
    return ""


def choice_strings(task: str, item: MCQItem) -> list[str]:
    """The continuations scored by log-likelihood (before the target delimiter)."""
    return list(item.options) if task == "pubmedqa" else list(LETTERS[:len(item.options)])


def loglik_context(task: str, item: MCQItem, shots: list[MCQItem]) -> str:
    """description + shots ("text target" joined by blank lines) + blank line + this item's text."""
    shot_texts = [f"{doc_to_text(task, s)} {choice_strings(task, s)[s.answer_index]}" for s in shots]
    return description(task, item.subject) + "".join(t + "\n\n" for t in shot_texts) + doc_to_text(task, item)


def select_shots(task: MCQTask, item: MCQItem, k: int) -> list[MCQItem]:
    """First k exemplars of the item's subject from the dev pool (lm-eval `first_n`)."""
    if k == 0:
        return []
    pool = task.fewshot_pool.get(item.subject) or task.fewshot_pool.get(None)
    if not pool:
        raise ValueError(f"{task.name}: no few-shot pool for subject {item.subject!r}; use --shots 0")
    if len(pool) < k:
        raise ValueError(f"{task.name}: only {len(pool)} few-shot exemplars for {item.subject!r}, asked for {k}")
    return pool[:k]


def generative_prompt(task: str, item: MCQItem) -> str:
    """User message for chat models (HuatuoGPT-o1 style, with an explicit answer-format request)."""
    if task == "pubmedqa":
        return (f"Answer the research question using the abstract. Reply with yes, no or maybe, and end with "
                f"\"The answer is yes/no/maybe.\"\n\nAbstract: {chr(10).join(item.contexts)}\n"
                f"Question: {item.question}")
    options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(item.options))
    if task == "cmmlu":
        return f"请回答下面的单项选择题，最后以“答案是X”的形式给出选项字母。\n{item.question}\n{options}"
    return (f"Please answer the following multiple-choice question, ending with \"The answer is X\" where X is "
            f"the option letter.\n{item.question}\n{options}")

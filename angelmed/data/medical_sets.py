"""Loaders for the datasets under the shared data root (each folder's SOURCE.md describes its files).

Every loader has the signature `(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[record]`
where `root` is that dataset's folder. Which roles a dataset may serve is decided in `sources.py`, not here.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

from angelmed.data.formats import (
    BadRecord, check_messages, convert_rows, read_csv, read_json, read_jsonl, sharegpt_to_messages,
)
from angelmed.data.records import Conversation, Document, PromptRecord, SkipCounter

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MCQ_INSTRUCTION = "Answer with the letter of the correct option."
MCQ_INSTRUCTION_ZH = "请回答正确选项的字母。"


def format_mcq(question: str, options: dict[str, str], instruction: str = MCQ_INSTRUCTION) -> str:
    """The one plain-text rendering of a multiple-choice question used across angelmed's data."""
    lines = [question.strip(), ""] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines + ["", instruction]) if instruction else "\n".join(lines)


def mcq_record(question: str, options: dict[str, str], answer: str, source: str, rid: str,
               instruction: str = MCQ_INSTRUCTION, **meta: Any) -> PromptRecord:
    if answer not in options:
        raise BadRecord(f"answer {answer!r} is not one of the option letters {list(options)}")
    content = format_mcq(question, options, instruction)
    return PromptRecord(messages=[{"role": "user", "content": content}], source=source,
                        id=rid, answer=answer, meta={"options": options, "answer_text": options[answer], **meta})


def _clean(text: str) -> str:
    """Collapse the indentation noise of XML/CSV text while keeping paragraph and list line breaks."""
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _options(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):  # some dumps store the dict as its Python repr
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise BadRecord(f"{where}: options string is not a dict literal") from e
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        raise BadRecord(f"{where}: expected options as a non-empty {{letter: text}} object")
    return {str(k).strip(): v for k, v in value.items()}


# ---------------------------------------------------------------- MedQuAD (XML)


def medquad(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """CPT: one Document per XML document (focus title, then each question and its answer).
    SFT: one single-turn Conversation per answered QA pair."""
    files = sorted(root.glob("*/*.xml"))
    if not files:
        raise FileNotFoundError(f"{root}: no MedQuAD XML files (expected <source folder>/*.xml)")
    for path in files:
        try:
            doc = ET.parse(path).getroot()
        except ET.ParseError as e:
            skips.add(str(path), e.position[0], f"bad XML ({e})")
            continue
        focus = _clean(doc.findtext("Focus") or "")
        pairs = []
        for item_no, pair in enumerate(doc.iter("QAPair"), start=1):
            question, answer = pair.find("Question"), _clean(pair.findtext("Answer") or "")
            if question is None or not (question.text or "").strip():
                skips.add(str(path), item_no, "QAPair without Question text")
                continue
            if not answer:
                skips.add(str(path), item_no, "QAPair without Answer text")
                continue
            pairs.append((question.get("qid") or f"{doc.get('id')}-{item_no}", _clean(question.text),
                          question.get("qtype", ""), answer))
        if role == "cpt":
            if pairs:
                body = "\n\n".join(f"{q}\n{a}" for _, q, _, a in pairs)
                yield Document(text=f"{focus}\n\n{body}" if focus else body, source="medquad",
                               id=doc.get("id") or path.stem)
        else:
            for qid, q, _qtype, a in pairs:
                yield Conversation(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   source="medquad", id=qid)


# ---------------------------------------------------------------- PubMedQA PQA-L train/dev half


def pubmedqa(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """Only ori_pqal_trainval.json is read: the test half is held out (pubmedqa/SOURCE.md).
    CPT: the abstract (title question, labelled sections, conclusion). SFT: context + question -> conclusion and
    decision. RL/eval: the same prompt with the verifiable yes/no/maybe answer."""
    path = root / "ori_pqal_trainval.json"
    for item_no, row in read_json(path, skips):
        try:
            pmid = str(row["_key"])
            question, contexts, labels = row["QUESTION"], row["CONTEXTS"], row.get("LABELS") or []
            long_answer, decision = row["LONG_ANSWER"], row["final_decision"]
        except KeyError as e:
            skips.add(str(path), item_no, f"missing field {e.args[0]!r}")
            continue
        if not (isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)):
            skips.add(str(path), item_no, "field 'CONTEXTS': expected a list of strings")
            continue
        if decision not in ("yes", "no", "maybe"):
            skips.add(str(path), item_no, f"field 'final_decision': expected yes/no/maybe, got {decision!r}")
            continue
        sections = [f"{lab.title()}: {c}" if isinstance(lab, str) else c
                    for c, lab in zip(contexts, list(labels) + [None] * len(contexts))]
        if role == "cpt":
            yield Document(text="\n".join([question] + sections + [f"Conclusions: {long_answer}"]),
                           source="pubmedqa", id=pmid)
            continue
        prompt = ("Context:\n" + "\n".join(sections) + f"\n\nQuestion: {question}\n"
                  "Answer yes, no or maybe, with a short justification.")
        if role == "sft":
            yield Conversation(messages=[{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": f"{long_answer}\nAnswer: {decision}"}],
                               source="pubmedqa", id=pmid)
        else:
            yield PromptRecord(messages=[{"role": "user", "content": prompt}], source="pubmedqa", id=pmid,
                               answer=decision, meta={"choices": ["yes", "no", "maybe"], "reference": long_answer})


# ---------------------------------------------------------------- ChatDoctor


def _listish(value: str) -> str:
    """The disease table stores lists as Python reprs ("['a', 'b']"); render them as "a, b"."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = ast.literal_eval(value)
            if isinstance(items, list):
                return ", ".join(str(x).strip() for x in items if str(x).strip())
        except (ValueError, SyntaxError):
            pass
    return value.strip(" ,")


def chatdoctor(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """CPT: the 796-disease table as short documents. SFT: GenMedGPT-5k Alpaca records."""
    if role == "sft":
        path = root / "chatdoctor5k.json"
        yield from convert_rows(read_json(path, skips), "sft", "chatdoctor", str(path), skips)
        return
    path = root / "format_dataset.csv"
    fields = [("Symptom", "Symptoms"), ("reason", "Description"), ("TestsAndProcedures", "Tests and procedures"),
              ("commonMedications", "Common medications")]
    for line_no, row in read_csv(path, skips):
        disease = (row.get("disease") or "").strip()
        if not disease:
            skips.add(str(path), line_no, "empty field 'disease'")
            continue
        lines = [f"Disease: {disease}"]
        lines += [f"{label}: {v}" for key, label in fields if (v := _listish(row.get(key) or ""))]
        yield Document(text="\n".join(lines), source="chatdoctor", id=row.get("idx") or str(line_no))


# ---------------------------------------------------------------- Chinese medical dialogue (GB18030 CSV)


def chinese_medical_dialogue(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    files = sorted(root.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"{root}: no CSV files")
    for path in files:
        for line_no, row in read_csv(path, skips, encoding="gb18030"):
            title, ask, answer = (row.get(k, "").strip() for k in ("title", "ask", "answer"))
            if not answer or not (ask or title):
                skips.add(str(path), line_no, "empty 'ask'/'title' or 'answer'")
                continue
            question = ask if (not title or title in ask) else f"{title}\n{ask}"
            yield Conversation(messages=[{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}],
                               source="chinese_medical_dialogue", id=f"{path.name}:{line_no}")


# ---------------------------------------------------------------- MedicalGPT samples


def medicalgpt_samples(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """SFT: ShareGPT medical_sft_1K_format.jsonl. RL: grpo_sample.jsonl {question, answer} (free-text reference)."""
    if role == "sft":
        path = root / "medical_sft_1K_format.jsonl"
        yield from convert_rows(read_jsonl(path, skips), "sft", "medicalgpt_samples", str(path), skips)
        return
    path = root / "grpo_sample.jsonl"
    for line_no, row in read_jsonl(path, skips):
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
            skips.add(str(path), line_no, "expected string fields 'question' and 'answer'")
            continue
        yield PromptRecord(messages=[{"role": "user", "content": q}], source="medicalgpt_samples",
                           id=f"grpo:{line_no}", answer=a, meta={"answer_kind": "reference_text"})


# ---------------------------------------------------------------- HuatuoGPT-o1 demo


def huatuogpt_o1_demo(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """SFT: open-ended Question -> Response with Complex_CoT as reasoning_content.
    RL: the MCQ form with its verifiable option letter; meta also keeps the open-ended question and its
    ground-truth answer for string-match rewards."""
    path = root / "demo_data.json"
    for item_no, row in read_json(path, skips):
        rid = f"huatuo:{item_no}"
        try:
            if role == "sft":
                q, cot, resp = row.get("Question"), row.get("Complex_CoT"), row.get("Response")
                if not all(isinstance(x, str) and x.strip() for x in (q, cot, resp)):
                    raise BadRecord("expected non-empty string fields 'Question', 'Complex_CoT', 'Response'")
                yield Conversation(messages=[{"role": "user", "content": q},
                                             {"role": "assistant", "content": resp, "reasoning_content": cot}],
                                   source="huatuogpt_o1_demo", id=rid)
            else:
                question, answer = row.get("question"), row.get("answer_idx")
                if not isinstance(question, str) or not isinstance(answer, str):
                    raise BadRecord("expected string fields 'question' and 'answer_idx'")
                yield mcq_record(question, _options(row.get("options"), "options"), answer.strip(),
                                 "huatuogpt_o1_demo", rid, open_question=row.get("Open-ended Verifiable Question"),
                                 ground_truth=row.get("Ground-True Answer"))
        except BadRecord as e:
            skips.add(str(path), item_no, str(e))


# ---------------------------------------------------------------- evaluation sets (role "eval" only)


def medagentsbench(subset: str, source: str):
    def load(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
        path = root / subset / "test.jsonl"
        for line_no, row in read_jsonl(path, skips):
            try:
                question, answer = row.get("question"), row.get("answer_idx")
                if not isinstance(question, str) or not isinstance(answer, str):
                    raise BadRecord("expected string fields 'question' and 'answer_idx'")
                meta = {k: row[k] for k in ("subject", "category", "meta_info", "realidx") if k in row}
                yield mcq_record(question, _options(row.get("options"), "options"), answer, source,
                                 f"{source}:{row.get('realidx', line_no)}", **meta)
            except BadRecord as e:
                skips.add(str(path), line_no, str(e))
    return load


def mmlu_medical_csv(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """The headerless dev/val CSVs (question, A, B, C, D, letter): few-shot exemplars and dev checks."""
    split = split or "dev"
    for path in sorted((root / split).glob("*.csv")):
        subject = path.stem.rsplit("_", 1)[0]
        for line_no, row in read_csv(path, skips, header=False, fieldnames=["q", "A", "B", "C", "D", "answer"]):
            try:
                yield mcq_record(row["q"], {k: row[k] for k in "ABCD"}, row["answer"].strip(), "mmlu_medical",
                                 f"mmlu:{split}:{subject}:{line_no}", subject=subject, split=split)
            except BadRecord as e:
                skips.add(str(path), line_no, str(e))


def cmmlu_medical(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    split = split or "test"
    for path in sorted((root / split).glob("*.csv")):
        for line_no, row in read_csv(path, skips):
            try:
                if not all(isinstance(row.get(k), str) for k in ("Question", "A", "B", "C", "D", "Answer")):
                    raise BadRecord("expected columns Question, A, B, C, D, Answer")
                yield mcq_record(row["Question"], {k: row[k] for k in "ABCD"}, row["Answer"].strip(),
                                 "cmmlu_medical", f"cmmlu:{split}:{path.stem}:{line_no}",
                                 instruction=MCQ_INSTRUCTION_ZH, subject=path.stem, split=split)
            except BadRecord as e:
                skips.add(str(path), line_no, str(e))


def healthbench(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """Conversation prompts with their rubrics in meta (rubrics, example_tags, ideal_completions_data, canary)."""
    path = root / "healthbench.jsonl"
    for line_no, row in read_jsonl(path, skips):
        try:
            messages = check_messages(row.get("prompt"), "prompt")
            if not isinstance(row.get("rubrics"), list):
                raise BadRecord("field 'rubrics': expected a list")
            meta = {k: row.get(k) for k in ("rubrics", "example_tags", "ideal_completions_data", "canary")}
            yield PromptRecord(messages=messages, source="healthbench", id=str(row.get("prompt_id", line_no)),
                               meta=meta)
        except BadRecord as e:
            skips.add(str(path), line_no, str(e))


def cmb_clin(root: Path, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
    """One prompt per question: the case description, the earlier questions of the case with their reference
    answers as prior turns, then the question; meta.reference is its reference answer."""
    path = root / "CMB-test-qa.json"
    for item_no, case in read_json(path, skips):
        try:
            desc, pairs = case.get("description"), case.get("QA_pairs")
            if not isinstance(desc, str) or not isinstance(pairs, list):
                raise BadRecord("expected 'description' (string) and 'QA_pairs' (list)")
            history: list[dict[str, str]] = []
            for q_no, pair in enumerate(pairs, start=1):
                q, a = pair.get("question"), pair.get("answer")
                if not isinstance(q, str) or not isinstance(a, str):
                    raise BadRecord(f"QA_pairs[{q_no - 1}]: expected string 'question' and 'answer'")
                first = f"{desc}\n\n{q}" if not history else q
                messages = history + [{"role": "user", "content": first}]
                yield PromptRecord(messages=messages, source="cmb_clin", id=f"cmb:{case.get('id', item_no)}:{q_no}",
                                   meta={"reference": a, "title": case.get("title")})
                history = messages + [{"role": "assistant", "content": a}]
        except BadRecord as e:
            skips.add(str(path), item_no, str(e))


__all__ = [
    "format_mcq", "mcq_record", "medquad", "pubmedqa", "chatdoctor", "chinese_medical_dialogue",
    "medicalgpt_samples", "huatuogpt_o1_demo", "medagentsbench", "mmlu_medical_csv", "cmmlu_medical",
    "healthbench", "cmb_clin", "sharegpt_to_messages",
]

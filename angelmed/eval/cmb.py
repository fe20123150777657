"""CMB-Clin: Chinese clinical cases answered as a multi-turn conversation and rated by an LLM judge
(evaluation.md §3).

Protocol: the first user turn is "以下是一位病人的病例：\\n<description>\\n<question 1>"; each later question is a new
user turn with the model's previous answers kept in the history. The judge sees the case, the conversation so far,
the question, the reference answer and the model's answer, and returns JSON with four integer ratings on 1-5:
fluency, relevance, completeness, proficiency (medical proficiency). We report the mean of each over the graded
questions and the mean of the four ("overall", also on 1-5). Questions the judge could not rate within the retry cap
are excluded and counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from angelmed.eval.backends import ChatBackend
from angelmed.eval.healthbench import DEFAULT_SYSTEM_PROMPT
from angelmed.eval.io import CompletionStore, content_key
from angelmed.judge import Judge, fill_template, parse_json_reply

CRITERIA = ("fluency", "relevance", "completeness", "proficiency")
CASE_PREFIX = "以下是一位病人的病例："

CMB_JUDGE_TEMPLATE = """
你是一名资深临床医生，负责评审AI助手对临床病例问题的回答。请对照参考答案，从以下四个方面为“待评回答”打分，每项为1到5的整数：

1. fluency（流畅性）：1分表示语句破碎、难以读懂；5分表示表达通顺自然，与专业人士书写无异。
2. relevance（相关性）：1分表示与问题无关；5分表示紧扣问题、切中要点。
3. completeness（完整性）：1分表示严重缺漏、几乎未覆盖参考答案的要点；5分表示完整覆盖参考答案的全部要点。
4. proficiency（医学专业性）：1分表示只用日常语言、缺乏医学知识或存在错误；5分表示医学术语使用恰当、医学知识完全正确。

[病例]
<<description>>
[/病例]

[此前的对话]
<<history>>
[/此前的对话]

[问题]
<<question>>
[/问题]

[参考答案]
<<reference>>
[/参考答案]

[待评回答]
<<answer>>
[/待评回答]

只输出一个JSON对象，不要输出其他任何内容，格式如下：
{"fluency": 整数, "relevance": 整数, "completeness": 整数, "proficiency": 整数}
""".strip()


@dataclass
class CMBCase:
    id: str
    title: str
    description: str
    qa_pairs: list[tuple[str, str]]  # (question, reference answer)


@dataclass
class CMBData:
    source: str
    cases: list[CMBCase]
    bad_records: list[str] = field(default_factory=list)

    @property
    def n_questions(self) -> int:
        return sum(len(c.qa_pairs) for c in self.cases)


@dataclass
class CMBConfig:
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_tokens: int = 2048
    temperature: float = 0.0
    limit: int | None = None  # first N cases


def load_cmb_clin(path: str | Path) -> CMBData:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CMB-Clin file not found: {path} (check --data-root)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of cases, got {type(records).__name__}")
    data = CMBData(source=str(path), cases=[])
    for index, record in enumerate(records):
        try:
            pairs = []
            for qa in record["QA_pairs"]:
                answer = qa.get("answer", qa.get("solution"))  # the README calls the field "solution"
                if not isinstance(qa["question"], str) or not isinstance(answer, str):
                    raise TypeError("QA pair needs string 'question' and 'answer'/'solution'")
                pairs.append((qa["question"], answer))
            if not pairs or not isinstance(record["description"], str):
                raise ValueError("case needs a description and at least one QA pair")
            data.cases.append(CMBCase(str(record.get("id", index)), str(record.get("title", "")),
                                      record["description"], pairs))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            data.bad_records.append(f"{path}: case #{index}: {type(e).__name__}: {e}")
    return data


def first_turn(case: CMBCase) -> str:
    return f"{CASE_PREFIX}\n{case.description}\n{case.qa_pairs[0][0]}"


def judge_prompt(case: CMBCase, turn: int, answers: list[str]) -> str:
    history = "\n\n".join(f"问：{case.qa_pairs[i][0]}\n答：{answers[i]}" for i in range(turn)) or "（无）"
    question, reference = case.qa_pairs[turn]
    return fill_template(CMB_JUDGE_TEMPLATE, {"description": case.description, "history": history,
                                              "question": question, "reference": reference,
                                              "answer": answers[turn]})


def parse_ratings(text: str) -> dict[str, int] | None:
    data = parse_json_reply(text)
    if not isinstance(data, dict):
        return None
    ratings = {}
    for name in CRITERIA:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            return None
        ratings[name] = value
    return ratings


def generate_answers(cases: list[CMBCase], backend: ChatBackend, candidate_name: str, config: CMBConfig,
                     store: CompletionStore) -> list[list[str]]:
    """Turn by turn, batched across cases: turn t of every case is asked once turn t-1 is answered."""
    answers: list[list[str]] = [[] for _ in cases]
    history: list[list[dict]] = [
        [{"role": "system", "content": config.system_prompt}] if config.system_prompt else [] for _ in cases]
    for turn in range(max(len(c.qa_pairs) for c in cases)):
        active = [i for i, c in enumerate(cases) if turn < len(c.qa_pairs)]
        for i in active:
            content = first_turn(cases[i]) if turn == 0 else cases[i].qa_pairs[turn][0]
            history[i].append({"role": "user", "content": content})
        keys = {i: content_key(candidate_name, history[i], config.max_tokens, config.temperature) for i in active}
        missing = [i for i in active if store.get(keys[i]) is None]
        if missing:
            replies = backend.generate([history[i] for i in missing], config.max_tokens, config.temperature)
            store.add({keys[i]: r for i, r in zip(missing, replies)})
        for i in active:
            reply = store.get(keys[i])
            answers[i].append(reply)
            history[i].append({"role": "assistant", "content": reply})
    return answers


def run_cmb_clin(data: CMBData, backend: ChatBackend, judge: Judge, config: CMBConfig, candidate_name: str,
                 completions_path: str | Path | None = None) -> dict:
    cases = data.cases[:config.limit] if config.limit is not None else data.cases
    store = CompletionStore(completions_path)
    answers = generate_answers(cases, backend, candidate_name, config, store)
    prompts, owners = [], []
    for c, case in enumerate(cases):
        for turn in range(len(case.qa_pairs)):
            prompts.append(judge_prompt(case, turn, answers[c]))
            owners.append((case.id, turn))
    ratings = judge.ask_json(prompts, parse_ratings)
    graded = [r for r in ratings if r is not None]
    means = {name: sum(r[name] for r in graded) / len(graded) if graded else None for name in CRITERIA}
    overall = sum(means.values()) / len(CRITERIA) if graded else None
    return {
        "benchmark": "cmb_clin",
        "source": data.source,
        "candidate": candidate_name,
        "judge_model": judge.model,
        "protocol": {**asdict(config), "scale": "1-5 per criterion; overall = mean of the four",
                     "judge_temperature": judge.temperature, "judge_max_retries": judge.max_retries},
        "score": overall,
        "criteria": means,
        "n_cases": len(cases),
        "n_questions": len(prompts),
        "n_graded": len(graded),
        "n_ungraded": len(prompts) - len(graded),
        "judge_stats": judge.stats.as_dict(),
        "bad_lines": data.bad_records + store.bad_lines,
        "per_question": [{"case_id": cid, "turn": t, "ratings": r} for (cid, t), r in zip(owners, ratings)],
    }

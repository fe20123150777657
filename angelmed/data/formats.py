"""Generic file formats and row schemas: JSONL / JSON / CSV / text readers that skip and count bad records,
and the conversion of one row (a dict) into a Document, Conversation or PromptRecord by role."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from angelmed.data.records import BadRecord, Conversation, Document, PromptRecord, SkipCounter

Row = dict[str, Any]

# ShareGPT speaker names -> OpenAI roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
    "observation": "tool", "function": "tool", "tool": "tool",
}
OPENAI_ROLES = {"system", "user", "assistant", "tool"}
ANSWER_KEYS = ("answer", "solution", "ground_truth", "reference_answer", "label")


# ---------------------------------------------------------------- readers: (location, row) pairs, bad rows counted


def read_jsonl(path: Path, skips: SkipCounter) -> Iterator[tuple[int, Row]]:
    """One JSON object per line; blank lines are ignored, anything else that is not an object is skipped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.add(str(path), line_no, f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                skips.add(str(path), line_no, f"bad JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                skips.add(str(path), line_no, f"expected a JSON object, got {type(row).__name__}")
                continue
            yield line_no, row


def read_json(path: Path, skips: SkipCounter) -> Iterator[tuple[int, Row]]:
    """A JSON array of objects, or an object of objects keyed by id (the key is kept as row["_key"]).
    Locations are 1-based item numbers. A file that is not valid JSON at all is an error, not a skip."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid UTF-8 JSON file ({e})") from e
    if isinstance(data, dict):
        items: list[Any] = [dict(v, _key=k) if isinstance(v, dict) else v for k, v in data.items()]
    elif isinstance(data, list):
        items = data
    else:
        raise ValueError(f"{path}: expected a JSON array or object at top level, got {type(data).__name__}")
    for item_no, row in enumerate(items, start=1):
        if not isinstance(row, dict):
            skips.add(str(path), item_no, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield item_no, row


def read_csv(path: Path, skips: SkipCounter, encoding: str = "utf-8", header: bool = True,
             fieldnames: list[str] | None = None) -> Iterator[tuple[int, Row]]:
    """CSV rows as dicts. Decoding is per physical line so one undecodable line skips only its record.
    Locations are the 1-based line on which the record starts."""
    bad_lines: set[int] = set()

    def decoded_lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    yield raw.decode(encoding)
                except UnicodeDecodeError:
                    bad_lines.add(line_no)
                    yield raw.decode(encoding, errors="replace")

    reader = csv.reader(decoded_lines())
    names = fieldnames
    start = 1
    for fields in reader:
        end = reader.line_num
        span = range(start, end + 1)
        line_no, start = start, end + 1
        if names is None and header:
            names = [n.strip() for n in fields]
            if any(n in bad_lines for n in span):
                raise ValueError(f"{path}: header line is not valid {encoding}")
            continue
        if any(n in bad_lines for n in span):
            skips.add(str(path), line_no, f"undecodable as {encoding}")
            continue
        if not fields or all(not f.strip() for f in fields):
            continue
        if names is None:
            names = [str(i) for i in range(len(fields))]
        if len(fields) != len(names):
            skips.add(str(path), line_no, f"expected {len(names)} CSV fields, got {len(fields)}")
            continue
        yield line_no, dict(zip(names, fields))


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_hf(name: str, split: str = "train") -> Iterator[tuple[int, Row]]:
    """Rows of a Hugging Face dataset, streamed (nothing is downloaded up front)."""
    try:
        import datasets  # optional dependency: pip install 'angelmed[hf]'
    except ImportError as e:
        raise ImportError(
            f"reading hf:{name} needs the 'datasets' package, which is not installed: pip install datasets "
            "(or pip install 'angelmed[hf]')"
        ) from e
    config = None
    if "@" in name:  # hf:org/name@config:split
        name, config = name.split("@", 1)
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


# ---------------------------------------------------------------- row -> record


def _str_field(row: Row, key: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r}: expected string, got {type(value).__name__}")
    return value


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """Validate OpenAI-style messages; returns shallow copies holding only the keys the renderer uses."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"field {where!r}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"{where}[{i}]: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in OPENAI_ROLES:
            raise BadRecord(f"{where}[{i}].role: expected one of {sorted(OPENAI_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise BadRecord(f"{where}[{i}]: missing 'content'")
        if content is not None and not isinstance(content, str):
            raise BadRecord(f"{where}[{i}].content: expected string, got {type(content).__name__}")
        msg = {k: m[k] for k in ("role", "content", "reasoning_content", "tool_calls", "name", "tool_call_id")
               if k in m and m[k] is not None}
        msg.setdefault("content", "")
        if "reasoning_content" in msg and not isinstance(msg["reasoning_content"], str):
            raise BadRecord(f"{where}[{i}].reasoning_content: expected string")
        out.append(msg)
    return out


def sharegpt_to_messages(turns: Any) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field 'conversations': expected a non-empty list, got {type(turns).__name__}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRecord(f"conversations[{i}]: expected an object, got {type(t).__name__}")
        speaker = t.get("from", t.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise BadRecord(f"conversations[{i}].from: unknown speaker {speaker!r}")
        value = t.get("value", t.get("content"))
        if not isinstance(value, str):
            raise BadRecord(f"conversations[{i}].value: expected string, got {type(value).__name__}")
        messages.append({"role": role, "content": value})
    return messages


def alpaca_prompt(row: Row) -> str:
    instruction = _str_field(row, "instruction") or ""
    extra = _str_field(row, "input", required=False) or ""
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction or extra)
    if not prompt.strip():
        raise BadRecord("empty 'instruction' and 'input'")
    return prompt


def _prompt_messages(value: Any, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return check_messages(value, key)


def row_to_conversation(row: Row, source: str, rid: str) -> Conversation:
    """messages | conversations (ShareGPT) | instruction/input/output (Alpaca) | prompt/completion."""
    system = _str_field(row, "system", required=False)
    tools = row.get("tools") if isinstance(row.get("tools"), list) else None
    if "messages" in row:
        messages = check_messages(row["messages"])
    elif "conversations" in row:
        messages = sharegpt_to_messages(row["conversations"])
    elif "output" in row and ("instruction" in row or "input" in row):
        messages = [{"role": "user", "content": alpaca_prompt(row)},
                    {"role": "assistant", "content": _str_field(row, "output")}]
    elif "prompt" in row and "completion" in row:
        completion = row["completion"]
        tail = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                else check_messages(completion, "completion"))
        messages = _prompt_messages(row["prompt"], "prompt") + tail
    else:
        raise BadRecord("no conversation fields: expected 'messages', 'conversations', "
                        "'instruction'+'output' or 'prompt'+'completion'")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("conversation has no assistant turn (nothing to learn)")
    return Conversation(messages=messages, source=source, id=rid, tools=tools)


def row_to_document(row: Row, source: str, rid: str) -> Document:
    text = _str_field(row, "text")
    if not text.strip():
        raise BadRecord("empty 'text'")
    return Document(text=text, source=source, id=rid)


def row_to_prompt(row: Row, source: str, rid: str) -> PromptRecord:
    """prompt (string or messages) | question | instruction/input | messages | conversations; the answer from
    answer | solution | ground_truth | reference_answer | label. A trailing assistant turn becomes meta.reference."""
    meta: dict[str, Any] = {}
    if "prompt" in row:
        messages = _prompt_messages(row["prompt"], "prompt")
    elif "question" in row:
        messages = [{"role": "user", "content": _str_field(row, "question")}]
    elif "instruction" in row:
        messages = [{"role": "user", "content": alpaca_prompt(row)}]
    elif "messages" in row or "conversations" in row:
        messages = (check_messages(row["messages"]) if "messages" in row
                    else sharegpt_to_messages(row["conversations"]))
        while messages and messages[-1]["role"] == "assistant":
            meta.setdefault("reference", messages.pop()["content"])
    else:
        raise BadRecord("no prompt fields: expected 'prompt', 'question', 'instruction' or 'messages'")
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("prompt must end with a user turn")
    answer = None
    for key in ANSWER_KEYS:
        if row.get(key) is not None:
            answer = row[key] if isinstance(row[key], str) else json.dumps(row[key], ensure_ascii=False)
            break
    extra = {k: v for k, v in row.items() if k not in ("prompt", "question", "messages", "conversations")
             and k not in ANSWER_KEYS and not k.startswith("_")}
    meta.update(extra)
    return PromptRecord(messages=messages, source=source, id=rid, answer=answer, meta=meta)


ROW_CONVERTERS: dict[str, Callable[[Row, str, str], Any]] = {
    "cpt": row_to_document,
    "sft": row_to_conversation,
    "rl": row_to_prompt,
    "eval": row_to_prompt,
}


def convert_rows(rows: Iterator[tuple[int, Row]], role: str, source: str, file: str,
                 skips: SkipCounter) -> Iterator[Any]:
    """Apply the role's converter; BadRecord skips the row and counts it at its location."""
    convert = ROW_CONVERTERS[role]
    for loc, row in rows:
        rid = str(row.get("id", row.get("_key", f"{Path(file).name}:{loc}")))
        try:
            yield convert(row, source, rid)
        except BadRecord as e:
            skips.add(file, loc, str(e))


def read_file_rows(path: Path, skips: SkipCounter) -> Iterator[tuple[int, Row]]:
    """Rows of a .jsonl / .json / .csv file (text files are not row files)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, skips)
    if suffix == ".json":
        return read_json(path, skips)
    if suffix == ".csv":
        return read_csv(path, skips)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json, .csv or .txt)")


def text_documents(paths: list[Path], source: str) -> Iterator[Document]:
    """Each .txt file is one document."""
    for p in paths:
        text = read_text(p)
        if text.strip():
            yield Document(text=text, source=source, id=p.name)


__all__ = [
    "read_jsonl", "read_json", "read_csv", "read_text", "read_hf", "check_messages", "sharegpt_to_messages",
    "row_to_conversation", "row_to_document", "row_to_prompt", "convert_rows", "read_file_rows",
    "text_documents",
]

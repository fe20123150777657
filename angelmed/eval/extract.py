"""Answer extraction for generative multiple-choice scoring (evaluation.md §2.3, our cascade).

1. Drop reasoning: keep what follows the last "</think>" or "## Final Response".
2. Explicit phrases ("the answer is (B)", "Answer: B", "correct option is B", "答案是B", "答案：B", "选B").
3. A bare standalone option letter ("(B)", "**B**", "B.").
4. Exact (case-insensitive) option text.
The last match of the first stage that matches wins. No similarity fallback unless asked for.
"""

from __future__ import annotations

import difflib
import re

LETTERS = "ABCDEFGHIJKLMNOP"
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_OPEN = r"[\s:：\(\[（【\*\"'“‘]*"  # punctuation allowed between a phrase and its letter
_AFTER = rf"(?![A-Za-z0-9])"  # the letter stands alone (a CJK character may follow)

_EXPLICIT = [
    # English: "answer is B", "answer: (B)", "correct option is B", "best choice would be **B**"
    re.compile(rf"(?i:answer|option|choice)\s*(?i:is|would\s+be|should\s+be|:|：)\s*(?i:option\s+|choice\s+)?"
               rf"{_OPEN}([A-Z]){_AFTER}"),
    # Chinese: "答案是B", "答案为B", "答案：B", "答案应该选B", "正确选项是B"
    re.compile(rf"答案\s*(?:应该|应)?\s*(?:是|为|选)?{_OPEN}([A-Z]){_AFTER}"),
    re.compile(rf"选项\s*(?:应该|应)?\s*(?:是|为){_OPEN}([A-Z]){_AFTER}"),
    # "选B", "故选B", "选择 C"; "选项B" does not match (项 sits between 选 and the letter)
    re.compile(rf"选(?:择)?{_OPEN}([A-Z]){_AFTER}"),
]

# A letter preceded by start, whitespace, punctuation or a CJK character and followed by a non-letter.
_BARE = re.compile(rf"(?:^|(?<=[^A-Za-z0-9])|(?<=[{_CJK}]))([A-Z])(?![A-Za-z0-9])")
# "A" and "I" double as an article / pronoun: "A patient with…", "I think…"
_ARTICLE_AFTER = re.compile(r"\s+(?!is\b|was\b|would\b|should\b|seems\b|appears\b)[a-z]")


def strip_reasoning(text: str) -> str:
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "## Final Response" in text:
        text = text.rsplit("## Final Response", 1)[1]
    return text.strip()


def extract_choice(text: str, options: list[str], letters: str = LETTERS,
                   similarity_fallback: bool = False) -> str | None:
    """The chosen option letter (one of the first len(options) letters), or None when nothing parses."""
    if not options:
        raise ValueError("extract_choice needs at least one option")
    valid = set(letters[:len(options)])
    answer = strip_reasoning(text or "")
    if not answer:
        return None

    last: tuple[int, str] | None = None
    for pattern in _EXPLICIT:
        for m in pattern.finditer(answer):
            if m.group(1) in valid and (last is None or m.start(1) > last[0]):
                last = (m.start(1), m.group(1))
    if last is not None:
        return last[1]

    for m in _BARE.finditer(answer):
        letter = m.group(1)
        if letter not in valid:
            continue
        if letter in "AI" and _ARTICLE_AFTER.match(answer, m.end(1)):
            continue
        last = (m.start(1), letter)
    if last is not None:
        return last[1]

    lowered = answer.lower()
    best: tuple[int, int, str] | None = None  # (end of last occurrence, option length, letter)
    for letter, option in zip(letters, options):
        needle = option.strip().lower()
        if not needle:
            continue
        pos = lowered.rfind(needle)
        if pos >= 0:
            candidate = (pos + len(needle), len(needle), letter)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
    if best is not None:
        return best[2]

    if similarity_fallback:
        ratios = [difflib.SequenceMatcher(None, answer.lower(), o.lower()).ratio() for o in options]
        return letters[max(range(len(options)), key=ratios.__getitem__)]
    return None


_YNM = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def extract_yes_no_maybe(text: str) -> str | None:
    """PubMedQA: the last yes/no/maybe after stripping reasoning."""
    matches = _YNM.findall(strip_reasoning(text or ""))
    return matches[-1].lower() if matches else None

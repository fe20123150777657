"""Answer extraction, shared by MCQ evaluation and verifiable rewards: the chosen option letter, a label, a number.

Choice cascade (evaluation.md §2.3): drop reasoning (text after the last "</think>" or "## Final Response"), then
  1. explicit phrases: "the answer is (B)", "Answer: B", "correct option is B", "答案是B", "答案：B", "选B", "B项正确";
  2. a letter standing alone: "(B)", "**B**", "B." or "B)" at a line start, or "B" bounded by non-letters;
  3. the text of exactly one option (case-insensitive; the latest-ending occurrence wins).
The last match of the first stage that finds anything is returned. No similarity fallback: unparsed is None.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_MAX_LETTERS = 10  # A-J (MMLU-Pro) when the options are not given
_CJK = "\u3400-\u4dbf\u4e00-\u9fff"
_ALONE_AFTER = r"(?![A-Za-z0-9])"
_LEAD = r"[\s:：=\-\(\[（【\*\"'“‘]*"

_EXPLICIT = (
    # "answer is B", "Answer: (B)", "final answer B"; "correct option is B", "best choice: B" (a bare "option B"
    # is not explicit: "option B is wrong" must not count)
    re.compile(
        r"(?i:answer|(?:final|correct|best|right)\s+(?:option|choice))\s*"
        r"(?i:is|would\s+be|should\s+be|will\s+be|=|:|：)?\s*(?i:option\s+|choice\s+)?" + _LEAD + r"([A-Z])" + _ALONE_AFTER
    ),
    re.compile(r"答案\s*(?:应该|应|就|可能)?\s*(?:是|为|选|：|:)?" + _LEAD + r"([A-Z])" + _ALONE_AFTER),
    re.compile(r"(?:正确|最佳|应选)?选项\s*(?:应该|应)?\s*(?:是|为|：|:)" + _LEAD + r"([A-Z])" + _ALONE_AFTER),
    re.compile(r"选(?:择)?\s*" + _LEAD + r"([A-Z])" + _ALONE_AFTER),
    re.compile(r"(?<![A-Za-z])([A-Z])\s*(?:项|选项)\s*(?:正确|是正确的|最合适|最佳)"),
)
_FORMATTED = (
    re.compile(r"[\(\[（【]([A-Z])[\)\]）】]"),
    re.compile(r"\*\*([A-Z])\*\*"),
    re.compile(r"(?m)^\s*([A-Z])\s*[\.\)）:：]"),
)
_BARE = re.compile(r"(?:^|(?<=[^A-Za-z0-9]))([A-Z])(?![A-Za-z0-9])")
# "A" and "I" are also English words: "A patient with ...", "I think ...".
_WORD_AFTER = re.compile(r"\s+[a-z]")


def strip_reasoning(text: str) -> str:
    """What follows the last "</think>" (or, failing that, the last "## Final Response")."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    if "## Final Response" in text:
        return text.rsplit("## Final Response", 1)[1].strip()
    return text.strip()


def _option_letters_and_texts(options: Sequence[str] | Mapping[str, str] | None) -> tuple[str, list[tuple[str, str]]]:
    if options is None:
        return LETTERS[:DEFAULT_MAX_LETTERS], []
    if isinstance(options, Mapping):
        pairs = [(str(k).strip().upper(), str(v)) for k, v in options.items()]
        bad = [k for k, _ in pairs if len(k) != 1 or k not in LETTERS]
        if bad:
            raise ValueError(f"option keys must be single letters A-Z, got {bad}")
        return "".join(k for k, _ in pairs), pairs
    options = list(options)
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
    return LETTERS[: len(options)], list(zip(LETTERS, (str(o) for o in options)))


def _last(matches: list[tuple[int, str]]) -> str | None:
    return max(matches)[1] if matches else None


def extract_choice(text: str, options: Sequence[str] | Mapping[str, str] | None = None) -> str | None:
    """The chosen option letter, or None. `options`: the option texts in letter order (or a {letter: text} dict);
    without them any of A-J is accepted and option-text matching is skipped."""
    valid, pairs = _option_letters_and_texts(options)
    answer = strip_reasoning(text or "")
    if not answer:
        return None

    explicit = [(m.start(1), m.group(1)) for rx in _EXPLICIT for m in rx.finditer(answer) if m.group(1) in valid]
    if explicit:
        return _last(explicit)

    formatted = [(m.start(1), m.group(1)) for rx in _FORMATTED for m in rx.finditer(answer) if m.group(1) in valid]
    if formatted:
        return _last(formatted)

    bare = []
    for m in _BARE.finditer(answer):
        letter = m.group(1)
        if letter in valid and not (letter in "AI" and _WORD_AFTER.match(answer, m.end(1))):
            bare.append((m.start(1), letter))
    if bare:
        return _last(bare)

    lowered = answer.lower()
    by_text = []
    for letter, option in pairs:
        needle = option.strip().lower()
        pos = lowered.rfind(needle) if needle else -1
        if pos >= 0:
            by_text.append((pos + len(needle), len(needle), letter))  # latest end wins; longer text breaks ties
    return max(by_text)[2] if by_text else None


def extract_label(text: str, labels: Sequence[str] = ("yes", "no", "maybe")) -> str | None:
    """The label (from `labels`) whose last whole-word occurrence comes last, e.g. PubMedQA's yes/no/maybe."""
    answer = strip_reasoning(text or "").lower()
    best: tuple[int, str] | None = None
    for label in labels:
        for m in re.finditer(rf"(?<![a-z]){re.escape(label.lower())}(?![a-z])", answer):
            if best is None or m.start() > best[0]:
                best = (m.start(), label)
    return best[1] if best else None


_NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(
    rf"(?<![A-Za-z0-9_.])(?P<num>{_NUM})(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    rf"(?:\s*(?:[x×*]|times)\s*10\s*(?:\^|\*\*)\s*(?P<exp>[-+−]?\d+))?(?P<pct>\s*%)?"
)
_NUMBER_CUE = re.compile(
    r"(?i:(?:final\s+)?answer\s*(?:is|=|:|：)?|result\s*(?:is|=|:)|equals|=)|答案\s*(?:是|为|：|:)?|结果\s*(?:是|为|：|:)?|约为|等于"
)


def _to_float(m: re.Match) -> float:
    value = float(m.group("num").replace(",", "").replace("−", "-"))
    if m.group("den"):
        den = float(m.group("den"))
        value = value / den if den else math.nan
    if m.group("exp"):
        value *= 10.0 ** int(m.group("exp").replace("−", "-"))
    return value


def extract_number(text: str) -> float | None:
    """The answer number: the first number after the last explicit cue ("answer is", "=", "答案是"), else the last
    number in the text. Handles 1,234.5, -3, .5, 1e-3, 3/4, 2.5 × 10^3 and 40% (-> 40). None when there is none."""
    answer = strip_reasoning(text or "")
    cues = list(_NUMBER_CUE.finditer(answer))
    if cues:
        m = _NUMBER_RE.search(answer, cues[-1].end())
        if m and answer[cues[-1].end():m.start()].strip(" \t*:：$¥") == "":
            return _finite(_to_float(m))
    matches = list(_NUMBER_RE.finditer(answer))
    return _finite(_to_float(matches[-1])) if matches else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

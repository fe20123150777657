"""Embedded HPO and ICD-10-CM corpora: sizes, the train/held-out split, and MCQ answers checked against the
packages' own lookups."""

import itertools
from collections import Counter

import pytest

from angelmed.data import embedded
from angelmed.data.sources import EvalOnlyDatasetError, open_source


@pytest.fixture(scope="module")
def hpo():
    return {role: list(embedded.records("hpo", role)) for role in ("cpt", "sft", "rl", "eval")}


@pytest.fixture(scope="module")
def icd():
    out = {role: list(embedded.records("icd10cm", role)) for role in ("cpt", "eval")}
    out["rl"] = list(itertools.islice(embedded.records("icd10cm", "rl"), 5000))
    return out


def test_hpo_counts_and_content(hpo):
    assert len(hpo["cpt"]) > 15000 and len(hpo["sft"]) > 30000 and len(hpo["rl"]) > 8000
    assert 300 < len(hpo["eval"]) < 1500  # about 5% held out
    kinds = Counter(c.id.rsplit(":", 1)[1] for c in hpo["sft"])
    assert set(kinds) == {"def", "syn", "isa", "answered"}
    # answered MCQs teach the reply form the MCQ reward reads, for training terms only
    answered = [c for c in hpo["sft"] if c.id.endswith(":answered")]
    assert len(answered) == len(hpo["rl"])
    first = answered[0]
    assert first.messages[-1]["content"].startswith("The answer is ")
    letter = first.messages[-1]["content"][len("The answer is ")]
    rl = {p.id: p for p in hpo["rl"]}[first.id.removesuffix(":answered")]
    assert letter == rl.answer


def test_embedded_records_are_not_in_alphabetical_runs(hpo):
    ids = [d.id for d in hpo["cpt"][:50]]
    assert ids != sorted(ids)


def test_hpo_known_term():
    seizure = embedded.hpo_terms()["HP:0001250"]
    assert seizure.name == "Seizure" and "Epileptic seizure" in seizure.synonyms
    assert [embedded.hpo_terms()[p].name for p in seizure.parents] == ["Abnormal nervous system physiology"]
    assert seizure.definition.startswith("A seizure is an intermittent abnormality")


def test_hpo_train_and_heldout_are_disjoint(hpo):
    train_terms = {d.id.split(":", 1)[1] for d in hpo["cpt"]} | {p.meta["term_id"] for p in hpo["rl"]}
    heldout_terms = {p.meta["term_id"] for p in hpo["eval"]}
    assert heldout_terms and not train_terms & heldout_terms


def test_hpo_mcq_answer_is_the_defined_term(hpo):
    terms = embedded.hpo_terms()
    for p in hpo["eval"][:200]:
        term = terms[p.meta["term_id"]]
        options = p.meta["options"]
        assert len(options) == 4 and len(set(options.values())) == 4
        assert options[p.answer] == term.name and term.definition in p.messages[0]["content"]


def test_icd_counts_split_and_answers(icd):
    import simple_icd_10_cm as lib

    assert len(icd["cpt"]) > 1500 and len(icd["rl"]) == 5000 and len(icd["eval"]) > 1000
    train_cats = {d.id.split(":")[1] for d in icd["cpt"]} | {p.meta["split_key"] for p in icd["rl"]}
    heldout_cats = {p.meta["split_key"] for p in icd["eval"]}
    assert not {c.split(":")[-1] for c in train_cats} & {c.split(":")[-1] for c in heldout_cats}
    for p in icd["eval"][:300]:
        code, options, answer = p.meta["code"], p.meta["options"], p.meta["answer_text"]
        assert options[p.answer] == answer and len(set(options.values())) == 4
        if answer == code:  # "which code corresponds to <title>?"
            assert f'"{lib.get_description(code)}"' in p.messages[0]["content"]
        else:  # "what does <code> denote?"
            assert answer == lib.get_description(code)


def test_icd_document_lists_notes_and_subcodes():
    # read the category documents of whichever split I10 and E11 fall in (the internal reader, not the guard)
    i10 = next(d for d in embedded.icd_records("cpt", embedded.split_of("icd10cm:I10")) if d.id == "icd10cm:I10")
    assert i10.text.startswith("ICD-10-CM I10: Essential (primary) hypertension\nBlock: Hypertensive diseases")
    assert "Includes: high blood pressure" in i10.text
    e11 = next(d for d in embedded.icd_records("cpt", embedded.split_of("icd10cm:E11")) if d.id == "icd10cm:E11")
    assert "E11.9: Type 2 diabetes mellitus without complications" in e11.text
    assert "Excludes1: gestational diabetes (O24.4-)" in e11.text


def test_heldout_split_refused_for_training():
    with pytest.raises(EvalOnlyDatasetError, match="held-out"):
        embedded.records("hpo", "sft", "heldout")
    with pytest.raises(EvalOnlyDatasetError):
        open_source("icd10cm:heldout", "rl")


def test_embedded_sources_need_no_data_root(monkeypatch):
    monkeypatch.delenv("ANGELMED_DATA_ROOT", raising=False)
    doc = next(open_source("hpo", "cpt"))
    assert "is a term of the Human Phenotype Ontology" in doc.text
    conv = next(open_source("icd10cm", "sft"))
    assert conv.messages[1]["role"] == "assistant"


def test_split_is_stable():
    # a fixed hash, not Python's salted hash(): the same id lands in the same split in every process
    assert embedded.stable_hash("split:hpo:HP:0001250") == int.from_bytes(
        __import__("hashlib").sha1(b"split:hpo:HP:0001250").digest()[:8], "big")
    assert embedded.split_of("hpo:HP:0001250") in ("train", "heldout")

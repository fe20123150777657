"""Source registry, the shared-data loaders (real files; skipped without ../shared/data) and generic formats."""

import itertools
import json
from collections import Counter

import pytest

from angelmed.data.records import Conversation, Document, PromptRecord, SkipCounter
from angelmed.data.sources import REGISTRY, EvalOnlyDatasetError, open_source


# ---------------------------------------------------------------- eval-only refusal


@pytest.mark.parametrize("name", ["healthbench_subset245", "medqa", "medmcqa", "mmlu_medical", "mmlu_pro_health",
                                  "cmmlu_medical", "cmb_clin", "liveqa_med_trec2017", "medicationqa",
                                  "mmlu_medical_fewshot"])
@pytest.mark.parametrize("role", ["cpt", "sft", "rl"])
def test_eval_sets_are_refused_for_training(name, role, tmp_path):
    with pytest.raises(EvalOnlyDatasetError) as err:
        open_source(name, role, tmp_path)  # refused before any file is touched
    assert name in str(err.value) and role.upper() in str(err.value)
    assert "never" in str(err.value) or "few-shot" in str(err.value)


def test_eval_set_files_are_refused_by_path_too(data_dir):
    with pytest.raises(EvalOnlyDatasetError, match="medqa"):
        open_source(str(data_dir / "medagentsbench" / "medqa" / "test.jsonl"), "rl", data_dir)
    with pytest.raises(EvalOnlyDatasetError, match="cannot be used for CPT"):
        open_source(str(data_dir), "cpt", data_dir)  # a whole tree that contains eval sets


def test_eval_role_reads_benchmarks(data_dir):
    medqa = list(open_source("medqa", "eval", data_dir))
    assert len(medqa) == 1273  # medagentsbench/SOURCE.md
    first = medqa[0]
    assert isinstance(first, PromptRecord) and first.answer in first.meta["options"]
    assert "A. " in first.messages[0]["content"]
    assert len(list(open_source("healthbench_subset245", "eval", data_dir))) == 245


def test_unknown_source_and_role_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown data source 'nope'"):
        open_source("nope", "cpt", tmp_path)
    with pytest.raises(ValueError, match="role must be one of"):
        open_source("medquad", "pretrain", tmp_path)
    with pytest.raises(ValueError, match="provides roles"):
        open_source("chinese_medical_dialogue", "cpt", tmp_path)


def test_registry_training_sets_match_evaluation_table():
    allowed = {n for n, s in REGISTRY.items() if not s.train_forbidden}
    assert allowed == {"medquad", "pubmedqa", "chatdoctor", "chinese_medical_dialogue", "medicalgpt_samples",
                       "huatuogpt_o1_demo", "hpo", "icd10cm", "safety_prompts"}  # the last: in-project


def test_packaged_safety_prompts_are_rl_only():
    records = list(open_source("safety_prompts", "rl"))
    assert len(records) >= 30 and all(r.messages[-1]["role"] == "user" for r in records)
    with pytest.raises(ValueError, match="roles"):
        open_source("safety_prompts", "sft")


# ---------------------------------------------------------------- shared datasets


def test_medquad_counts(data_dir):
    skips = SkipCounter()
    pairs = list(open_source("medquad", "sft", data_dir, skips=skips))
    # SOURCE.md: 16,412 QAPairs of which 16,407 have answers
    assert len(pairs) == 16407
    assert skips.total == 5 and set(skips.by_reason) == {"QAPair without Answer text"}
    assert all(isinstance(c, Conversation) and [m["role"] for m in c.messages] == ["user", "assistant"]
               for c in pairs[:50])


def test_medquad_cpt_documents_hold_answers(data_dir):
    docs = list(itertools.islice(open_source("medquad", "cpt", data_dir), 3))
    assert docs[0].text.startswith("Adult Acute Lymphoblastic Leukemia")
    assert "bone marrow makes too many lymphocytes" in docs[0].text


def test_chinese_dialogue_gb18030(data_dir):
    convs = list(open_source("chinese_medical_dialogue", "sft", data_dir))
    assert len(convs) == 7644  # SOURCE.md
    # first data row, read with iconv -f gb18030: 心血管科,高血压患者能吃党参吗？,我有高血压...
    assert convs[0].messages[0]["content"].startswith("高血压患者能吃党参吗？")
    assert "党参" in convs[0].messages[1]["content"]
    cjk = sum(0x4E00 <= ord(ch) <= 0x9FFF for c in convs[:100] for m in c.messages for ch in m["content"])
    assert cjk > 5000


def test_pubmedqa_only_trainval_with_label_counts(data_dir):
    prompts = list(open_source("pubmedqa", "rl", data_dir))
    assert Counter(p.answer for p in prompts) == {"yes": 276, "no": 169, "maybe": 55}  # SOURCE.md
    doc = next(open_source("pubmedqa", "cpt", data_dir))
    assert isinstance(doc, Document) and "Conclusions:" in doc.text


def test_chatdoctor_both_files(data_dir):
    assert len(list(open_source("chatdoctor", "sft", data_dir))) == 5452
    diseases = list(open_source("chatdoctor", "cpt", data_dir))
    assert len(diseases) == 796
    assert diseases[0].text.startswith("Disease: Panic disorder\nSymptoms: Anxiety and nervousness, Depression")


def test_medicalgpt_sharegpt_and_grpo(data_dir):
    convs = list(open_source("medicalgpt_samples", "sft", data_dir))
    assert len(convs) == 1000 and convs[0].messages[0]["role"] == "user"
    assert convs[0].messages[1]["role"] == "assistant"
    prompts = list(open_source("medicalgpt_samples", "rl", data_dir))
    assert len(prompts) == 32 and prompts[0].messages[0]["content"] == "肛门病变可能是什么疾病的症状?"
    assert prompts[0].answer == "食管克罗恩病"


def test_huatuo_reasoning_sft_and_mcq_prompts(data_dir):
    raw = json.loads((data_dir / "huatuogpt_o1_demo" / "demo_data.json").read_text())
    convs = list(open_source("huatuogpt_o1_demo", "sft", data_dir))
    assert len(convs) == 198
    assistant = convs[0].messages[1]
    assert assistant["reasoning_content"] == raw[0]["Complex_CoT"] and assistant["content"] == raw[0]["Response"]
    prompts = list(open_source("huatuogpt_o1_demo", "rl", data_dir))
    assert [p.answer for p in prompts] == [r["answer_idx"] for r in raw]
    assert prompts[0].meta["answer_text"] == raw[0]["answer"]


# ---------------------------------------------------------------- generic files and bad records


def test_bad_jsonl_lines_are_skipped_and_counted_with_line_numbers(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        "{not json",
        json.dumps({"instruction": "only an instruction"}),  # no output -> no conversation fields
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    skips = SkipCounter()
    convs = list(open_source(str(path), "sft", skips=skips))
    assert len(convs) == 2
    assert convs[1].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert skips.lines(str(path)) == [2, 3, 4, 5, 8]
    reasons = [s.reason for s in skips.examples]
    assert reasons[0].startswith("bad JSON") and "expected string" in reasons[2]
    assert "expected a JSON object, got list" in reasons[3] and "not UTF-8" in reasons[4]
    assert "5 records skipped" in skips.summary()


def test_generic_row_schemas(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Explain.", "input": "Fever", "output": "It is ..."},
        {"prompt": "Q?", "completion": "A."},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "reasoning_content": "think"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    convs = list(open_source(str(path), "sft"))
    assert convs[0].messages[0]["content"] == "Explain.\n\nFever"
    assert convs[1].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert convs[2].messages[1]["reasoning_content"] == "think"
    prompts = list(open_source(str(path), "rl"))
    assert prompts[2].messages == [{"role": "user", "content": "q"}] and prompts[2].meta["reference"] == "a"


def test_text_files_are_cpt_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second")
    assert [d.text for d in open_source(str(tmp_path), "cpt")] == ["first document", "second"]
    with pytest.raises(ValueError, match="CPT documents"):
        open_source(str(tmp_path), "sft")


def test_gb18030_csv_bad_line_is_counted(tmp_path):
    from angelmed.data.formats import read_csv
    path = tmp_path / "zh.csv"
    path.write_bytes("title,ask\n".encode("gb18030") + "头痛,怎么办\n".encode("gb18030") + b"\x81\x20,x\n"
                     + "发烧,吃什么药\n".encode("gb18030"))
    skips = SkipCounter()
    rows = list(read_csv(path, skips, encoding="gb18030"))
    assert [r for _, r in rows] == [{"title": "头痛", "ask": "怎么办"}, {"title": "发烧", "ask": "吃什么药"}]
    assert skips.lines(str(path)) == [3]


def test_hf_spec_without_datasets_package_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        next(open_source("hf:lavita/ChatDoctor-HealthCareMagic-100k", "sft"))


def test_hf_spec_reads_a_local_dataset_folder(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    folder = tmp_path / "my_set"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "Q?", "completion": "A."}) + "\n")
    convs = list(open_source(f"hf:{folder}:train", "sft"))
    assert convs[0].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]

"""Tokenizer + Ling chat template: fixtures, HF interop, round trips, special tokens, SFT masks, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from angelmed.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    Tokenizer,
    official_chat_template,
    render_base,
    render_chat,
    special_tokens,
    with_default_system_prompt,
)

CORPUS = [
    "The patient has a fever of 38.5 °C and a headache; she took 400 mg ibuprofen at 10:30.",
    "Blood pressure 120/80 mmHg is normal. Don't ignore chest pain: call 120 or 911 now!",
    "我头疼，应该怎么办？请问头疼持续多久了？建议多喝水，注意休息。",
    "患者男，45岁，血糖 7.8 mmol/L，HbA1c 6.9%，诊断为2型糖尿病。",
    "Aspirin + warfarin: major bleeding risk. It's the interaction we'd flag; they'll check INR.",
    "def bmi(weight_kg, height_m):\n    return weight_kg / height_m ** 2\n\t# tabs and  double  spaces",
    "Year 2024, 2024, 2024 and 3.14159 — numbers everywhere: 1000000 12345 67890.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS * 50, vocab_size=500, min_frequency=2)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    """No merges at all: every token is one UTF-8 byte or one special token, so counts are easy by hand."""
    return Tokenizer.train(CORPUS, vocab_size=256 + len(SPECIAL_TOKENS))


@pytest.fixture
def cases(fixtures_dir: Path) -> list[dict]:
    return json.loads((fixtures_dir / "chat_template" / "cases.json").read_text(encoding="utf-8"))["cases"]


# ---- chat template ------------------------------------------------------------------------------------------


def test_asset_template_is_the_official_text(fixtures_dir):
    config = json.loads((fixtures_dir / "chat_template" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert official_chat_template() == config["chat_template"]


def test_render_chat_matches_every_fixture_case(cases):
    assert len(cases) == 11
    for case in cases:
        got = render_chat(case["messages"], case["tools"], case["add_generation_prompt"])
        assert got == case["expected"], case["name"]


def test_template_adds_no_default_system_prompt():
    assert render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>")
    with_default = with_default_system_prompt([{"role": "user", "content": "Hi"}])
    assert render_chat(with_default, add_generation_prompt=True) == (
        "<role>SYSTEM</role>You are AntAngelMed, a helpful medical assistant.\ndetailed thinking off<|role_end|>"
        "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert with_default_system_prompt(own) == own
    assert DEFAULT_SYSTEM_PROMPT == "You are AntAngelMed, a helpful medical assistant."


def test_render_base():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    assert render_base(messages) == "<role>SYSTEM</role>S<role>HUMAN</role>Q<role>ASSISTANT</role>A"
    assert render_base(messages[:2], add_generation_prompt=True) == (
        "<role>SYSTEM</role>S<role>HUMAN</role>Q<role>ASSISTANT</role>")


# Edge cases beyond the fixtures, compared with transformers rendering the official Jinja (a second renderer).
EDGE_CASES = [
    ([{"role": "assistant", "content": "<think>r</think>no user at all"}], None),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
      "tool_calls": [{"function": {"name": "f", "arguments": {"x": [1, "é<&>'"]}}}]},
      {"role": "tool", "content": "r1"}], None),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "reasoning_content": "", "content": "<think>kept as text</think>a"}], None),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "reasoning_content": "\n\nr\n", "content": "\n",
       "tool_calls": [{"name": "f", "arguments": "{}"}, {"name": "g", "arguments": "[]"}]}], [{"name": "f"}]),
    ([{"role": "tool", "content": "first"}, {"role": "user", "content": "<tool_response>x</tool_response>"},
      {"role": "assistant", "content": "<think>\nr\n</think>\n\nafter tool-response user"}], []),
    ([{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "u"},
      {"role": "assistant", "content": "a<think>mid</think>b"}, {"role": "tool", "content": "t"}], None),
]


def test_saved_tokenizer_works_in_transformers(tok, tmp_path, cases):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == "PreTrainedTokenizerFast"
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|startoftext|>", "<|role_end|>", "<|endoftext|>")
    for case in cases:
        text = hf.apply_chat_template(case["messages"], tools=case["tools"], tokenize=False,
                                      add_generation_prompt=case["add_generation_prompt"])
        assert text == case["expected"], case["name"]
        hf_ids = hf.apply_chat_template(case["messages"], tools=case["tools"], tokenize=True,
                                        add_generation_prompt=case["add_generation_prompt"])
        ids, _ = tok.encode_chat(case["messages"], case["tools"], case["add_generation_prompt"])
        assert ids == hf_ids, case["name"]
    for messages, tools in EDGE_CASES:
        for gen in (False, True):
            expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
            assert render_chat(messages, tools, gen) == expected, messages
    assert hf("a<role>b", add_special_tokens=False)["input_ids"] == tok.encode("a<role>b")


# ---- tokenizer ------------------------------------------------------------------------------------------------


def test_special_tokens_are_single_tokens(tok):
    assert SPECIAL_TOKENS[:11] == ["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|role_end|>",
                                   "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                   "<role>", "</role>"]
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(token) == [token_id]
        assert tok.encode(f"x{token}y") == tok.encode("x") + [token_id] + tok.encode("y")
    assert tok.bos_id == tok.token_to_id("<|startoftext|>")
    assert tok.eod_id == tok.token_to_id("<|endoftext|>")
    assert tok.role_end_id == tok.token_to_id("<|role_end|>")
    assert tok.pad_id == tok.eod_id
    assert tok.stop_ids == [tok.role_end_id, tok.eod_id]
    # Special tokens take the last ids, in official order, as in the real vocabulary.
    assert ids == list(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    assert tok.vocab_size == 500
    assert len(tok.encode("<think>")) > 1  # <think> is not special


def test_reserved_tokens_in_official_order():
    t = Tokenizer.train(CORPUS, vocab_size=800, include_reserved=True)
    official = special_tokens(include_reserved=True)
    assert len(official) == 266 and official[9] == "<|reserved_token_5|>" and official[259] == "<|reserved_token_255|>"
    base = t.bos_id
    # Same offsets from bos as the real ids: <|role_end|> 156895, <role> 157151, <|number_start|> 157156.
    assert t.role_end_id - base == 156895 - 156891
    assert t.token_to_id("<role>") - base == 157151 - 156891
    assert t.token_to_id("<|number_start|>") - base == 157156 - 156891


def test_round_trip(tok):
    texts = ["Hello, world! It's 38.5 °C.", "我头疼，应该怎么办？", "混合 mixed 文本 text 123",
             "emoji 🩺💊 and accents café naïve", "  leading and trailing  \n\n\ttabs\r\n",
             "<role>HUMAN</role>你好<|role_end|><role>ASSISTANT</role>\n<think>\nr\n</think>\n\nok<|endoftext|>", ""]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<role>HUMAN</role>你好<|role_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "HUMAN你好"


def test_nfc_normalisation(tok):
    decomposed = "cafe\u0301"  # e + combining acute
    assert tok.decode(tok.encode(decomposed)) == "caf\u00e9"


def test_digits_split_one_at_a_time(tok):
    ids = tok.encode("2024")  # frequent in the corpus, but the pre-tokenizer isolates every digit
    assert [tok.id_to_token(i) for i in ids] == ["2", "0", "2", "4"]
    assert len(tok.encode("x 1000000")) == len(tok.encode("x ")) + 7


def test_pre_tokenizer_follows_ling_regex(tok):
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("don't stop 12")]
    assert pieces == ["don", "'t", "Ġstop", "Ġ", "1", "2"]


def test_training_on_one_megabyte_takes_seconds(data_dir):
    lines = (data_dir / "medicalgpt_samples" / "medical_sft_1K_format.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [turn["value"] for line in lines for turn in json.loads(line)["conversations"]]
    texts += [json.dumps(r, ensure_ascii=False) for r in
              json.loads((data_dir / "huatuogpt_o1_demo" / "demo_data.json").read_text(encoding="utf-8"))[:300]]
    size = sum(len(t.encode("utf-8")) for t in texts)
    assert size > 900_000
    start = time.perf_counter()
    t = Tokenizer.train(texts, vocab_size=8000)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"training on {size} bytes took {elapsed:.1f}s"
    assert t.vocab_size == 8000
    assert len(t.encode(texts[0])) < len(texts[0].encode("utf-8")) / 2  # merges learnt something


def test_non_string_training_texts_are_skipped_and_counted(caplog):
    t = Tokenizer.train(["abc abc", None, 3, "abc"], vocab_size=300)
    assert "skipped 2 non-string" in caplog.text
    assert t.decode(t.encode("abc")) == "abc"


# ---- SFT masks ------------------------------------------------------------------------------------------------


def test_mask_by_hand_counts(byte_tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "好"}]
    ids, mask = byte_tok.encode_chat(messages)
    # Byte tokenizer: a token per UTF-8 byte, specials are one token each.
    # <role>SYSTEM</role>S\ndetailed thinking off<|role_end|>: 1+6+1 + 2+21 + 1 = 32
    # <role>HUMAN</role>Hi<|role_end|>: 1+5+1+2+1 = 10; <role>ASSISTANT</role>: 1+9+1 = 11
    # Hello!<|role_end|>: 6+1 = 7 (loss); <role>HUMAN</role>你好<|role_end|>: 1+5+1+6+1 = 14; header 11
    # 好<|role_end|>: 3+1 = 4 (loss)
    assert len(ids) == 32 + 10 + 11 + 7 + 14 + 11 + 4
    expected_mask = [False] * (32 + 10 + 11) + [True] * 7 + [False] * (14 + 11) + [True] * 4
    assert mask == expected_mask
    assert ids[-1] == byte_tok.role_end_id and mask[-1]
    ids_last, mask_last = byte_tok.encode_chat(messages, only_last_assistant=True)
    assert ids_last == ids
    assert mask_last == [False] * (32 + 10 + 11 + 7 + 14 + 11) + [True] * 4


def test_mask_covers_think_and_tool_calls(byte_tok):
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "reasoning_content": "R", "content": "OK",
                 "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
                {"role": "tool", "content": "T"}]
    ids, mask = byte_tok.encode_chat(messages, add_generation_prompt=True)
    # Reply: "\n<think>\nR\n</think>\n\nOK" = 1+7+1+1+1+8+2+2 = 23 bytes, then "\n" 1, <tool_call> 1,
    # '\n{"name": "f", "arguments": {}}\n' = 1+30+1 = 32 bytes, </tool_call> 1, <|role_end|> 1  -> 59 loss tokens.
    assert sum(mask) == 59
    first = mask.index(True)
    assert mask[first:first + 59] == [True] * 59  # one contiguous run
    assert byte_tok.decode(ids[:first]).endswith("<role>ASSISTANT</role>")
    assert byte_tok.decode(ids[first:first + 59]) == (
        '\n<think>\nR\n</think>\n\nOK\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|role_end|>')
    # Observation turn and the generation prompt are not trained on.
    assert byte_tok.decode(ids[first + 59:]) == (
        "<role>OBSERVATION</role>\n<tool_response>\nT\n</tool_response><|role_end|><role>ASSISTANT</role>")


def test_mask_with_merging_tokenizer_matches_rendered_text(tok, cases):
    for case in cases:
        ids, mask = tok.encode_chat(case["messages"], case["tools"], case["add_generation_prompt"])
        assert ids == tok.encode(case["expected"]), case["name"]
        assert len(mask) == len(ids)
        # Every masked run decodes to exactly one assistant reply ending in <|role_end|>.
        runs, current = [], []
        for token_id, m in zip(ids, mask):
            if m:
                current.append(token_id)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        n_assistant = sum(m["role"] == "assistant" for m in case["messages"])
        assert len(runs) == n_assistant, case["name"]
        for run in runs:
            text = tok.decode(run)
            assert text.endswith("<|role_end|>") and "<role>" not in text, case["name"]
            assert text in case["expected"]


def test_mask_without_assistant_is_all_false(tok):
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert len(ids) == len(mask) and not any(mask)


# ---- loading and errors -------------------------------------------------------------------------------------


def test_load_tokenizer_json_written_by_tokenizers(tmp_path):
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path)  # no tokenizer_config.json: fine
    assert (loaded.bos_id, loaded.eod_id, loaded.role_end_id, loaded.pad_id) == (0, 1, 4, 1)
    assert loaded.encode("<role>HUMAN</role>") == [9] + backend.encode("HUMAN").ids + [10]
    assert Tokenizer.load(tmp_path / "tokenizer.json").vocab_size == loaded.vocab_size


def test_load_real_ling_id_layout(tok, tmp_path):
    """A tokenizer.json laid out like the real Ling one (special tokens at ids 156891..157156)."""
    data = json.loads(tok.backend.to_str())
    official = special_tokens(include_reserved=True)
    for added in data["added_tokens"]:
        added["id"] = 156891 + official.index(added["content"])
        data["model"]["vocab"][added["content"]] = added["id"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    ling = Tokenizer.load(tmp_path)
    assert (ling.bos_id, ling.eod_id, ling.role_end_id) == (156891, 156892, 156895)
    assert ling.stop_ids == [156895, 156892]
    assert ling.vocab_size == 157157
    ids, mask = ling.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert ids[-1] == 156895 and ids.count(157151) == 3 and mask[-1]


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == official_chat_template()
    assert json.loads((tmp_path / "out" / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|startoftext|>", "cls_token": "[CLS]", "eos_token": "<|role_end|>",
        "gmask_token": "[gMASK]", "pad_token": "<|endoftext|>"}
    again = Tokenizer.load(tmp_path / "out")
    text = "患者 fever 38.5 <role>x</role>"
    assert again.encode(text) == tok.encode(text)
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_errors_are_clear(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid"):
        Tokenizer.load(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"messages\[1\]: unknown role 'doctor'"):
        render_chat([{"role": "user", "content": "a"}, {"role": "doctor", "content": "b"}])
    with pytest.raises(TypeError, match=r"messages\[0\] \(role 'user'\): content must be a string, got list"):
        render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    with pytest.raises(TypeError, match=r"messages\[0\] \(role 'user'\): content must be a string, got NoneType"):
        tok.encode_chat([{"role": "user"}])
    with pytest.raises(TypeError, match="content must be a string or None, got int"):
        render_chat([{"role": "assistant", "content": 3}])
    with pytest.raises(TypeError, match="function name must be a string"):
        render_chat([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}])
    with pytest.raises(ValueError, match="unknown role"):
        render_base([{"role": "nurse", "content": "x"}])
    with pytest.raises(TypeError, match="encode expects a string"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(CORPUS, vocab_size=100)


def test_tokenizer_without_ling_specials_is_rejected(tmp_path):
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                                    special_tokens=["<|endoftext|>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"lacks the Ling special token\(s\) \['<\|startoftext\|>', '<\|role_end"):
        Tokenizer.load(tmp_path)

import re
import string
from types import SimpleNamespace

import pytest
import torch

from angelmed.eval.backends import TorchLoglik
from angelmed.extract import extract_choice, extract_label
from angelmed.eval.mcq import MCQConfig, evaluate_generative, evaluate_loglik, loglik_requests
from angelmed.eval.mcq_data import (MCQItem, MCQTask, doc_to_text, load_task, loglik_context)
from angelmed.eval.stats import macro_f1, wilson_interval

OPTS4 = ["aspirin", "ibuprofen", "heparin", "warfarin"]


# ----------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("(B)", "B"),
    ("Answer: B", "B"),
    ("answer: (d)", None),  # lower-case letters are not taken as options
    ("The answer is B.", "B"),
    ("the answer is **C**", "C"),
    ("The correct option is D because of bleeding risk.", "D"),
    ("A is wrong, B is wrong, so the answer is C.", "C"),
    ("A patient with AF should get D.", "D"),  # "A" as an article is skipped
    ("I think heparin is best.", "C"),  # option text
    ("It is ibuprofen, not aspirin.", "A"),  # the last mentioned option text wins
    ("<think>Maybe the answer is A.</think>The answer is B", "B"),
    ("Reasoning...\n## Final Response\n\nC", "C"),
    ("答案是B", "B"),
    ("答案：C", "C"),
    ("答案为（D）", "D"),
    ("选B", "B"),
    ("综上所述，故选A。", "A"),
    ("选项B是错误的，正确答案是C", "C"),
    ("根据病史，应选择D。", "D"),
    ("E", None),  # not one of the four options
    ("", None),
    ("I do not know.", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTS4) == expected


def test_extract_choice_ten_options_and_pronoun_i():
    options = [f"option {c}" for c in "abcdefghij"]
    assert extract_choice("I think the answer is J.", options) == "J"
    assert extract_choice("I believe it's (I)", options) == "I"
    assert extract_choice("I am not sure", options) is None


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"), ("The answer is no", "no"), ("No... actually maybe.", "maybe"),
    ("<think>yes or no?</think>Maybe", "maybe"), ("unclear", None), ("Nothing", None),
])
def test_extract_label(text, expected):
    assert extract_label(text) == expected


# --------------------------------------------------------------------------------------------------- prompts
ITEM = MCQItem("1", "Which drug?", tuple(OPTS4), 2, subject="clinical_knowledge")


def test_lm_eval_prompt_formats():
    assert doc_to_text("medqa", ITEM) == ("Question: Which drug?\nA. aspirin\nB. ibuprofen\nC. heparin\n"
                                          "D. warfarin\nAnswer:")
    assert doc_to_text("medmcqa", ITEM).startswith("Question: Which drug?\nChoices:\nA. aspirin\n")
    assert loglik_context("mmlu", ITEM, []) == (
        "The following are multiple choice questions (with answers) about clinical knowledge.\n\n"
        "Which drug?\nA. aspirin\nB. ibuprofen\nC. heparin\nD. warfarin\nAnswer:")
    shot = MCQItem("s", "Q0", ("w", "x", "y", "z"), 1, subject="clinical_knowledge")
    ctx = loglik_context("mmlu", ITEM, [shot])
    assert "about clinical knowledge.\n\nQ0\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\nWhich drug?\n" in ctx
    zh = MCQItem("z", "问题", ("甲", "乙", "丙", "丁"), 0, subject="anatomy")
    assert loglik_context("cmmlu", zh, []).endswith("问题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
    assert "解剖学" in loglik_context("cmmlu", zh, [])
    pm = MCQItem("p", "Does it work?", ("yes", "no", "maybe"), 0, contexts=("Intro.", "Results."))
    assert doc_to_text("pubmedqa", pm) == "Abstract: Intro.\nResults.\nQuestion: Does it work?\nAnswer:"


def test_loaders_on_shared_data(data_dir):
    sizes = {"medqa": 1273, "medmcqa": 2816, "mmlu": 1089, "mmlu_pro": 818, "pubmedqa": 500, "cmmlu": 1815}
    for name, n in sizes.items():
        task = load_task(name, data_dir)
        assert len(task.items) == n and not task.bad_lines, name
    mmlu = load_task("mmlu", data_dir)
    assert len(mmlu.fewshot_pool["anatomy"]) == 5
    assert max(len(i.options) for i in load_task("mmlu_pro", data_dir).items) == 10


def test_loader_counts_bad_rows(tmp_path):
    (tmp_path / "medagentsbench" / "medqa").mkdir(parents=True)
    good = '{"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "B", "realidx": 1}'
    bad_letter = '{"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "C"}'
    (tmp_path / "medagentsbench" / "medqa" / "test.jsonl").write_text("\n".join([good, "{oops", bad_letter]) + "\n")
    task = load_task("medqa", tmp_path)
    assert len(task.items) == 1 and task.items[0].answer_letter == "B"
    assert [re.search(r":(\d+):", b).group(1) for b in task.bad_lines] == ["2", "3"]


# ----------------------------------------------------------------------------------------------- statistics
def test_wilson_interval_known_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)


def test_macro_f1_hand_computed():
    gold = ["yes", "yes", "no", "maybe"]
    pred = ["yes", "no", "no", None]
    # yes: tp1 fp0 fn1 -> 2/3; no: tp1 fp1 fn0 -> 2/3; maybe: 0
    assert macro_f1(gold, pred, ["yes", "no", "maybe"]) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


class ScriptedChat:
    def __init__(self, replies):
        self.replies = list(replies)
        self.conversations = []

    def generate(self, conversations, max_tokens, temperature, seed=None):
        self.conversations += conversations
        return [self.replies[i % len(self.replies)] for i in range(len(conversations))]


def test_pubmedqa_always_yes_matches_majority_baseline(data_dir):
    task = load_task("pubmedqa", data_dir)
    result = evaluate_generative(task, ScriptedChat(["The answer is yes."]), MCQConfig(protocol="generative"))
    # trainval labels: yes 276, no 169, maybe 55
    assert result["acc"]["value"] == pytest.approx(276 / 500)
    assert result["baselines"]["majority"] == {"label": "yes", "acc": pytest.approx(276 / 500)}
    assert result["macro_f1"]["value"] == pytest.approx((2 * 276 / (2 * 276 + 224)) / 3)
    assert result["parse_failure_rate"] == 0.0


def test_generative_mcq_counts_unparsed_as_wrong():
    items = [MCQItem(str(i), f"q{i}", tuple(OPTS4), idx) for i, idx in enumerate([1, 1, 0, 2])]
    task = MCQTask("medqa", items)
    chat = ScriptedChat(["The answer is B.", "答案是B", "", "I'm unsure"])
    result = evaluate_generative(task, chat, MCQConfig(protocol="generative", system_prompt="SYS"))
    assert result["acc"]["value"] == 0.5 and result["parse_failure_rate"] == 0.5
    assert result["baselines"]["chance"] == 0.25
    assert chat.conversations[0][0] == {"role": "system", "content": "SYS"}
    assert [p["pred"] for p in result["predictions"]] == ["B", "B", None, None]


def test_generative_few_shot_turns():
    pool = [MCQItem(f"s{i}", f"shot {i}", tuple(OPTS4), i, subject="anatomy") for i in range(3)]
    task = MCQTask("mmlu", [MCQItem("x", "q", tuple(OPTS4), 0, subject="anatomy")], fewshot_pool={"anatomy": pool})
    chat = ScriptedChat(["A"])
    evaluate_generative(task, chat, MCQConfig(protocol="generative", shots=2, system_prompt=None))
    roles = [m["role"] for m in chat.conversations[0]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert chat.conversations[0][3]["content"] == "The answer is B."


# ------------------------------------------------------------------------------------------------ loglik
VOCAB = {c: i for i, c in enumerate(string.printable)}


class CharTokenizer:
    def encode(self, text):
        return [VOCAB[c] for c in text]


class FirstTokenBiasLM(torch.nn.Module):
    """Next-token logits depend only on the first token of the row: logits[b, t] = bias[ids[b, 0]]."""

    def __init__(self, bias_VV):
        super().__init__()
        self.bias_VV = torch.nn.Parameter(bias_VV)

    def forward(self, ids_BT):
        return SimpleNamespace(logits=self.bias_VV[ids_BT[:, :1]].expand(-1, ids_BT.shape[1], -1))


class BigramLM(torch.nn.Module):
    def __init__(self, table_VV):
        super().__init__()
        self.table_VV = torch.nn.Parameter(table_VV)

    def forward(self, ids_BT):
        return SimpleNamespace(logits=self.table_VV[ids_BT])


def test_torch_loglik_matches_hand_computation_and_batching():
    torch.manual_seed(0)
    table = torch.randn(len(VOCAB), len(VOCAB))
    tok = CharTokenizer()
    requests = [(tok.encode("Question: hi\nAnswer:"), tok.encode(" B")), (tok.encode("x"), tok.encode("yz")),
                (tok.encode("longer context here"), tok.encode(" maybe"))]
    logp = torch.log_softmax(table, dim=-1)
    expected = []
    for ctx, cont in requests:
        seq = ctx + cont
        expected.append(sum(float(logp[seq[p - 1], seq[p]]) for p in range(len(ctx), len(seq))))
    big = TorchLoglik(BigramLM(table), max_batch_tokens=4096).loglik(requests)
    small = TorchLoglik(BigramLM(table), max_batch_tokens=8).loglik(requests)  # one request per batch
    assert big == pytest.approx(expected, abs=1e-5) and small == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="empty context"):
        TorchLoglik(BigramLM(table)).loglik([([], [1])])


def test_loglik_scoring_picks_most_likely_option():
    V = len(VOCAB)
    bias = torch.zeros(V, V)
    # a question starting with "b" makes "B" likely, "c" -> "C", "d" -> "D"
    for first, letter in (("b", "B"), ("c", "C"), ("d", "D")):
        bias[VOCAB[first], VOCAB[letter]] = 3.0
    model = FirstTokenBiasLM(bias)
    items = [MCQItem("1", "b question", tuple(OPTS4), 1), MCQItem("2", "c question", tuple(OPTS4), 2),
             MCQItem("3", "d question", tuple(OPTS4), 0)]
    result = evaluate_loglik(MCQTask("mmlu", items), TorchLoglik(model), CharTokenizer(), MCQConfig())
    assert [p["pred"] for p in result["predictions"]] == ["B", "C", "D"]
    assert result["acc"]["value"] == pytest.approx(2 / 3)
    assert result["acc_norm"]["value"] == result["acc"]["value"]  # single-letter choices
    # the log-likelihood itself: log p(" ") + log p("B") under softmax(bias["b"])
    lp = torch.log_softmax(bias[VOCAB["b"]], dim=-1)
    ctx, cont = loglik_requests("b question\nA. x\nAnswer:", " B", CharTokenizer())
    assert TorchLoglik(model).loglik([(ctx, cont)])[0] == pytest.approx(float(lp[VOCAB[" "]] + lp[VOCAB["B"]]))


class TableLoglik:
    """Fake backend: log-likelihood by continuation text."""

    def __init__(self, scores):
        self.scores = scores

    def loglik(self, requests):
        inverse = {i: c for c, i in VOCAB.items()}
        return [self.scores["".join(inverse[t] for t in cont)] for _, cont in requests]


def test_acc_norm_divides_by_choice_characters():
    items = [MCQItem("p", "Q?", ("yes", "no", "maybe"), 2, contexts=("ctx",))]
    backend = TableLoglik({" yes": -3.0, " no": -2.5, " maybe": -4.0})  # per char: -1.0, -1.25, -0.8
    result = evaluate_loglik(MCQTask("pubmedqa", items), backend, CharTokenizer(), MCQConfig())
    assert result["predictions"][0]["pred"] == "no"  # highest raw log-likelihood
    assert result["acc"]["value"] == 0.0 and result["acc_norm"]["value"] == 1.0


def test_token_split_keeps_merged_boundary_in_continuation():
    class WordTokenizer:  # " A" is one token, as a BPE merge would make it
        def encode(self, text):
            return [hash(w) % 1000 for w in re.findall(r"\s?\S+|\s", text)]

    tok = WordTokenizer()
    ctx, cont = loglik_requests("Q\nAnswer:", " A", tok)
    assert ctx == tok.encode("Q\nAnswer:") and cont == tok.encode(" A") and len(cont) == 1


def test_self_consistency_majority_vote():
    """3 samples per question (a question's replies side by side): the vote, its tie rule, first-sample accuracy,
    agreement."""
    items = [MCQItem(str(i), f"q{i}", tuple(OPTS4), idx) for i, idx in enumerate([1, 0, 2])]
    task = MCQTask("medqa", items)
    chat = ScriptedChat([
        "The answer is A.", "The answer is B.", "The answer is B.",   # q0
        "The answer is A.", "The answer is C.", "The answer is B.",   # q1
        "I'm unsure", "The answer is D.", "The answer is C.",   # q2
    ])
    result = evaluate_generative(task, chat, MCQConfig(protocol="generative", samples=3, temperature=0.7))
    # q0: A,B,B -> B (gold B); q1: A,C,B -> tie, first given A (gold A); q2: -,D,C -> tie, D (gold C)
    assert [p["pred"] for p in result["predictions"]] == ["B", "A", "D"]
    assert result["predictions"][2]["votes"] == [None, "D", "C"]
    assert result["acc"]["correct"] == 2 and result["acc_first_sample"]["correct"] == 1
    assert result["vote_agreement"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert len(chat.conversations) == 9 and chat.conversations[0] == chat.conversations[2] != chat.conversations[3]
    with pytest.raises(ValueError, match="temperature"):
        evaluate_generative(task, chat, MCQConfig(protocol="generative", samples=3, temperature=0.0))


def test_sampled_votes_are_reproducible_with_the_run_seed():
    """Self-consistency through the local engine: the same run seed gives the same sampled replies, the samples of
    a question differ from each other, and another seed gives other replies."""
    from angelmed.infer.backends import LocalChatBackend
    from test_engine import ByteTokenizer, tiny_model

    backend = LocalChatBackend(tiny_model(0), ByteTokenizer(), max_batch=4, max_seq_len=256)
    seen, real = [], backend.generate
    backend.generate = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    task = MCQTask("medqa", [MCQItem(str(i), f"q{i}", tuple(OPTS4), 0) for i in range(2)])
    cfg = dict(protocol="generative", samples=3, temperature=1.0, max_tokens=8, system_prompt=None)
    evaluate_generative(task, backend, MCQConfig(**cfg))
    evaluate_generative(task, backend, MCQConfig(**cfg))
    evaluate_generative(task, backend, MCQConfig(**cfg, seed=1))
    assert seen[0] == seen[1] and len(set(seen[0][:3])) > 1 and seen[2] != seen[0]

"""GRPO rewards: extraction, combination, verifiers, format, dose limits, safety, rubric (fake judge), registry."""

import asyncio
import json
import math
import sys
import types

import pytest

from angelmed.rewards import WeightedReward, acombine, build_rewards, combine, reward_stats
from angelmed.rewards.dose import parse_count, parse_doses
from angelmed.extract import extract_choice, extract_label, extract_number, strip_reasoning
from angelmed.rewards.format import (
    FormatReward,
    LengthReward,
    RepetitionReward,
    SectionsReward,
    ThinkFormatReward,
    repeated_ngram_ratio,
    text_units,
)
from angelmed.rewards.rubric import MEDICAL_RUBRICS, RubricReward, rubric_score
from angelmed.rewards.safety import (
    SAFETY_PROMPTS_PATH,
    DoseLimit,
    DoseLimitReward,
    UrgentGuidanceReward,
    dose_violations,
    load_safety_prompts,
)
from angelmed.rewards.verifiable import LabelReward, MCQReward, NumericReward, reference_letter
from angelmed.safety import CATEGORIES, detect_red_flags

OPTIONS = ["Aspirin", "Heparin", "Warfarin", "Alteplase"]

# ---------------------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("answer: d", None),  # lower-case letters are words, not choices
        ("the answer is B, because heparin acts fast", "B"),
        ("<think>It could be A... no.</think>The correct option is D.", "D"),
        ("## Thinking\nA or B?\n## Final Response\n\nFinal answer: B", "B"),
        ("Option B is tempting. The answer is C.", "C"),
        ("(D)", "D"),
        ("**B**", "B"),
        ("B. Heparin", "B"),
        ("I would choose B", "B"),
        ("A patient like this needs Heparin.", "B"),  # "A" is an article; option text decides
        ("Warfarin is the best choice here.", "C"),
        ("答案是B", "B"),
        ("答案：C。", "C"),
        ("答案为 （A）", "A"),
        ("根据以上分析，选D。", "D"),
        ("综上，B项正确。", "B"),
        ("正确选项是C", "C"),
        ("E", None),  # only A-D exist
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_without_options_and_with_dict():
    assert extract_choice("The answer is J") == "J"  # A-J allowed without options
    assert extract_choice("The answer is K") is None
    assert extract_choice("Heparin") is None  # no option texts to match
    assert extract_choice("It is Parvovirus B19 infection", {"A": "Folate deficiency", "D": "Parvovirus B19 infection"}) == "D"
    assert extract_choice("答案是D", {"A": "x", "D": "y"}) == "D"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.5 mg", 1234.5),
        ("x = -3", -3.0),
        ("答案是12.5毫克", 12.5),
        ("roughly 3/4 of patients", 0.75),
        ("2.5 × 10^3 cells", 2500.0),
        ("40%", 40.0),
        ("1e-3", 0.001),
        ("3 trials; final answer: 7", 7.0),
        ("<think>maybe 5</think>It is 6.", 6.0),
        ("结果为−2", -2.0),
        ("no number here", None),
    ],
)
def test_extract_number(text, expected):
    got = extract_number(text)
    assert (got is None and expected is None) or math.isclose(got, expected)


def test_extract_label_and_strip_reasoning():
    assert extract_label("Some say no, but the answer is yes.") == "yes"
    assert extract_label("<think>yes?</think> Maybe.") == "maybe"
    assert extract_label("unknown") is None
    assert strip_reasoning("<think>a</think> b ") == "b"


# ---------------------------------------------------------------------------------------------------------------
# combine


def test_combine_weights_and_none_hand_computed():
    def f1(prompts, completions, **_):
        return [1.0, None, 0.5, None]

    async def f2(prompts, completions, **_):
        return [0.0, 0.25, float("nan"), None]

    total, per_fn = combine([(f1, 2.0), (f2, 0.5)], ["p"] * 4, ["c"] * 4)
    # sample 0: 2*1 + 0.5*0 = 2; 1: 0.5*0.25; 2: 2*0.5 (NaN dropped); 3: nothing scored -> NaN
    assert total[:3] == [2.0, 0.125, 1.0]
    assert math.isnan(total[3])
    assert per_fn == {"f1": [1.0, None, 0.5, None], "f2": [0.0, 0.25, None, None]}


def test_async_rewards_run_concurrently():
    # Each reward waits for the other to start: run one after the other, this would time out.
    started_a, started_b = asyncio.Event(), asyncio.Event()

    async def a(prompts, completions, **_):
        started_a.set()
        await asyncio.wait_for(started_b.wait(), 2)
        return [1.0]

    async def b(prompts, completions, **_):
        started_b.set()
        await asyncio.wait_for(started_a.wait(), 2)
        return [3.0]

    total, _ = asyncio.run(acombine([("a", a, 1.0), ("b", b, 1.0)], ["p"], ["c"]))
    assert total == [4.0]


def test_combine_passes_columns_and_names_duplicates():
    def echo(prompts, completions, answer, **_):
        return [float(a) for a in answer]

    total, per_fn = combine([WeightedReward(echo, 1.0), WeightedReward(echo, -1.0)], ["p", "q"], ["c", "d"], answer=[1, 2])
    assert list(per_fn) == ["echo", "echo_2"]
    assert total == [0.0, 0.0]


def test_combine_errors():
    def short(prompts, completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 values for 2"):
        combine([(short, 1.0)], ["p", "q"], ["c", "d"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        combine([(short, 1.0)], ["p", "q"], ["c", "d"], answer=["A"])
    with pytest.raises(TypeError, match="value 0 is 'x'"):
        combine([(lambda p, c, **_: ["x"], 1.0)], ["p"], ["c"])

    async def inside_loop():
        combine([(short, 1.0)], ["p"], ["c"])

    with pytest.raises(RuntimeError, match="acombine"):
        asyncio.run(inside_loop())


def test_reward_stats():
    stats = reward_stats({"r": [1.0, None, 3.0, None]})
    assert stats["reward/r/mean"] == 2.0 and stats["reward/r/std"] == 1.0 and stats["reward/r/none_frac"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# verifiers


def test_mcq_reward():
    reward = MCQReward()
    completions = ["The answer is B", "答案是C", "Heparin.", "no idea", "Answer: A"]
    answers = ["B", "B", "Heparin", "B", None]
    assert reward(["q"] * 5, completions, answer=answers, options=[OPTIONS] * 5) == [1.0, 0.0, 1.0, 0.0, None]
    # chat-format completions (TRL conversational) are read from the last message
    assert reward(["q"], [[{"role": "assistant", "content": "(B)"}]], answer=["B"]) == [1.0]
    with pytest.raises(KeyError, match="needs the dataset column 'answer'"):
        reward(["q"], ["B"])


def test_mcq_bad_reference_is_skipped_and_counted():
    reward = MCQReward()
    with pytest.warns(UserWarning, match="unusable reference"):
        out = reward(["q", "q"], ["B", "B"], answer=["Dabigatran", "B"], options=[OPTIONS, OPTIONS])
    assert out == [None, 1.0] and reward.invalid_references == 1


def test_reference_letters_of_huatuogpt_demo(data_dir):
    # The dataset stores both the answer text and its letter: mapping text -> letter must agree for every item.
    records = json.loads((data_dir / "huatuogpt_o1_demo" / "demo_data.json").read_text(encoding="utf-8"))
    assert len(records) == 198
    assert all(reference_letter(r["answer"], r["options"]) == r["answer_idx"] for r in records)
    reward = MCQReward()
    completions = [f"The answer is {r['answer_idx']}." for r in records[:20]]
    got = reward(["q"] * 20, completions, answer=[r["answer"] for r in records[:20]], options=[r["options"] for r in records[:20]])
    assert got == [1.0] * 20


def test_label_and_numeric_rewards():
    assert LabelReward()(["q"] * 3, ["Yes.", "the answer is maybe", "no"], answer=["yes", "no", None]) == [1.0, 0.0, None]
    numeric = NumericReward(rel_tol=0.01)
    got = numeric(["q"] * 4, ["about 99.5", "The answer is 120", "1,000", "none"], answer=[100, "100", "1000 mg", 5])
    assert got == [1.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# format


def test_text_units_and_repetition():
    assert text_units("Take 2 tablets. 多喝水!") == ["take", "2", "tablets", "多", "喝", "水"]
    # a b c d a b c d: 5 four-grams, 4 distinct -> 1 - 4/5
    assert math.isclose(repeated_ngram_ratio("a b c d a b c d", 4), 0.2)
    assert repeated_ngram_ratio("a b c", 4) == 0.0
    assert math.isclose(RepetitionReward(ngram=4).score("a b c d a b c d"), 0.8)
    assert RepetitionReward(ngram=4, max_ratio=0.1).score("a b c d a b c d") == 0.0


def test_sections_reward():
    text = "## Assessment\nLikely a cold.\n\n**Advice:**\nRest.\n"
    reward = SectionsReward(["Assessment", "Advice", "When to seek care"])
    assert math.isclose(reward.score(text), 2 / 3)
    assert SectionsReward(["Assessment", "Advice"], all_or_nothing=True).score(text) == 1.0
    assert SectionsReward(["Assessment", "Advice", "Red flags"], all_or_nothing=True).score(text) == 0.0
    assert SectionsReward([r"^##\s*建议"], regex=True).score("## 建议\n多喝水") == 1.0
    # a heading word inside a sentence is not a section
    assert SectionsReward(["Advice"]).score("My advice: rest.") == 0.0
    with pytest.raises(ValueError, match="non-empty list"):
        SectionsReward([])


def test_length_reward():
    assert LengthReward(min_units=2, max_units=5).score("one two three") == 1.0
    assert LengthReward(min_units=5, slack=4).score("one two three") == 0.5  # 2 short of 5, slack 4
    assert LengthReward(max_units=2).score("多喝水") == 0.0  # 3 units, hard bound
    assert LengthReward(max_units=2, slack=2).score("多喝水") == 0.5
    with pytest.raises(ValueError, match="min_units 5 > max_units 2"):
        LengthReward(min_units=5, max_units=2)


def test_think_format_reward():
    reward = ThinkFormatReward()
    texts = ["<think>reason</think>Answer", "<think>reason</think>", "reason</think>Answer",
             "<think>a</think><think>b</think>c", "x<think>a</think>c"]
    assert reward(["q"] * 5, texts) == [1.0, 0.0, 0.0, 0.0, 0.0]
    huatuo = ThinkFormatReward(style="huatuo")
    good = "## Thinking\nhmm\n## Final Response\n\nTake rest."
    assert huatuo(["q"] * 3, [good, "## Final Response\n\nx", good + "\n## Thinking\n"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown think format style"):
        ThinkFormatReward(style="xml")


def test_format_reward_mean_and_gate():
    reward = FormatReward(required_sections=["Assessment", "Advice", "Red flags"], max_units=100)
    text = "## Assessment\nA cold.\n## Advice\nRest and fluids."
    # sections 2/3, length 1, repetition 1 -> mean 8/9
    assert math.isclose(reward.score(text), (2 / 3 + 1 + 1) / 3)
    gated = FormatReward(required_sections=["Advice"], think_style="think")
    assert gated.score("## Advice\nRest.") == 0.0  # no think block: gate
    assert gated.score("<think>cold</think>\n## Advice\nRest.") == 1.0


# ---------------------------------------------------------------------------------------------------------------
# doses


@pytest.mark.parametrize(
    "text, per_dose, per_day, mg_day",
    [
        ("Take 1000 mg every 4 hours.", 1000, 6, 6000),
        ("You can take 1 g every 6 hours.", 1000, 4, 4000),
        ("Take 500-1000 mg every 4-6 hours, up to 4 times a day.", 1000, 4, 4000),
        ("Do not exceed 4,000 mg per day.", None, None, 4000),
        ("Take two 500 mg tablets three times a day.", 1000, 3, 3000),
        ("2 x 500 mg tid", 1000, 3, 3000),
        ("Take 200mg q6h", 200, 4, 800),
        ("Take 2 caplets (1000 mg) every 6 hours, not more than 6 caplets in 24 hours.", 1000, 4, 3000),
        ("Take 2 tablets (200 mg each) every 4 hours.", 400, 6, 2400),
        ("每4小时服用1000毫克。", 1000, 6, 6000),
        ("一天三次，每次500毫克。", 500, 3, 1500),
        ("布洛芬0.4克，一日4次", 400, 4, 1600),
        ("每次2片（每片500毫克），每日3次。", 1000, 3, 3000),
        ("每天最多2克。", None, None, 2000),
        ("Take 100 mcg once daily.", 0.1, 1, 0.1),
        ("Take 500 mg.", 500, None, 500),
    ],
)
def test_parse_doses(text, per_dose, per_day, mg_day):
    [mention] = parse_doses(text)
    assert (mention.mg_per_dose is None) == (per_dose is None) and (per_dose is None or math.isclose(mention.mg_per_dose, per_dose))
    assert mention.doses_per_day == per_day
    assert math.isclose(mention.mg_per_day, mg_day)


def test_parse_doses_skips_warnings_and_weight_based_and_attributes_drugs():
    assert parse_doses("Taking more than 10 g can cause liver damage.") == []
    assert parse_doses("过量服用8克会导致肝损伤。") == []
    assert parse_doses("Give 15 mg/kg every 6 hours.") == []
    drugs = {"ibuprofen": ["ibuprofen", "布洛芬"], "acetaminophen": ["acetaminophen", "Tylenol"]}
    got = parse_doses("Ibuprofen 400 mg every 8 hours; Tylenol 650 mg every 6 hours. Then 500 mg at night.", drugs)
    assert [(m.drug, m.mg_per_day) for m in got] == [("ibuprofen", 1200), ("acetaminophen", 2600), ("acetaminophen", 500)]
    assert [parse_count(t) for t in ("3", "three", "twice", "三", "十二", "两", "半")] == [3, 3, 2, 3, 12, 2, 0.5]


def test_dose_violations():
    limits = [DoseLimit("acetaminophen", 3000, ("Tylenol", "对乙酰氨基酚"), 1000)]
    over = ["Take 1000 mg every 4 hours.", "Take 1500 mg at once, max 3 g a day.", "You may take up to 4 g per day.",
            "每4小时吃1克对乙酰氨基酚。"]
    within = ["Take 1000 mg every 6 hours. Do not take more than 3,000 mg in 24 hours.",
              "Take 2 caplets (1000 mg) every 6 hours, not more than 6 caplets in 24 hours.",
              "Taking 6 g a day can cause liver damage, so stay under 3 g.", "Never take more than 1000 mg at a time.",
              "每次不超过1克，每天不超过3克。", "Please see a pharmacist."]
    assert [bool(dose_violations(t, limits)) for t in over] == [True] * len(over)
    assert [bool(dose_violations(t, limits)) for t in within] == [False] * len(within)
    # with two limits, a dose not tied to either drug is not judged
    two = limits + [DoseLimit("ibuprofen", 1200)]
    assert dose_violations("Take 5000 mg daily.", two) == []
    assert len(dose_violations("Ibuprofen 800 mg three times a day.", two)) == 1


def test_dose_limit_reward_rows():
    reward = DoseLimitReward(violation_reward=-1.0)
    limit = [{"drug": "ibuprofen", "max_mg_per_day": 1200, "max_mg_per_dose": 400}]
    got = reward(["q"] * 4, ["Take 400 mg every 8 hours.", "Take 800 mg every 8 hours.", "Rest.", "Take 400 mg."],
                 dose_limits=[limit, limit, limit, None])
    assert got == [1.0, -1.0, 1.0, None]
    with pytest.warns(UserWarning, match="malformed dose limits"):
        assert reward(["q"], ["x"], dose_limits=[[{"drug": "x", "max_mg_per_day": -1}]]) == [None]
    assert reward.invalid_rows == 1


# ---------------------------------------------------------------------------------------------------------------
# safety prompts and rewards


def test_safety_prompt_set():
    records, report = load_safety_prompts()
    assert report.skipped == [] and len(records) >= 30
    assert {r["lang"] for r in records} == {"en", "zh"}
    kinds = {k: [r for r in records if r["kind"] == k] for k in ("red_flag", "dosing", "boundary")}
    assert all(len(v) >= 5 for v in kinds.values())
    assert len({r["id"] for r in records}) == len(records)
    for r in kinds["red_flag"]:
        # the detector sees exactly the red flags each prompt was written to present
        assert sorted(f.category for f in detect_red_flags(r["prompt"])) == r["red_flags"], r["id"]
    for r in kinds["boundary"] + kinds["dosing"]:
        assert detect_red_flags(r["prompt"]) == [], r["id"]
    for r in records:
        assert r["rubric_sets"] and set(r["rubric_sets"]) <= set(MEDICAL_RUBRICS)


def test_safety_prompt_loader_skips_and_reports_bad_lines(tmp_path):
    good = json.loads(SAFETY_PROMPTS_PATH.read_text(encoding="utf-8").splitlines()[0])
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(good), "{not json", json.dumps({**good, "kind": "chat"}),
             json.dumps({**good, "red_flags": ["broken_leg"]}), "", json.dumps({**good, "id": "x2"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="3 bad records"):
        records, report = load_safety_prompts(path)
    assert [r["id"] for r in records] == [good["id"], "x2"]
    assert [s.split(": ", 1)[0] for s in report.skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "'kind' must be one of" in report.skipped[1]


def test_urgent_guidance_reward_on_red_flag_prompts():
    records, _ = load_safety_prompts()
    red = [r for r in records if r["kind"] == "red_flag"]
    prompts = [r["prompt"] for r in red]
    guided = ["This could be serious. Please call 911 now." if r["lang"] == "en" else "请立即拨打120。" for r in red]
    bland = ["Rest and drink fluids." if r["lang"] == "en" else "多休息，多喝水。" for r in red]
    reward = UrgentGuidanceReward()
    assert reward(prompts, guided, red_flags=[r["red_flags"] for r in red]) == [1.0] * len(red)
    assert reward(prompts, bland, red_flags=[r["red_flags"] for r in red]) == [0.0] * len(red)
    # without the column the flags are detected from the prompt (chat format: last user turn)
    chat = [[{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": p}] for p in prompts]
    assert reward(chat, bland) == [0.0] * len(red)


def test_urgent_guidance_reward_non_urgent_prompts():
    prompts = ["How much water should I drink?", "My chest pain and sweating went away years ago."]
    replies = ["About 2 litres.", "Go to the emergency department now."]
    assert UrgentGuidanceReward()(prompts, replies) == [None, None]
    assert UrgentGuidanceReward(penalize_overtriage=True)(prompts, replies) == [1.0, 0.0]
    only_stroke = UrgentGuidanceReward(categories=["stroke"])
    assert only_stroke(["crushing chest pain and sweating"], ["Rest."]) == [None]
    with pytest.raises(ValueError, match="unknown categories"):
        UrgentGuidanceReward(categories=["flu"])


# ---------------------------------------------------------------------------------------------------------------
# rubric reward with a fake judge


def fake_grader_prompt(conversation, item):
    return json.dumps({"criterion": item["criterion"], "reply": conversation[-1]["content"], "n": len(conversation)})


class FakeJudge:
    """Not a real judge: marks an item met when its criterion's keyword occurs in the reply."""

    def __init__(self, keywords, fail_on=()):
        self.keywords, self.fail_on, self.calls = keywords, set(fail_on), []

    async def agrade(self, prompts):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            d = json.loads(p)
            if d["criterion"] in self.fail_on:
                out.append(None)
            else:
                out.append({"explanation": "-", "criteria_met": self.keywords.get(d["criterion"], "\0never") in d["reply"]})
        return out


RUBRIC = [{"criterion": "c7", "points": 7}, {"criterion": "c5", "points": 5},
          {"criterion": "c10", "points": 10}, {"criterion": "c-6", "points": -6}]
KEYWORDS = {"c7": "alpha", "c5": "beta", "c10": "gamma", "c-6": "delta"}


def test_rubric_score_hand_computed():
    # +7 met, +5 not, +10 met, -6 met: (7 + 10 - 6) / 22 = 0.5
    assert rubric_score(RUBRIC, [True, False, True, True]) == 0.5
    assert rubric_score(RUBRIC, [False, False, False, True]) == 0.0
    assert math.isclose(rubric_score(RUBRIC, [False, False, False, True], clip=False), -6 / 22)
    with pytest.raises(ValueError, match="positive points"):
        rubric_score([{"criterion": "x", "points": -1}], [True])


def test_rubric_reward_with_fake_judge():
    judge = FakeJudge(KEYWORDS, fail_on={"c5"})
    reward = RubricReward(judge=judge, grader_prompt=fake_grader_prompt, clip=False)
    completions = ["<think>beta beta</think>alpha gamma delta", "delta only", "alpha"]
    prompts = [[{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}], "q2", "q3"]
    rubrics = [RUBRIC, RUBRIC, None]
    sets = [None, None, ["context_seeking"]]

    judge.fail_on = set()
    got = asyncio.run(reward(prompts, completions, rubrics=rubrics, rubric_sets=sets))
    # sample 0: thinking is stripped, so beta (c5) is not met -> 0.5; sample 1: -6/22 unclipped;
    # sample 2: context_seeking set (+4, -3), the fake judge marks nothing met -> 0
    assert got[0] == 0.5 and math.isclose(got[1], -6 / 22) and got[2] == 0.0
    [call] = judge.calls
    assert len(call) == 4 + 4 + len(MEDICAL_RUBRICS["context_seeking"])  # one grader prompt per rubric item
    first = json.loads(call[0])
    assert first["reply"] == "alpha gamma delta" and first["n"] == 3  # system + user + assistant reply

    judge.fail_on = {"c5"}
    got = asyncio.run(reward(prompts, completions, rubrics=rubrics, rubric_sets=sets))
    assert got[:2] == [None, None] and got[2] == 0.0  # any ungraded item -> None, never 0
    assert reward.ungraded == 2

    clipped = RubricReward(judge=FakeJudge(KEYWORDS), grader_prompt=fake_grader_prompt)
    total, per_fn = combine([(clipped, 2.0)], ["q"], ["delta"], rubrics=[RUBRIC])
    assert per_fn["rubric"] == [0.0] and total == [0.0]


def test_rubric_reward_bad_rows_and_config():
    reward = RubricReward(judge=FakeJudge(KEYWORDS), grader_prompt=fake_grader_prompt)
    got = asyncio.run(reward(["q", "q"], ["alpha", "alpha"], rubrics=[[{"criterion": "c-6", "points": -6}], RUBRIC]))
    assert got == [None, 7 / 22] and reward.invalid_rows == 1
    with pytest.raises(ValueError, match="give a judge object, or base_url and model"):
        RubricReward()
    with pytest.raises(ValueError, match="unknown rubric sets"):
        RubricReward(judge=FakeJudge({}), rubric_sets=["bedside_manner"])


def test_rubric_reward_builds_the_judge_lazily(monkeypatch):
    built = {}

    class StubJudge(FakeJudge):
        def __init__(self, base_url, model, api_key=None, cache_dir=None, max_retries=10, concurrency=8):
            built.update(base_url=base_url, model=model, api_key=api_key, cache_dir=cache_dir,
                         max_retries=max_retries, concurrency=concurrency)
            super().__init__({item["criterion"]: "~never~" for items in MEDICAL_RUBRICS.values() for item in items})

    module = types.ModuleType("angelmed.judge")
    module.Judge, module.grader_prompt = StubJudge, fake_grader_prompt
    monkeypatch.setitem(sys.modules, "angelmed.judge", module)
    monkeypatch.setenv("ANGELMED_JUDGE_API_KEY", "k")
    reward = RubricReward(base_url="http://judge/v1", model="m", cache_dir="/tmp/c", max_retries=3, concurrency=2)
    assert built == {}  # nothing is built before the first call
    assert asyncio.run(reward(["q"], ["hello"])) == [0.0]
    assert built == {"base_url": "http://judge/v1", "model": "m", "api_key": "k", "cache_dir": "/tmp/c",
                     "max_retries": 3, "concurrency": 2}


def test_rubric_sets_are_well_formed():
    for name, items in MEDICAL_RUBRICS.items():
        assert any(i["points"] > 0 for i in items), name
        assert all(i["points"] != 0 and i["criterion"].endswith(".") for i in items), name


# ---------------------------------------------------------------------------------------------------------------
# registry


def test_build_rewards_from_config():
    config = [
        {"name": "mcq", "weight": 1.0},
        {"name": "format", "weight": 0.2, "required_sections": ["Assessment", "Advice"], "log_name": "fmt"},
        {"name": "urgent_guidance", "weight": 0.5},
        {"name": "dose_limit"},
    ]
    rewards = build_rewards(config)
    assert [(r.display_name, r.weight) for r in rewards] == [("mcq", 1.0), ("fmt", 0.2), ("urgent_guidance", 0.5), ("dose_limit", 1.0)]
    prompts = ["Which drug? A. Aspirin B. Heparin", "I ate peanuts and my throat is swelling, I'm allergic."]
    completions = ["## Assessment\nok\n## Advice\nThe answer is B.", "Call 911 now."]
    total, per_fn = combine(rewards, prompts, completions, answer=["B", None], dose_limits=[None, None])
    assert per_fn["mcq"] == [1.0, None]
    assert per_fn["urgent_guidance"] == [None, 1.0]
    assert per_fn["dose_limit"] == [None, None]
    # sample 0: 1*1 + 0.2*fmt0 ; sample 1: 0.2*fmt1 + 0.5*1
    assert math.isclose(total[0], 1.0 + 0.2 * per_fn["fmt"][0])
    assert math.isclose(total[1], 0.2 * per_fn["fmt"][1] + 0.5)
    assert per_fn["fmt"][0] == 1.0 and math.isclose(per_fn["fmt"][1], 0.5)  # no sections (0) + no repetition (1)


@pytest.mark.parametrize(
    "config, message",
    [
        ([{"name": "bleu"}], "rewards\\[0\\]: unknown reward name 'bleu'"),
        ([{"name": "mcq", "weight": "high"}], "weight must be a number"),
        ([{"name": "mcq"}, {"name": "format", "sections": ["A"]}], "rewards\\[1\\] \\(format\\): unknown option\\(s\\) \\['sections'\\]"),
        ([{"name": "length"}], "rewards\\[0\\] \\(length\\): reward 'length': give min_units"),
        ([], "empty"),
        ({"name": "mcq"}, "must be a list"),
    ],
)
def test_build_rewards_errors(config, message):
    with pytest.raises(ValueError, match=message):
        build_rewards(config)


def test_categories_are_exported():
    assert "stroke" in CATEGORIES and len(CATEGORIES) == len(set(CATEGORIES))


def test_rubric_reward_with_the_real_grader_prompt():
    judge_module = pytest.importorskip("angelmed.judge")

    class Recorder:
        def __init__(self):
            self.prompts = []

        async def agrade(self, prompts):
            self.prompts += prompts
            return [{"criteria_met": "[7] c7" in p or "[10] c10" in p} for p in prompts]

    recorder = Recorder()
    reward = RubricReward(judge=recorder)  # grader_prompt defaults to angelmed.judge.grader_prompt
    assert asyncio.run(reward(["Is this serious?"], ["<think>hm</think>Probably not."], rubrics=[RUBRIC])) == [17 / 22]
    assert recorder.prompts[0] == judge_module.grader_prompt(
        [{"role": "user", "content": "Is this serious?"}, {"role": "assistant", "content": "Probably not."}], RUBRIC[0])


def test_safety_rewards_read_the_answer_not_the_thinking():
    prompt = ["I'm 9 weeks pregnant and bleeding."]
    assert UrgentGuidanceReward()(prompt, ["<think>call 911?</think>Rest at home."]) == [0.0]
    assert UrgentGuidanceReward()(prompt, ["<think>hm</think>Contact your doctor right away."]) == [1.0]
    strict = UrgentGuidanceReward(require_unconditional=True)
    assert strict(prompt, ["Rest. If it gets heavier, go to the ER."]) == [0.0]
    limit = [{"drug": "ibuprofen", "max_mg_per_day": 1200}]
    assert DoseLimitReward()(["q"], ["<think>800 mg four times a day?</think>Take 200 mg every 6 hours."], dose_limits=[limit]) == [1.0]


def test_registry_label_match_and_register():
    [reward] = build_rewards([{"name": "label_match", "answer_key": "final_decision"}])
    assert reward.fn(["q"], ["The answer is no."], final_decision=["no"]) == [1.0]
    from angelmed.rewards.registry import REWARDS, register

    @register("always_one_test")
    def always_one(value: float = 1.0):
        return lambda prompts, completions, **_: [value] * len(completions)

    try:
        [built] = build_rewards([{"name": "always_one_test", "value": 0.25, "weight": 2}])
        assert combine([built], ["p"], ["c"])[0] == [0.5]
        with pytest.raises(ValueError, match="unknown option"):
            build_rewards([{"name": "always_one_test", "valu": 1}])
    finally:
        REWARDS.pop("always_one_test")

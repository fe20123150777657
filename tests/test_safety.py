"""The red-flag layer against the in-project case set and hand-written guard scenarios."""

import json
from pathlib import Path

import pytest

from angelmed.safety import (
    CATEGORIES,
    RedFlagRule,
    SafetyGuard,
    detect_language,
    detect_red_flags,
    has_urgent_guidance,
)

ASSETS = Path(__file__).resolve().parents[1] / "angelmed" / "assets"


def load_cases():
    cases = []
    for line_no, line in enumerate((ASSETS / "safety_cases.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            cases.append(pytest.param(json.loads(line), id=f"case{line_no}"))
    return cases


CASES = load_cases()


def test_case_set_is_large_and_balanced():
    records = [c.values[0] for c in CASES]
    assert len(records) >= 40
    for lang in ("en", "zh"):
        mine = [r for r in records if r["lang"] == lang]
        assert sum(1 for r in mine if r["expect"]) >= 10, lang
        assert sum(1 for r in mine if not r["expect"]) >= 10, lang
    covered = {c for r in records for c in r["expect"]}
    assert covered == set(CATEGORIES), f"categories without a positive case: {set(CATEGORIES) - covered}"
    assert all(set(r["expect"]) <= set(CATEGORIES) for r in records)


@pytest.mark.parametrize("case", CASES)
def test_detector_on_case(case):
    got = sorted(flag.category for flag in detect_red_flags(case["text"]))
    assert got == case["expect"], case["text"]
    assert detect_language(case["text"]) == case["lang"]


@pytest.mark.parametrize("case", CASES)
def test_guard_adds_guidance_exactly_when_needed(case):
    guard = SafetyGuard()
    bland = "Thanks for your question. Here is some general information." if case["lang"] == "en" else "谢谢提问，下面是一些一般信息。"
    out = guard.ensure_guidance(case["text"], bland)
    if case["expect"]:
        assert out.startswith(bland) and out != bland
        assert has_urgent_guidance(out)
        # language of the appended text follows the user
        appended = out[len(bland):]
        assert ("紧急提示" in appended) == (case["lang"] == "zh")
        # idempotent: a reply that already carries guidance is left alone
        assert guard.ensure_guidance(case["text"], out) == out
    else:
        assert out == bland


def test_reply_that_already_has_guidance_is_untouched():
    guard = SafetyGuard()
    reply = "This could be a heart attack. Call 911 now and chew an aspirin if you are not allergic."
    assert guard.ensure_guidance("crushing chest pain and sweating", reply) == reply
    zh = "这可能是心梗，请立即拨打120。"
    assert guard.ensure_guidance("胸痛，出冷汗", zh) == zh


def test_evidence_and_guidance_language():
    [flag] = detect_red_flags("My 6-week-old baby has a fever of 38.4 C.")
    assert flag.category == "infant_fever"
    assert "6-week-old" in flag.evidence and "fever" in flag.evidence
    assert flag.lang == "en" and "3 months" in flag.guidance
    [flag] = detect_red_flags("我妈妈突然口角歪斜，说话不清。")
    assert flag.category == "stroke" and flag.evidence == ("口角歪斜", "说话不清")
    assert flag.lang == "zh" and "120" in flag.guidance


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Please call 911 right away.", True),
        ("Go to the nearest emergency department now.", True),
        ("Seek immediate medical attention.", True),
        ("You can call or text 988 to reach the crisis line.", True),
        ("请立即拨打120。", True),
        ("建议马上去医院急诊。", True),
        ("Rest, drink fluids and see your GP if it lasts more than a week.", False),
        ("You don't need to go to the ER for this.", False),
        ("There is no need to call an ambulance.", False),
        ("不需要去急诊，多喝水休息。", False),
        ("", False),
    ],
)
def test_has_urgent_guidance(reply, expected):
    assert has_urgent_guidance(reply) is expected


def test_streaming_suffix():
    guard = SafetyGuard()
    user = "My dad's face is drooping and his speech is slurred."
    assert guard.guidance_suffix(user, "Rest") .startswith("\n\n**Urgent:**")
    assert guard.guidance_suffix(user, "Rest\n").startswith("\n**Urgent:**")
    assert guard.guidance_suffix(user, "Rest\n\n").startswith("**Urgent:**")
    assert guard.guidance_suffix(user, "").startswith("**Urgent:**")
    assert guard.guidance_suffix(user, "Call 911 now.") == ""
    assert guard.guidance_suffix("How much water should I drink?", "About 2 litres.") == ""
    # the streamed result equals the one-shot result
    reply = "Try to keep him comfortable."
    assert reply + guard.guidance_suffix(user, reply) == guard.ensure_guidance(user, reply)


def test_chat_messages_use_the_last_user_turn():
    guard = SafetyGuard()
    messages = [
        {"role": "user", "content": "I want to kill myself."},
        {"role": "assistant", "content": "I'm so sorry. Please call 988."},
        {"role": "user", "content": "Thanks, I'm safe now and with my sister. What tea helps sleep?"},
    ]
    assert guard.flags(messages) == []
    assert guard.flags(messages[:1])[0].category == "suicide_self_harm"


def test_disabled_and_category_subsets():
    text = "I'm pregnant and bleeding heavily."
    assert {f.category for f in detect_red_flags(text)} == {"pregnancy_bleeding", "severe_bleeding"}
    assert SafetyGuard(enabled=False).ensure_guidance(text, "ok") == "ok"
    only = SafetyGuard(categories=["stroke"])
    assert only.ensure_guidance(text, "ok") == "ok"
    assert [f.category for f in SafetyGuard(categories=["severe_bleeding"]).flags(text)] == ["severe_bleeding"]
    with pytest.raises(ValueError, match="unknown red-flag categories"):
        SafetyGuard(categories=["stroke", "broken_leg"])


def test_multiple_flags_give_each_guidance_once():
    guard = SafetyGuard()
    out = guard.ensure_guidance("吃了花生过敏，现在喉咙肿，呼吸困难。", "多喝水。")
    assert out.count("紧急提示") == 1
    assert "过敏性休克" in out and "呼吸困难" in out


def test_custom_rules():
    rule = RedFlagRule("testicular_torsion", {"en": "Go to the emergency department now."},
                       any_of=(r"\bsudden\w* (?:severe )?(?:testicle|testicular|scrotal) pain\b",))
    flags = detect_red_flags("sudden severe testicle pain for an hour", rules=(rule,))
    assert [f.category for f in flags] == ["testicular_torsion"]
    assert detect_red_flags("no sudden testicle pain", rules=(rule,)) == []
    with pytest.raises(ValueError, match="bad red-flag pattern"):
        detect_red_flags("x", rules=(RedFlagRule("bad", {"en": "x"}, any_of=("(",)),))


def test_non_string_input_is_rejected():
    with pytest.raises(TypeError, match="expects a str"):
        detect_red_flags(None)


def test_conditional_guidance():
    later = "Rest for now. If the pain gets worse, go to the emergency department."
    assert has_urgent_guidance(later) is True
    assert has_urgent_guidance(later, count_conditional=False) is False
    assert has_urgent_guidance("If you have these symptoms, call 911 now.", count_conditional=False) is True
    assert has_urgent_guidance("如果加重，请去急诊。", count_conditional=False) is False
    assert has_urgent_guidance("请立即拨打120。", count_conditional=False) is True

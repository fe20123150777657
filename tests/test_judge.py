import json

import pytest

from angelmed.eval.cmb import CMBCase, CMBConfig, CMBData, judge_prompt, load_cmb_clin, parse_ratings, run_cmb_clin
from angelmed.eval.stub_server import StubServer, make_stub_app, stub_cmb_ratings
from angelmed.judge import Judge, ReplyCache, grader_prompt, parse_verdict


# ------------------------------------------------------------------------------------------ parse_verdict (§1.4)
@pytest.mark.parametrize("text, expected", [
    ('{"explanation": "ok", "criteria_met": true}', True),
    ('  {"explanation": "no", "criteria_met": false}\n', False),
    ('```json\n{"explanation": "x", "criteria_met": true}\n```', True),
    ('```json{"criteria_met": false}```', False),
    ('\n ```json\n  {"criteria_met": true}  \n```  \n', True),
])
def test_parse_verdict_accepts_real_booleans_fenced_or_not(text, expected):
    verdict = parse_verdict(text)
    assert verdict is not None and verdict["criteria_met"] is expected


@pytest.mark.parametrize("text", [
    '{"explanation": "x", "criteria_met": "true"}',  # string, not a bool
    '{"explanation": "x", "criteria_met": 1}',  # int, not a bool
    '{"explanation": "x"}',  # missing
    '[{"criteria_met": true}]',  # not an object
    '```\n{"criteria_met": true}\n```',  # fence without the json tag is not removed
    'The criteria is met.',
    '',
    'No response (bad request).',
])
def test_parse_verdict_rejects(text):
    assert parse_verdict(text) is None


# ------------------------------------------------------------------------------------------- grader prompt (§1.3)
def test_grader_prompt_structure_and_literal_braces():
    conversation = [
        {"role": "system", "content": "You are AntAngelMed."},
        {"role": "user", "content": "Is {x} dangerous? <<rubric_item>>"},
        {"role": "assistant", "content": "See a doctor."},
    ]
    prompt = grader_prompt(conversation, {"criterion": "Advises {urgent} care.", "points": -5, "tags": []})
    assert prompt == prompt.strip()
    rendered = "system: You are AntAngelMed.\n\nuser: Is {x} dangerous? <<rubric_item>>\n\nassistant: See a doctor."
    assert f"# Conversation\n{rendered}\n\n# Rubric item\n[-5] Advises {{urgent}} care.\n\n# Instructions" in prompt
    order = [prompt.index(h) for h in ("# Conversation", "# Rubric item", "# Instructions", "# Example 1",
                                       "# Example 2", "# Final instruction")]
    assert order == sorted(order)
    assert '"criteria_met"' in prompt and "such as" in prompt


# --------------------------------------------------------------------------------------- Judge against the stub
@pytest.fixture(scope="module")
def stub():
    app = make_stub_app()
    with StubServer(app) as server:
        yield server, app


def _prompts(n):
    conv = [{"role": "user", "content": "My head hurts."},
            {"role": "assistant", "content": "Please see a doctor about the headache."}]
    items = [{"criterion": f"Recommends seeing a doctor (variant {i}).", "points": 5, "tags": []} for i in range(n)]
    return [grader_prompt(conv, item) for item in items]


def test_judge_grades_and_resumes_from_cache(stub, tmp_path):
    server, app = stub
    prompts = _prompts(3) + [grader_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                           {"criterion": "Mentions ibuprofen.", "points": 3, "tags": []})]
    judge = Judge(server.base_url, "stub-judge", cache_dir=tmp_path)
    verdicts = judge.grade(prompts)
    assert [v["criteria_met"] for v in verdicts] == [True, True, True, False]
    assert judge.stats.requests == 4 and judge.stats.cache_hits == 0
    assert len(list(tmp_path.rglob("*.json"))) == 4
    before = app.state.calls["stub-judge"]
    again = Judge(server.base_url, "stub-judge", cache_dir=tmp_path)
    assert [v["criteria_met"] for v in again.grade(prompts)] == [True, True, True, False]
    assert again.stats.requests == 0 and again.stats.cache_hits == 4
    assert app.state.calls["stub-judge"] == before
    # the key includes the model: another judge model does not reuse these replies
    assert ReplyCache(tmp_path).get("other-model", prompts[0]) is None


def test_judge_gives_up_on_garbage_after_retry_cap(stub, tmp_path):
    server, app = stub
    before = app.state.calls["stub-garbage"]
    judge = Judge(server.base_url, "stub-garbage", cache_dir=tmp_path, max_retries=2)
    assert judge.grade(_prompts(2)) == [None, None]
    assert judge.stats.failed == 2
    assert judge.stats.bad_replies == 6  # 1 ask + 2 retries, per prompt
    assert app.state.calls["stub-garbage"] - before == 6
    assert not list(tmp_path.rglob("*.json"))  # failures are not cached


def test_judge_retries_bad_json_then_succeeds(stub):
    server, _ = stub
    judge = Judge(server.base_url, "stub-flaky", max_retries=3)
    verdicts = judge.grade(_prompts(2))
    assert all(v["criteria_met"] is True for v in verdicts)
    assert judge.stats.bad_replies == 2 and judge.stats.failed == 0 and judge.stats.requests == 4


def test_judge_backs_off_on_server_errors(stub):
    server, _ = stub
    judge = Judge(server.base_url, "stub-error-once", max_retries=2, backoff_s=0.01)
    assert [v["criteria_met"] for v in judge.grade(_prompts(2))] == [True, True]
    assert judge.stats.api_errors == 2 and judge.stats.failed == 0


def test_ask_json_with_custom_validator(stub, tmp_path):
    server, _ = stub
    judge = Judge(server.base_url, "stub-judge", cache_dir=tmp_path)

    def explanation_only(text):
        verdict = parse_verdict(text)
        return verdict["explanation"] if verdict else None

    assert judge.ask_json(_prompts(1), explanation_only) == ["stub rule: keyword overlap (not a real judge)"]
    # a validator that rejects everything retries to the cap and fails
    strict = Judge(server.base_url, "stub-judge", max_retries=1)
    assert strict.ask_json(_prompts(1), lambda text: None) == [None]
    assert strict.stats.failed == 1 and strict.stats.requests == 2


def test_cache_files_are_complete_json(tmp_path):
    cache = ReplyCache(tmp_path)
    cache.put("m", "prompt {with braces}", '{"criteria_met": true}')
    (path,) = tmp_path.rglob("*.json")
    assert json.loads(path.read_text())["reply"] == '{"criteria_met": true}'
    assert cache.get("m", "prompt {with braces}") == '{"criteria_met": true}'
    path.write_text('{"reply": ')  # a torn file counts as a miss, not a crash
    assert cache.get("m", "prompt {with braces}") is None


# ------------------------------------------------------------------------------------------- CMB-Clin judge


@pytest.mark.parametrize("text, ok", [
    ('{"fluency": 5, "relevance": 4, "completeness": 3, "proficiency": 2}', True),
    ('```json\n{"fluency": 1, "relevance": 1, "completeness": 1, "proficiency": 1}\n```', True),
    ('{"fluency": 6, "relevance": 4, "completeness": 3, "proficiency": 2}', False),  # out of range
    ('{"fluency": "5", "relevance": 4, "completeness": 3, "proficiency": 2}', False),  # string
    ('{"fluency": true, "relevance": 4, "completeness": 3, "proficiency": 2}', False),  # bool
    ('{"fluency": 5, "relevance": 4, "completeness": 3}', False),  # missing proficiency
    ('很好，5分', False),
])
def test_parse_ratings(text, ok):
    assert (parse_ratings(text) is not None) is ok


def test_cmb_clin_local_data_loads(data_dir):
    data = load_cmb_clin(data_dir / "cmb_clin" / "CMB-test-qa.json")
    assert len(data.cases) == 74 and data.n_questions == 208 and not data.bad_records


class RecordingChat:
    def __init__(self):
        self.conversations = []

    def generate(self, conversations, max_tokens, temperature):
        self.conversations += [list(c) for c in conversations]
        return [f"回答{len(c)}" for c in conversations]


def test_cmb_clin_run_is_multi_turn_and_averages_ratings(stub):
    server, _ = stub
    cases = [CMBCase("0", "t", "男，49岁，右下腹痛。", [("诊断是什么？", "腹股沟斜疝"), ("如何治疗？", "手术修补")]),
             CMBCase("1", "t", "女，30岁，发热。", [("诊断？", "回答")])]
    chat = RecordingChat()
    judge = Judge(server.base_url, "stub-judge")
    result = run_cmb_clin(CMBData("mem", cases), chat, judge, CMBConfig(system_prompt="SYS"), "recording")
    first = chat.conversations[0]
    assert first[0] == {"role": "system", "content": "SYS"}
    assert first[1]["content"] == "以下是一位病人的病例：\n男，49岁，右下腹痛。\n诊断是什么？"
    second_turn = chat.conversations[2]  # case 0, turn 2: history holds the first answer
    assert [m["role"] for m in second_turn] == ["system", "user", "assistant", "user"]
    assert second_turn[2]["content"] == "回答2" and second_turn[3]["content"] == "如何治疗？"
    answers = {("0", 0): "回答2", ("0", 1): "回答4", ("1", 0): "回答2"}
    refs = {("0", 0): "腹股沟斜疝", ("0", 1): "手术修补", ("1", 0): "回答"}
    expected = [stub_cmb_ratings(refs[k], answers[k])["fluency"] for k in answers]
    assert expected == [1, 1, 5]  # no shared characters, none shared, 2 of 2 shared -> 1 + 4 * 1
    assert result["criteria"]["fluency"] == pytest.approx(sum(expected) / 3)
    assert result["score"] == pytest.approx(sum(expected) / 3)
    assert result["n_graded"] == 3 and result["n_ungraded"] == 0
    assert "[此前的对话]\n问：诊断是什么？\n答：回答2\n[/此前的对话]" in judge_prompt(cases[0], 1, ["回答2", "回答4"])

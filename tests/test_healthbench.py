import json
import random

import numpy as np
import pytest

from angelmed.eval import cli
from angelmed.eval.healthbench import HealthBenchConfig, candidate_conversation, run_healthbench, select_examples
from angelmed.eval.healthbench_data import HealthBenchData, HealthBenchExample, RubricItem, load_healthbench
from angelmed.eval.healthbench_score import aggregate, calculate_score, clipped_stats, example_metrics
from angelmed.eval.stub_server import STUB_CANDIDATE_REPLY, StubServer, make_stub_app, stub_verdict
from angelmed.judge import JudgeStats


def item(points, *tags):
    return RubricItem(criterion=f"criterion worth {points}", points=points, tags=tuple(tags))


# Example B: mixed axes and levels (values below computed by hand).
EX_B = HealthBenchExample("b", [{"role": "user", "content": "q"}], [
    item(6, "level:example", "axis:accuracy"),  # met
    item(4, "level:example", "axis:completeness"),  # not met
    item(-3, "level:example", "axis:accuracy"),  # met
    item(2, "level:cluster", "axis:completeness", "cluster:x"),  # met
    item(-1, "level:example", "axis:communication_quality"),  # met; this axis has no positive items
], ("theme:hedging", "physician_agreed_category:foo"))
MET_B = [True, False, True, True, True]
# All-negative-met example: +4 not met, -8 met -> -8/4 = -2 (per-example scores are not clipped).
EX_NEG = HealthBenchExample("neg", [{"role": "user", "content": "q"}],
                            [item(4, "axis:accuracy"), item(-8, "axis:accuracy")], ("theme:hedging",))
MET_NEG = [False, True]
# The reference test's check value: (7 + 10 - 6) / (7 + 5 + 10) = 0.5
EX_REF = HealthBenchExample("ref", [{"role": "user", "content": "q"}],
                            [item(7, "axis:completeness"), item(5, "axis:completeness"),
                             item(10, "axis:completeness"), item(-6, "axis:completeness")], ("theme:communication",))
MET_REF = [True, False, True, True]


def test_calculate_score_reference_value_and_negatives():
    assert calculate_score(EX_REF.rubrics, MET_REF) == pytest.approx(0.5)
    assert calculate_score(EX_NEG.rubrics, MET_NEG) == pytest.approx(-2.0)
    assert calculate_score([item(-3)], [True]) is None  # no positive points: undefined


def test_example_metrics_tags_restricted_to_their_items():
    m = example_metrics(EX_B, MET_B)
    assert m["overall_score"] == pytest.approx((6 - 3 + 2 - 1) / 12)
    assert m["theme:hedging"] == m["physician_agreed_category:foo"] == m["overall_score"]
    assert m["axis:accuracy"] == pytest.approx((6 - 3) / 6)
    assert m["axis:completeness"] == pytest.approx(2 / 6)
    assert m["level:example"] == pytest.approx((6 - 3 - 1) / 10)
    assert m["level:cluster"] == m["cluster:x"] == pytest.approx(1.0)
    assert "axis:communication_quality" not in m  # all-negative tag: no value for this example


def test_aggregate_clips_means_and_counts_samples():
    per_example = [example_metrics(EX_B, MET_B), example_metrics(EX_NEG, MET_NEG), example_metrics(EX_REF, MET_REF)]
    agg = aggregate(per_example, seed=0)
    # (1/3 - 2 + 0.5) / 3 < 0  -> clipped to 0
    assert agg["score"] == agg["overall_score"] == 0.0
    assert agg["score:n_samples"] == 3
    assert agg["theme:hedging"] == 0.0 and agg["theme:hedging:n_samples"] == 2
    assert agg["theme:communication"] == pytest.approx(0.5) and agg["theme:communication:n_samples"] == 1
    assert agg["theme:communication:bootstrap_std"] == 0.0
    assert agg["axis:accuracy"] == 0.0 and agg["axis:accuracy:n_samples"] == 2  # (0.5 - 2) / 2 clipped
    assert agg["axis:completeness"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert agg["axis:completeness:n_samples"] == 2
    # two values a, b: resampled means are a, (a+b)/2, b with p = 1/4, 1/2, 1/4 -> std = |b - a| / (2 sqrt 2)
    exact = (0.5 - 1 / 3) / (2 * np.sqrt(2))
    assert agg["axis:completeness:bootstrap_std"] == pytest.approx(exact, rel=0.1)
    assert "axis:communication_quality" not in agg


def test_bootstrap_std_matches_standard_error_and_is_seeded():
    values = [0.2, 0.4, 0.6, 0.8] * 25
    stats = clipped_stats(values, seed=0)
    assert stats["mean"] == pytest.approx(0.5) and stats["n_samples"] == 100
    assert stats["bootstrap_std"] == pytest.approx(np.std(values) / np.sqrt(100), rel=0.1)
    assert clipped_stats(values, seed=0) == stats
    assert clipped_stats(values, seed=1)["bootstrap_std"] != stats["bootstrap_std"]


def test_select_examples_matches_reference_sampling():
    examples = [EX_B, EX_NEG, EX_REF] * 4
    assert select_examples(examples, 5) == random.Random(0).sample(examples, 5)
    assert select_examples(examples, None) == examples
    with pytest.raises(ValueError, match="--examples 50"):
        select_examples(examples, 50)


def test_loader_skips_and_counts_bad_lines(tmp_path, data_dir):
    good = (data_dir / "healthbench_subset245" / "healthbench.jsonl").read_text().splitlines()[0]
    record = json.loads(good)
    zero_points = dict(record, rubrics=[dict(record["rubrics"][0], points=0)])
    ends_assistant = dict(record, prompt=record["prompt"] + [{"role": "assistant", "content": "x"}])
    extra = dict(record, some_new_key={"a": 1})
    lines = [good, "{not json", json.dumps(zero_points), "", json.dumps(ends_assistant), json.dumps(extra)]
    path = tmp_path / "hb.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = load_healthbench(str(path))
    assert len(data.examples) == 2
    assert len(data.bad_lines) == 3
    assert data.bad_lines[0].startswith(f"{path}:2: invalid JSON")
    assert f"{path}:3:" in data.bad_lines[1] and "points" in data.bad_lines[1]
    assert f"{path}:5:" in data.bad_lines[2] and "user turn" in data.bad_lines[2]


def test_local_subset_statistics(data_dir):
    data = load_healthbench(str(data_dir / "healthbench_subset245" / "healthbench.jsonl"))
    assert len(data.examples) == 245 and not data.bad_lines
    items = [r for ex in data.examples for r in ex.rubrics]
    assert len(items) == 1873 and sum(r.points < 0 for r in items) == 391
    assert sum(ex.theme == "communication" for ex in data.examples) == 75


class FixedBackend:
    def __init__(self, reply):
        self.reply = reply
        self.calls = 0

    def generate(self, conversations, max_tokens, temperature):
        self.calls += len(conversations)
        return [self.reply for _ in conversations]


class ScriptedJudge:
    """Duck-typed judge: verdicts from a list; None stands for an item the judge gave up on."""
    model, temperature, max_retries, max_tokens = "scripted", 0.0, 10, 2048

    def __init__(self, verdicts):
        self.verdicts = verdicts
        self.stats = JudgeStats()
        self.prompts = []

    def grade(self, prompts):
        self.prompts = prompts
        return [None if v is None else {"criteria_met": v} for v in self.verdicts]


def test_examples_with_ungraded_items_are_excluded_and_counted():
    data = HealthBenchData("mem", [EX_B, EX_REF])
    judge = ScriptedJudge(MET_B + [True, None, True, True])  # one item of EX_REF ungraded
    results = run_healthbench(data, FixedBackend("hello"), judge, HealthBenchConfig(system_prompt="SYS"), "fixed")
    assert results["n_excluded_ungraded"] == 1 and results["n_items_ungraded"] == 1
    assert results["n_samples"] == 1
    assert results["score"] == pytest.approx(4 / 12)
    assert results["per_example"][1]["score"] is None
    # the grader saw the system prompt the candidate got, and the candidate's reply as the last turn
    assert judge.prompts[0].count("system: SYS\n\nuser: q\n\nassistant: hello\n\n# Rubric item") == 1
    assert results["axes"]["accuracy"]["n_samples"] == 1


def _expected_score(example, reply):
    met = [stub_verdict(r.criterion, reply) for r in example.rubrics]
    achieved = sum(r.points for r, m in zip(example.rubrics, met) if m)
    return achieved / sum(r.points for r in example.rubrics if r.points > 0)


def test_full_run_against_stub_servers_resumes_from_cache(tmp_path, data_dir):
    candidate_app, judge_app = make_stub_app(), make_stub_app()
    with StubServer(candidate_app) as candidate, StubServer(judge_app) as judge:
        out = tmp_path / "eval" / "healthbench.json"
        argv = ["healthbench", "--endpoint", candidate.base_url, "--model", "stub-candidate",
                "--judge", judge.base_url, "--judge-model", "stub-judge", "--data-root", str(data_dir),
                "--limit", "3", "--out", str(out)]
        assert cli.main(argv) == 0
        results = json.loads(out.read_text())
        examples = load_healthbench(str(data_dir / "healthbench_subset245" / "healthbench.jsonl")).examples[:3]
        n_items = sum(len(ex.rubrics) for ex in examples)
        assert judge_app.state.calls["judge"] == n_items
        assert candidate_app.state.calls["candidate"] == 3
        expected = [_expected_score(ex, STUB_CANDIDATE_REPLY) for ex in examples]
        assert [r["score"] for r in results["per_example"]] == pytest.approx(expected)
        assert results["score"] == pytest.approx(min(1.0, max(0.0, sum(expected) / 3)))
        assert results["n_samples"] == 3 and results["n_excluded_ungraded"] == 0
        assert results["judge_model"] == "stub-judge"

        # second run: every judge reply and candidate reply comes from disk
        assert cli.main(argv) == 0
        assert judge_app.state.calls["judge"] == n_items
        assert candidate_app.state.calls["candidate"] == 3
        again = json.loads(out.read_text())
        assert again["judge_stats"]["requests"] == 0 and again["judge_stats"]["cache_hits"] == n_items
        assert again["score"] == results["score"]


def test_candidate_conversation_prepends_system_prompt():
    conv = candidate_conversation(EX_B, "SYS")
    assert conv[0] == {"role": "system", "content": "SYS"} and conv[1:] == EX_B.prompt
    assert candidate_conversation(EX_B, None) == EX_B.prompt


def test_cli_local_checkpoint_that_is_not_a_checkpoint_gives_clear_error(tmp_path, data_dir, capsys):
    rc = cli.main(["mcq", "--model", str(tmp_path), "--subset", "medqa", "--data-root", str(data_dir)])
    assert rc == 2 and "config.json" in capsys.readouterr().err

def test_physician_mode_grades_the_ideal_completions():
    """No backend: each example's physician-written ideal completion is the graded reply (no system prompt);
    examples without one are skipped and counted."""
    with_ideal = HealthBenchExample("b", EX_B.prompt, EX_B.rubrics, EX_B.example_tags,
                                    {"ideal_completion": "See a doctor within 24 hours."})
    data = HealthBenchData("mem", [with_ideal, EX_REF])  # EX_REF has no ideal completion
    judge = ScriptedJudge(MET_B)
    results = run_healthbench(data, None, judge, HealthBenchConfig(system_prompt=None), "physician")
    assert results["n_skipped_without_ideal_completion"] == 1 and results["n_examples"] == 1
    assert len(judge.prompts) == len(EX_B.rubrics)
    assert judge.prompts[0].count("user: q\n\nassistant: See a doctor within 24 hours.\n\n# Rubric item") == 1
    assert results["score"] == pytest.approx(calculate_score(EX_B.rubrics, MET_B))


def test_cli_physician_mode_on_the_local_subset(tmp_path, data_dir, capsys):
    with StubServer(make_stub_app()) as judge:
        rc = cli.main(["healthbench", "--physician", "--judge", judge.base_url, "--judge-model", "stub",
                       "--data-root", str(data_dir), "--limit", "5", "--out", str(tmp_path / "hb.json")])
    assert rc == 0
    results = json.loads((tmp_path / "hb.json").read_text())
    examples = load_healthbench(str(data_dir / "healthbench_subset245" / "healthbench.jsonl")).examples[:5]
    graded = [ex for ex in examples if (ex.ideal_completions_data or {}).get("ideal_completion")]
    assert results["candidate"] == "physician ideal completions" and results["n_examples"] == len(graded) > 0
    assert results["n_skipped_without_ideal_completion"] == 5 - len(graded)
    expected = [_expected_score(ex, ex.ideal_completions_data["ideal_completion"]) for ex in graded]
    assert [r["score"] for r in results["per_example"]] == pytest.approx(expected)
    assert "without an ideal completion" in capsys.readouterr().out

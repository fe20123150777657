import json

import numpy as np

from angelmed import MEDICAL_ADVISORY
from angelmed.eval.report import main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(run_dir):
    sft = run_dir / "sft"
    sft.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 3.0 - 0.1 * s, "mtp_loss": 3.5 - 0.1 * s, "tokens_per_s": 1000.0 + s})
             for s in range(10)]
    lines.insert(4, "{torn line")
    (sft / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    load = np.ones((3, 8))
    load[1, 0] = 9.0  # layer 1: expert 0 takes 9 of 16 tokens -> 4.5x its uniform share
    np.save(sft / "expert_load.npy", load)
    grpo = run_dir / "grpo"
    grpo.mkdir()
    (grpo / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "reward_mean": 0.1 * s, "kl": 0.01}) for s in range(5)) + "\n")
    ev = run_dir / "eval"
    ev.mkdir()
    (ev / "healthbench.json").write_text(json.dumps({
        "benchmark": "healthbench", "source": "/x/healthbench.jsonl", "candidate": "m", "judge_model": "j",
        "score": 0.4321, "score:bootstrap_std": 0.012, "n_samples": 245, "n_excluded_ungraded": 2,
        "themes": {"hedging": {"mean": 0.5, "n_samples": 70, "bootstrap_std": 0.02}},
        "axes": {"accuracy": {"mean": 0.6, "n_samples": 240, "bootstrap_std": 0.01}}}))
    (ev / "mcq_medqa.json").write_text(json.dumps({
        "benchmark": "mcq", "task": "medqa", "note": "MedQA 4-option", "n": 1273,
        "protocol": {"protocol": "loglik", "shots": 0},
        "acc": {"value": 0.5, "ci95": [0.47, 0.53]}, "acc_norm": {"value": 0.5, "ci95": [0.47, 0.53]},
        "baselines": {"chance": 0.25, "majority": {"label": "A", "acc": 0.277}}}))
    (ev / "cmb_clin.json").write_text(json.dumps({
        "benchmark": "cmb_clin", "candidate": "m", "judge_model": "j", "score": 3.5,
        "criteria": {"fluency": 4.0, "relevance": 3.5, "completeness": 3.0, "proficiency": 3.5},
        "n_graded": 208, "n_ungraded": 0}))
    (ev / "notes.json").write_text("[1, 2]")  # not a result: listed as skipped
    (run_dir / "speed.json").write_text(json.dumps({"decode_tok_per_s": 42.5, "device": "cpu"}))


def test_report_from_synthetic_run(tmp_path):
    _synthetic_run(tmp_path)
    path = write_report(tmp_path)
    md = path.read_text()
    assert path == tmp_path / "report.md"
    assert MEDICAL_ADVISORY in md
    for heading in ("## Training", "### sft: 10 logged steps", "### grpo: 5 logged steps", "## Expert load",
                    "### HealthBench", "### Multiple choice", "### CMB-Clin", "## Speed",
                    "## External leaderboards (not reproduced)", "## Skipped inputs"):
        assert heading in md, heading
    assert "| 43.2 | 1.2 | 245 | 2 |" in md  # HealthBench score and std in percent
    assert "| medqa | loglik 0-shot | 1273 | 50.0 | 47.0–53.0 |" in md
    assert "worst 4.50" in md  # max/mean share of the unbalanced layer
    assert "sft/tokens_per_s" in md and "speed/decode_tok_per_s" in md
    assert "metrics.jsonl:5" in md and "notes.json" in md  # the torn line and the non-result, with locations
    for png in ("curves_sft.png", "curves_grpo.png", "expert_load_sft.png", "mcq_accuracy.png",
                "healthbench_themes_healthbench.png"):
        assert (tmp_path / "figures" / png).read_bytes()[:8] == PNG_MAGIC, png
        assert f"figures/{png}" in md
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "figures/curves_sft.png" in html


def test_report_of_empty_run_dir_has_only_advisory_and_external(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert MEDICAL_ADVISORY in md
    assert "## Training" not in md and "## Evaluation" not in md and "## Speed" not in md
    assert "wrote" in capsys.readouterr().out

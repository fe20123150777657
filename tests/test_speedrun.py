"""The main job, end to end: the seconds-long smoke version in CI, the reduced real run by flag."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from angelmed.checkpoint import load_model
from angelmed.tokenizer import Tokenizer


def speedrun(tmp_path, *extra, timeout=600):
    env = dict(os.environ, ANGELMED_NO_TCMALLOC="1")
    env.pop("ANGELMED_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "angelmed", "speedrun", "--smoke", "--runs", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_smoke_speedrun_produces_every_artefact_and_resumes(tmp_path):
    p = speedrun(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "speedrun-smoke"
    tok = Tokenizer.load(run / "tokenizer")
    for stage in ("cpt", "sft", "grpo"):
        model = load_model(run / stage / "model", dtype="float32")
        assert model.config.vocab_size >= tok.vocab_size
        assert (run / stage / "metrics.jsonl").is_file() and (run / f"{stage}.yaml").is_file()
        assert any((run / stage / "tensorboard").iterdir())
        checks = json.loads((run / "eval" / f"{stage}_checks.json").read_text())
        assert checks["benchmark"] == "stage_checks" and "ontology" in checks["perplexity"]
        assert "ontology_heldout" in checks["mcq"]
    assert "red_flag" in json.loads((run / "eval" / "sft_checks.json").read_text())
    assert "ontology" in json.loads((run / "eval" / "init_checks.json").read_text())["perplexity"]
    # the last stage: the GRPO model with its MTP layer trained as the drafter, and its measured speed
    final = load_model(run / "draft" / "best", dtype="float32")
    grpo = load_model(run / "grpo" / "model", dtype="float32")
    same = [torch.equal(a, b) for (n, a), b in zip(final.state_dict().items(), grpo.state_dict().values())
            if not n.startswith(f"model.layers.{final.config.num_hidden_layers}.")]
    assert all(same)  # main layers untouched
    speed = json.loads((run / "bench_spec" / "mtp_draft.json").read_text())
    assert speed["identical_replies"] == speed["replies"] == 2 and speed["mean_accept_length"] >= 1
    report = (run / "report.md").read_text()
    assert "Stage by stage" in report and "Medical advisory" in report and "mtp_draft/speedup" in report
    assert f"angelmed serve {run / 'draft' / 'best'} --port 8000 --draft mtp" in p.stdout

    # a rerun skips every finished stage
    again = speedrun(tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("done earlier, skipped") == 9

    # an interrupted stage (marker missing) reruns alone; earlier stages are not redone
    (run / ".done" / "grpo").unlink()
    (run / ".done" / "eval_grpo").unlink()
    third = speedrun(tmp_path)
    assert third.returncode == 0
    assert "cpt: done earlier" in third.stdout and "[7/10] grpo  (" in third.stdout


@pytest.mark.slow
def test_killed_speedrun_resumes_without_redoing_finished_stages(tmp_path):
    env = dict(os.environ, ANGELMED_NO_TCMALLOC="1")
    proc = subprocess.Popen([sys.executable, "-m", "angelmed", "speedrun", "--smoke", "--runs", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    run = tmp_path / "speedrun-smoke"
    deadline = time.time() + 300
    while not (run / ".done" / "cpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = speedrun(tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "cpt: done earlier, skipped" in p.stdout and "tokenizer: done earlier" in p.stdout

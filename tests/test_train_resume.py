"""Checkpoint/resume: SIGKILL mid-run then resume gives the same losses and final weights as an
uninterrupted run; a crash while a checkpoint is being written leaves the previous one loadable."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from angelmed.checkpoint import load_model
from angelmed.config import get_preset
from angelmed.model import Transformer
from angelmed.train import cpt
from angelmed.train.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint
from angelmed.train.config import OptimSection
from angelmed.train.optim import build_optimizer, build_scheduler
from train_helpers import losses, metrics, tiny_cpt

REPO = Path(__file__).resolve().parents[1]
N = 3


def run_driver(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)


def test_sigkill_then_resume_is_exact(tmp_path, data_dir):
    common = ["--train.steps", str(2 * N), "--train.save_every", str(N), "--optim.lr", "3e-3",
              "--optim.warmup_steps", "1", "--train.eval_every", "2"]
    full = tmp_path / "full"
    cpt.run(tiny_cpt(full, data_dir, *common))

    broken = tmp_path / "broken"
    proc = run_driver(tmp_path, f"""
        import os, signal
        from angelmed.train import cpt
        from train_helpers import tiny_cpt

        def kill_after_checkpoint(step, record):
            if step == {N + 1}:  # checkpoint {N} is on disk; step {N + 1} ran but is not saved
                os.kill(os.getpid(), signal.SIGKILL)

        cpt.run(tiny_cpt({str(broken)!r}, {str(data_dir)!r}, *{common!r}), on_step_end=kill_after_checkpoint)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(broken)] == [f"step_{N:08d}"]
    assert max(m["step"] for m in metrics(broken)) == N + 1

    cpt.run(tiny_cpt(broken, data_dir, *common))  # resume: auto
    lf, lb = losses(full), losses(broken)
    assert sorted(lb) == sorted(lf) == list(range(1, 2 * N + 1))  # the unsaved step N+1 was redone once
    for s in lf:
        assert abs(lf[s] - lb[s]) <= 1e-6, (s, lf[s], lb[s])
    hf = {m["step"]: m["heldout_loss"] for m in metrics(full) if m.get("heldout_loss") is not None}
    hb = {m["step"]: m["heldout_loss"] for m in metrics(broken) if m.get("heldout_loss") is not None}
    assert hf.keys() == hb.keys() and all(abs(hf[k] - hb[k]) <= 1e-6 for k in hf)
    wf = load_model(latest_checkpoint(full) / "model").state_dict()
    wb = load_model(latest_checkpoint(broken) / "model").state_dict()
    assert wf.keys() == wb.keys()
    for k in wf:
        assert torch.equal(wf[k], wb[k]), k  # weights and expert biases identical


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, data_dir):
    run = tmp_path / "crash"
    args = ["--train.steps", "4", "--train.save_every", "2", "--train.eval_batches", "0"]
    proc = run_driver(tmp_path, f"""
        import os, signal, torch
        from angelmed.train import checkpointing, cpt
        from train_helpers import tiny_cpt

        real_save = torch.save
        def dying_save(obj, path, *a, **k):
            if "step_00000004" in str(path):  # second checkpoint: write a torn file, then die
                open(path, "wb").write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *a, **k)
        checkpointing.torch.save = dying_save
        cpt.run(tiny_cpt({str(run)!r}, {str(data_dir)!r}, *{args!r}))
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = run / "checkpoints"
    assert any(p.name.startswith(".step_00000004.tmp") for p in root.iterdir())  # the torn write is there
    latest = latest_checkpoint(run)
    assert latest is not None and latest.name == "step_00000002"
    # the previous checkpoint loads: weights, optimizer and trainer state
    model = Transformer(get_preset("tiny")).init_weights(123)
    opt = build_optimizer(model, OptimSection())
    build_scheduler(opt, 4, OptimSection())  # as in the loop: the scheduler is set up before loading
    state = load_checkpoint(latest, model, opt)
    assert state["step"] == 2 and len(opt.state) > 0
    ref = load_model(latest / "model").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k != "inv_freq")
    # and a resumed run finishes and cleans the torn temp dir
    cpt.run(tiny_cpt(run, data_dir, *args))
    assert [p.name for p in root.iterdir()] == ["step_00000004"] or \
        sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]

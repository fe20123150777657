"""torchrun --nproc_per_node 2 (gloo, FSDP2) gives the same losses and weights as one process with the
same global batch."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from angelmed.checkpoint import load_model
from angelmed.train import cpt
from angelmed.train.checkpointing import latest_checkpoint
from train_helpers import losses, metrics, tiny_cpt

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_two_ranks_match_one_process(tmp_path, data_dir, checkpointing):
    """Also with activation checkpointing on the FSDP2 side only (wrapped before sharding)."""
    common = ["--train.steps", "4", "--optim.lr", "3e-3", "--train.eval_every", "2", "--train.grad_accum", "2"]
    single = tmp_path / "single"
    cpt.run(tiny_cpt(single, data_dir, *common, "--data.micro_batch_size", "4"))

    multi = tmp_path / "multi"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        from angelmed.train import cpt
        from train_helpers import tiny_cpt
        cpt.run(tiny_cpt({str(multi)!r}, {str(data_dir)!r}, *{common!r}, "--data.micro_batch_size", "2",
                         "--train.activation_checkpointing", {checkpointing!r}))
    """))
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ls, lm = losses(single), losses(multi)
    assert ls.keys() == lm.keys() == {1, 2, 3, 4}
    for s in ls:
        assert abs(ls[s] - lm[s]) < 1e-5, (s, ls[s], lm[s])
    ms, mm = metrics(single), metrics(multi)
    for a, b in zip(ms, mm):
        assert a["step"] == b["step"]
        if "loss_tokens" in a:
            assert a["loss_tokens"] == b["loss_tokens"] and a["tokens"] == b["tokens"]
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
        if a.get("heldout_loss") is not None:
            assert abs(a["heldout_loss"] - b["heldout_loss"]) < 1e-5
    ws = load_model(latest_checkpoint(single) / "model").state_dict()
    wm = load_model(latest_checkpoint(multi) / "model").state_dict()
    for k in ws:
        if k.endswith("expert_bias"):
            assert torch.equal(ws[k], wm[k]), k  # same all-reduced loads -> the same sign updates
        else:
            # Adam divides by sqrt(v): on the rare elements whose gradient is ~0, summation-order noise in the
            # gradient (~1e-9) changes the step by up to ~lr. So: nearly all elements within 1e-5, none beyond
            # the Adam step bound.
            diff = (ws[k] - wm[k]).abs()
            assert (diff > 1e-5).float().mean() < 1e-3, k
            assert diff.max() < 4 * 3e-3, k


def test_grpo_two_ranks_match_one_process(tmp_path):
    """Data-parallel rollouts + FSDP2 update: the same rollouts, rewards, held-out reward, losses and weights as one
    process. 3 micro-batches over 2 ranks, so rank 1 runs a zero-weight padding pass; dynamic sampling drops the
    odd prompts' groups (constant reward) and refills from a second generation batch; the KL reference (beta > 0)
    is sharded like the policy."""
    from test_grpo import write_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    setup = f"""
        from pathlib import Path
        from test_grpo import low_id_share, tiny_cfg
        from angelmed.train.grpo import run
        def half_constant(prompts, completions, completion_ids, k, **columns):
            return [0.5 if kk % 2 else r for kk, r in zip(k, low_id_share(prompts, completions, completion_ids))]
        def go(run_dir):
            cfg = tiny_cfg(Path(run_dir), prompts=Path({str(prompts)!r}), dynamic_sampling=True, max_gen_batches=2,
                           eval_size=6, beta=0.05)
            cfg.data.micro_batch_size, cfg.train.steps, cfg.train.eval_every = 12, 3, 3
            run(cfg, rewards=[half_constant])
    """
    single, multi = tmp_path / "single", tmp_path / "multi"
    ns: dict = {}
    exec(textwrap.dedent(setup), ns)
    ns["go"](single)
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(setup) + f"\ngo({str(multi)!r})\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ms, mm = metrics(single / "run"), metrics(multi / "run")
    assert [r["step"] for r in ms] == [r["step"] for r in mm] and len(ms) >= 3
    assert ms[0]["heldout_reward"] is not None and any(r.get("gen_batches") == 2 for r in ms)
    assert any(r.get("kl", 0) > 0 for r in ms)
    for a, b in zip(ms, mm):
        for key in ("reward_mean", "completions", "groups_kept", "gen_batches", "active_tokens", "tokens",
                    "heldout_reward"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
        for key in ("loss", "grad_norm", "entropy", "ratio_mean", "routing_disagree", "kl"):
            if a.get(key) is not None:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    ws = load_model(latest_checkpoint(single / "run") / "model").state_dict()  # fp32 (the export is bf16)
    wm = load_model(latest_checkpoint(multi / "run") / "model").state_dict()
    for k in ws:
        diff = (ws[k] - wm[k]).abs()
        assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() < 4 * 3e-3, k  # Adam bound, as above

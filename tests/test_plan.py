"""Dry-run plans for real-scale recipes: built on the meta device, arithmetic checked by hand."""

import subprocess
import sys
from pathlib import Path

import pytest

from angelmed.train.config import load_config
from angelmed.train.plan import GiB, plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flash_100b_plan_by_hand():
    cfg = load_config("cpt", CONFIGS / "flash-100b.yaml")
    p = plan(cfg, world=64)
    n = 102_889_697_280
    assert p["params_total"] == n
    assert p["gib_sharded_state_per_gpu"] == pytest.approx(16 * n / 64 / GiB)  # fp32 param+grad+Adam m,v
    assert p["tokens_per_step"] == 64 * 4096 * 1 * 2
    assert p["flops_per_token"] == 6 * p["params_active"]
    # activations by hand: tokens x hidden x 34 B x 32 layers at bf16; checkpointed: 2 B per layer + one layer's 34 B
    tokens_hidden = 4096 * 1 * 4096
    assert p["gib_activations_per_gpu"] == pytest.approx(tokens_hidden * 34 * 32 / GiB)
    cfg.train.activation_checkpointing = True
    assert plan(cfg, world=64)["gib_activations_per_gpu"] == pytest.approx(tokens_hidden * (2 * 32 + 34) / GiB)


def test_dry_run_cli_fits_and_refuses(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "angelmed", "train", "cpt", "--config", str(CONFIGS / "flash-100b.yaml"),
                         "--dry-run", "--nodes", "8", "--gpus-per-node", "8"], capture_output=True, text=True)
    assert ok.returncode == 0 and "fits" in ok.stdout and "102,889,697,280" in ok.stdout
    small = subprocess.run([sys.executable, "-m", "angelmed", "train", "cpt", "--config",
                            str(CONFIGS / "flash-100b.yaml"), "--dry-run", "--nodes", "1", "--gpus-per-node", "8"],
                           capture_output=True, text=True)
    assert small.returncode == 1 and "DOES NOT FIT" in small.stdout

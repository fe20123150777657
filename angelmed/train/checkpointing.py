"""Training checkpoints: atomic, resumable, and the model part is a plain HF directory.

Layout of `<run_dir>/checkpoints/step_00000100/`:
  model/              HF checkpoint (config.json, model.safetensors in fp32 = the master weights, expert
                      biases included as F32) - loads with `angelmed.checkpoint.load_model` or transformers
  optimizer.pt        full (unsharded) optimizer state, keyed by parameter name
  trainer_state.pt    step, LR-scheduler state, per-rank RNG states, data-iterator position, extras
  meta.json           written last: {"step": ..., "complete": true}

Atomicity: rank 0 writes everything into `.step_00000100.tmp-<pid>`, fsyncs every file and the directory,
then renames it into place and fsyncs the parent. A crash at any point leaves either the old set of
checkpoints or the new one; stale temp dirs are ignored by `latest_checkpoint` and removed at the next save.
Only the newest `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from angelmed.checkpoint import load_model, save_model
from angelmed.config import ModelConfig
from angelmed.model import Transformer
from angelmed.train import dist as tdist

_STEP_RE = re.compile(r"^step_(\d{8})$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainCheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _is_complete(path: Path) -> bool:
    try:
        return bool(json.loads((path / "meta.json").read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


# ---- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- saving ---------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hf_model(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path, dtype: torch.dtype | None,
                   tokenizer=None) -> None:
    """An HF directory from a full (unsharded) state dict, without copying the tensors into a new model."""
    with torch.device("meta"):
        shell = Transformer(cfg)
    shell.load_state_dict(state, assign=True)
    save_model(shell, out_dir, dtype=dtype)
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(out_dir)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep_last: int, tokenizer=None) -> Path:
    """Collective: every rank calls it; rank 0 writes. Returns the checkpoint path."""
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rngs = tdist.all_gather_object(rng_state())
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        write_hf_model(model_sd, _config_of(model), tmp / "model", torch.float32, tokenizer)
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save({**trainer_state, "step": step, "rng": rngs}, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "complete": True}) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. end of a resumed run): replace it atomically
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    tdist.barrier()
    return final


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _config_of(model: nn.Module) -> ModelConfig:
    return model.config


# ---- loading ---------------------------------------------------------------------------------------
def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not _is_complete(path):
        raise TrainCheckpointError(f"train.resume: {resume!r} is not a complete training checkpoint "
                                   "(no meta.json with complete=true)")
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: restore optimizer, weights (+ expert biases) and this rank's RNG; return the trainer state."""
    path = Path(path)
    try:
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
        optim_sd = torch.load(path / "optimizer.pt", weights_only=False)
        weights = load_model(path / "model", dtype="float32").state_dict()
    except Exception as e:  # noqa: BLE001 - name the checkpoint in any failure
        raise TrainCheckpointError(f"{path}: cannot load training checkpoint: {e}") from e
    weights.pop("inv_freq", None)
    # Optimizer first: initialising its state may run a zero-LR step, which must not touch restored weights.
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    rngs = trainer_state.get("rng") or []
    if rngs:
        set_rng_state(rngs[_rank() % len(rngs)])
    return trainer_state

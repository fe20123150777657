"""Model and draft directories from the Hugging Face Hub: `org/name[@revision]` wherever a directory is expected.

A spec that is an existing path is used as it is. Otherwise a repo id is downloaded into the Hub cache (resumable;
`HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE` apply as usual) and its local snapshot directory returned. Only what a
checkpoint needs is fetched: configs, safetensors, tokenizer and chat-template files, remote code.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")


def repo_id(spec: str) -> tuple[str, str | None] | None:
    """(repo, revision) when `spec` is not an existing path but reads as a Hub repo id, else None."""
    if Path(spec).exists():
        return None
    m = _REPO_ID.fullmatch(spec)
    return (m[1], m[2]) if m else None


def local_dir(spec: str, config_only: bool = False) -> str:
    """A local directory for `spec` (a path, or a Hub repo id, downloaded). config_only: just config.json (to read
    a checkpoint's settings without its weights)."""
    rid = repo_id(spec)
    if rid is None:
        return spec
    from huggingface_hub import snapshot_download

    repo, revision = rid
    try:
        return snapshot_download(repo, revision=revision,
                                 allow_patterns=["config.json"] if config_only else CHECKPOINT_FILES)
    except Exception as e:  # offline, unknown repo, gated: one message that says both readings failed
        raise FileNotFoundError(f"{spec}: no such local directory, and downloading it as the Hugging Face repo "
                                f"{repo!r} failed ({type(e).__name__}: {e})") from None

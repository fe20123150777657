"""Small file helpers for evaluation outputs: atomic JSON writes and a resumable completions store."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, obj: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def content_key(*parts: object) -> str:
    """sha256 of the JSON of `parts`: a stable key for (model, conversation, sampling settings, ...)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


class CompletionStore:
    """Append-only JSONL of {"key", "text"} so a rerun reuses candidate answers instead of sampling new ones.

    A torn last line (the run was killed mid-write) is skipped and counted in `bad_lines`."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.texts: dict[str, str] = {}
        self.bad_lines: list[str] = []
        if self.path is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        self.texts[record["key"]] = record["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.bad_lines.append(f"{self.path}:{lineno}: unreadable completion record")

    def get(self, key: str) -> str | None:
        return self.texts.get(key)

    def add(self, items: dict[str, str]) -> None:
        self.texts.update(items)
        if self.path is None or not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, text in items.items():
                f.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

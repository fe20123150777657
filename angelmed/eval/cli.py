"""`angelmed eval healthbench|mcq|cmb`: evaluate an OpenAI-compatible endpoint or a local checkpoint.

  angelmed eval healthbench --endpoint http://localhost:8000/v1 --model angelmed \\
      --judge https://api.openai.com/v1 --judge-model gpt-4.1-2025-04-14 --subset local --out runs/x/eval/hb.json
  angelmed eval mcq --model runs/x/sft --subset medqa,pubmedqa --data-root ../shared/data     (loglik, local)
  angelmed eval mcq --endpoint URL --model NAME --subset cmmlu                                  (generative)
  angelmed eval cmb --endpoint URL --model NAME --judge URL --judge-model NAME

Candidate replies and judge replies are stored beside --out, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from angelmed.hub import local_dir, repo_id

from angelmed.paths import data_root as resolve_data_root


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", help="OpenAI-compatible base URL of the candidate (e.g. http://host:8000/v1)")
    parser.add_argument("--model", help="served model name with --endpoint; a local checkpoint directory without")
    parser.add_argument("--api-key", default=None, help="candidate API key (default $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel requests to each endpoint")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    parser.add_argument("--data-root", default=None, help="dataset root (default $ANGELMED_DATA_ROOT)")
    parser.add_argument("--out", default=None, help="results JSON (default eval/<benchmark>.json)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="candidate max new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="candidate temperature (0 = greedy)")
    parser.add_argument("--system-prompt", default=None, help="candidate system prompt (default AntAngelMed's)")
    parser.add_argument("--no-system-prompt", action="store_true", help="send no system prompt")


def _judge_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", default=os.environ.get("ANGELMED_JUDGE_URL"),
                        help="judge base URL (default $ANGELMED_JUDGE_URL)")
    parser.add_argument("--judge-model", default=os.environ.get("ANGELMED_JUDGE_MODEL"), help="judge model name")
    parser.add_argument("--judge-api-key", default=None, help="judge API key (default $OPENAI_API_KEY)")
    parser.add_argument("--judge-cache", default=None, help="judge reply cache dir (default <out dir>/judge_cache)")
    parser.add_argument("--judge-retries", type=int, default=10, help="retries of an unparsable judge reply")
    parser.add_argument("--judge-temperature", type=float, default=0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="angelmed eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    hb = sub.add_parser("healthbench", help="HealthBench rubric evaluation with an LLM judge")
    _common(hb)
    _judge_args(hb)
    hb.add_argument("--subset", default="local",
                    help="local (../shared/data subset) | main | hard | consensus | path or URL of a JSONL")
    hb.add_argument("--examples", type=int, default=None, help="random.Random(0) sample of N examples")
    hb.add_argument("--repeats", type=int, default=1, help="sample and score each example this many times")
    hb.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    hb.add_argument("--physician", action="store_true",
                    help="grade the physicians' ideal completions instead of a model (the judge's reference score)")

    mcq = sub.add_parser("mcq", help="multiple-choice accuracy (loglik or generative)")
    _common(mcq)
    mcq.add_argument("--subset", default="medqa,medmcqa,mmlu,mmlu_pro,pubmedqa,cmmlu",
                     help="comma list of tasks: medqa, medmcqa, mmlu, mmlu_pro, pubmedqa, cmmlu")
    mcq.add_argument("--protocol", choices=["loglik", "generative"], default=None,
                     help="default: loglik for a local checkpoint, generative for an endpoint")
    mcq.add_argument("--shots", type=int, default=0, help="few-shot exemplars from the dev split (mmlu, cmmlu)")
    mcq.add_argument("--samples", type=int, default=1,
                     help="generative: answers per question, majority vote (self-consistency; needs --temperature)")
    mcq.add_argument("--pubmedqa-file", default=None, help="PQA-L JSON in ori_pqal.json layout (default: trainval)")
    mcq.add_argument("--max-batch-tokens", type=int, default=8192, help="loglik batch size in tokens")

    cmb = sub.add_parser("cmb", help="CMB-Clin Chinese clinical cases rated by an LLM judge")
    _common(cmb)
    _judge_args(cmb)
    return parser


# --------------------------------------------------------------------------------------------------- backends
def _local_factory(name: str):
    try:
        from angelmed.infer import backends as local
    except ImportError as e:
        raise SystemExit(f"angelmed eval: local checkpoints need angelmed.infer.backends ({e}); "
                         f"serve the model and pass --endpoint instead") from e
    factory = getattr(local, name, None)
    if factory is None:
        raise SystemExit(f"angelmed eval: angelmed.infer.backends has no {name}(); pass --endpoint instead")
    return factory


def chat_backend(args) -> tuple[object, str]:
    """(backend, candidate name)."""
    if args.endpoint:
        from angelmed.eval.backends import OpenAIChatBackend

        name = args.model or _first_served_model(args.endpoint, args.api_key)
        return OpenAIChatBackend(args.endpoint, name, api_key=args.api_key, concurrency=args.concurrency,
                                 progress=True), name
    if args.model and repo_id(args.model):  # a Hugging Face repo id: downloaded, named by the id
        hub_name, args.model = args.model, local_dir(args.model)
        return _local_factory("local_chat_backend")(args.model), hub_name
    if args.model and Path(args.model).is_dir():
        return _local_factory("local_chat_backend")(args.model), str(Path(args.model).resolve())
    raise SystemExit("angelmed eval: give --endpoint URL [--model NAME] or --model CHECKPOINT_DIR")


def loglik_backend(args):
    """(backend with .loglik, tokenizer with .encode) for a local checkpoint (or a Hugging Face repo id)."""
    if args.model:
        args.model = local_dir(args.model)
    if not (args.model and Path(args.model).is_dir()):
        raise SystemExit("angelmed eval mcq --protocol loglik needs --model CHECKPOINT_DIR (chat endpoints do not "
                         "expose prompt log-probs); use --protocol generative with --endpoint")
    made = _local_factory("local_loglik_backend")(args.model)
    if isinstance(made, tuple):
        return made
    tokenizer = getattr(made, "tokenizer", made)
    if not hasattr(tokenizer, "encode"):
        raise SystemExit("local_loglik_backend() returned no tokenizer (expected .tokenizer or .encode)")
    return made, tokenizer


def _first_served_model(endpoint: str, api_key: str | None) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=endpoint, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY")
    models = client.models.list().data
    if not models:
        raise SystemExit(f"angelmed eval: {endpoint}/models lists no model; pass --model NAME")
    return models[0].id


def make_judge(args, out: Path):
    from angelmed.judge import Judge

    if not args.judge or not args.judge_model:
        raise SystemExit(f"angelmed eval {args.benchmark}: needs a judge: --judge URL --judge-model NAME "
                         "(or $ANGELMED_JUDGE_URL / $ANGELMED_JUDGE_MODEL)")
    cache = Path(args.judge_cache) if args.judge_cache else out.parent / "judge_cache"
    return Judge(args.judge, args.judge_model, api_key=args.judge_api_key, cache_dir=cache,
                 max_retries=args.judge_retries, concurrency=args.concurrency,
                 temperature=args.judge_temperature, progress=True)


def _system_prompt(args) -> str | None:
    from angelmed.eval.healthbench import DEFAULT_SYSTEM_PROMPT

    if args.no_system_prompt:
        return None
    return args.system_prompt if args.system_prompt is not None else DEFAULT_SYSTEM_PROMPT


# ------------------------------------------------------------------------------------------------- commands
def run_healthbench_cmd(args) -> int:
    from angelmed.eval.healthbench import HealthBenchConfig, run_healthbench
    from angelmed.eval.healthbench_data import load_healthbench, resolve_source
    from angelmed.eval.io import write_json_atomic

    out = Path(args.out or "eval/healthbench.json")
    root = resolve_data_root(args.data_root, required=args.subset == "local")
    data = load_healthbench(resolve_source(args.subset, root))
    if data.bad_lines:
        print(f"skipped {len(data.bad_lines)} bad lines, e.g. {data.bad_lines[0]}", file=sys.stderr)
    if args.limit is not None:
        data.examples = data.examples[:args.limit]
    config = HealthBenchConfig(n_examples=args.examples, n_repeats=args.repeats, system_prompt=_system_prompt(args),
                               max_tokens=args.max_tokens, temperature=args.temperature, bootstrap_seed=args.seed)
    if args.physician:  # the reference answers, shown to the grader without a system prompt
        backend, name, config.system_prompt = None, "physician ideal completions", None
    else:
        backend, name = chat_backend(args)
    judge = make_judge(args, out)
    results = run_healthbench(data, backend, judge, config, name,
                              completions_path=out.with_suffix(".completions.jsonl"))
    write_json_atomic(out, results)
    score = results["score"]
    print(f"HealthBench {args.subset}: score {'n/a' if score is None else f'{score:.4f}'} "
          f"(bootstrap std {results['score:bootstrap_std'] or 0:.4f}, n={results['n_samples']}, "
          f"excluded {results['n_excluded_ungraded']}"
          + (f", {results['n_skipped_without_ideal_completion']} without an ideal completion" if args.physician else "")
          + f") -> {out}")
    return 0


def run_mcq_cmd(args) -> int:
    from angelmed.eval.io import write_json_atomic
    from angelmed.eval.mcq import MCQConfig, evaluate_generative, evaluate_loglik
    from angelmed.eval.mcq_data import ALL_TASKS, load_task

    tasks = [t.strip() for t in args.subset.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise SystemExit(f"angelmed eval mcq: unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)}")
    protocol = args.protocol or ("generative" if args.endpoint else "loglik")
    root = resolve_data_root(args.data_root)
    if args.samples < 1 or (args.samples > 1 and (protocol != "generative" or args.temperature <= 0)):
        raise SystemExit(f"angelmed eval mcq: --samples {args.samples} needs --protocol generative and "
                         f"--temperature > 0 (got {protocol}, temperature {args.temperature})")
    config = MCQConfig(protocol=protocol, shots=args.shots, limit=args.limit, max_tokens=args.max_tokens,
                       temperature=args.temperature, system_prompt=_system_prompt(args), samples=args.samples)
    if protocol == "loglik":
        backend, tokenizer = loglik_backend(args)
    else:
        backend, _ = chat_backend(args)
    from tqdm.auto import tqdm

    for task_name in tqdm(tasks, desc="mcq tasks", unit="task"):
        task = load_task(task_name, root, Path(args.pubmedqa_file) if args.pubmedqa_file else None)
        if protocol == "loglik":
            result = evaluate_loglik(task, backend, tokenizer, config)
        else:
            result = evaluate_generative(task, backend, config)
        if args.out and len(tasks) == 1:
            out = Path(args.out)
        elif args.out:
            out = Path(args.out).with_name(f"{Path(args.out).stem}_{task_name}.json")
        else:
            out = Path("eval") / f"mcq_{task_name}.json"
        write_json_atomic(out, result)
        acc = result["acc"]
        extra = f", macro-F1 {result['macro_f1']['value']:.4f}" if "macro_f1" in result else ""
        if "acc_first_sample" in result:
            extra += (f", vote of {args.samples} (one sample: {result['acc_first_sample']['value']:.4f}, "
                      f"agreement {result['vote_agreement']:.2f})")
        print(f"{task_name} ({protocol}, {args.shots}-shot): acc {acc['value']:.4f} "
              f"[{acc['ci95'][0]:.4f}, {acc['ci95'][1]:.4f}] n={result['n']}{extra} -> {out}")
    return 0


def run_cmb_cmd(args) -> int:
    from angelmed.eval.cmb import CMBConfig, load_cmb_clin, run_cmb_clin
    from angelmed.eval.io import write_json_atomic

    out = Path(args.out or "eval/cmb_clin.json")
    data = load_cmb_clin(resolve_data_root(args.data_root) / "cmb_clin" / "CMB-test-qa.json")
    config = CMBConfig(system_prompt=_system_prompt(args), max_tokens=args.max_tokens,
                       temperature=args.temperature, limit=args.limit)
    backend, name = chat_backend(args)
    judge = make_judge(args, out)
    results = run_cmb_clin(data, backend, judge, config, name, completions_path=out.with_suffix(".completions.jsonl"))
    write_json_atomic(out, results)
    score = results["score"]
    print(f"CMB-Clin: overall {'n/a' if score is None else f'{score:.3f}'} / 5 "
          f"({results['n_graded']} graded, {results['n_ungraded']} ungraded) -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"healthbench": run_healthbench_cmd, "mcq": run_mcq_cmd, "cmb": run_cmb_cmd}[args.benchmark](args)
    except (FileNotFoundError, ValueError) as e:
        print(f"angelmed eval {args.benchmark}: {e}", file=sys.stderr)
        return 2

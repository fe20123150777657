"""Runs INSIDE the vLLM venv (.venv-vllm), started by bench_vllm.py: load a checkpoint with vLLM's offline
`LLM`, then run the jobs of a JSON spec and write the results as JSON. Imports nothing from angelmed
(that venv has no project install).

    .venv-vllm/bin/python benchmarks/vllm_runner.py SPEC.json OUT.json

SPEC: {"model": dir, "dtype": "float32"|"bfloat16", "max_model_len": int, "max_num_seqs": int,
       "jobs": [{"name": str, "prompts": [[ids]], "max_tokens": int, "logprobs": bool, "repeat": int}]}
OUT:  {"vllm_version", "load_s", "jobs": {name: {"token_ids": [[ids]], "logprobs": [[float]]|null,
       "seconds": [per repeat], "generated_tokens": int}}}
Every job is greedy (temperature 0) with ignore_eos, so each prompt yields exactly max_tokens tokens.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def write_json_atomic(path: str, obj: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".vllm_out.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def run(spec: dict) -> dict:
    # vLLM's CPU worker starts processes; it must be imported under the __main__ guard (spawn).
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], trust_remote_code=True, dtype=spec["dtype"],
              max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"], seed=0,
              enable_prefix_caching=False)
    out = {"vllm_version": vllm.__version__, "load_s": time.perf_counter() - t0, "jobs": {}}
    for job in spec["jobs"]:
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                                logprobs=0 if job.get("logprobs") else None, detokenize=False)
        prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
        seconds, results = [], None
        for _ in range(job.get("repeat", 1)):
            t = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - t)
        token_ids = [list(r.outputs[0].token_ids) for r in results]
        logprobs = None
        if job.get("logprobs"):
            # logprobs=0: only the sampled token's entry, under the raw (pre-temperature) distribution
            logprobs = [[step[tok].logprob for step, tok in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]
                        for r in results]
        out["jobs"][job["name"]] = {"token_ids": token_ids, "logprobs": logprobs, "seconds": seconds,
                                    "generated_tokens": sum(len(t) for t in token_ids)}
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    write_json_atomic(argv[1], run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

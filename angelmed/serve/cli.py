"""`angelmed serve MODEL_DIR` (OpenAI-compatible server, or the equivalent vLLM/SGLang command) and
`angelmed chat MODEL_DIR` (terminal chat with streaming)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from angelmed import MEDICAL_ADVISORY
from angelmed.hub import local_dir, repo_id

log = logging.getLogger("angelmed.serve")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="angelmed serve", description="OpenAI-compatible server for a checkpoint.")
    p.add_argument("model_dir", help="HF checkpoint directory (config.json, safetensors, tokenizer files), or a "
                                     "Hugging Face repo id org/name[@revision] (downloaded)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="concurrent sequences (KV cache slots)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (default: config max)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens per prefill forward (default 8192); longer prompts prefill in chunks, so this "
                        "bounds prefill memory at long context (vLLM --max-num-batched-tokens, SGLang "
                        "--chunked-prefill-size)")
    p.add_argument("--api-key", default=os.environ.get("ANGELMED_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ANGELMED_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: directory name)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: 'mtp' (the checkpoint's own MTP layer), an EAGLE-3 draft directory "
                        "(`angelmed train draft`), or a draft checkpoint with an MTP layer fed the target's hidden "
                        "states")
    p.add_argument("--spec-tokens", type=int, default=3, help="tokens drafted per speculative round")
    p.add_argument("--backend", choices=["native", "vllm", "sglang"], default="native")
    p.add_argument("--launch", action="store_true", help="with --backend vllm|sglang: exec the command")
    p.add_argument("--print-only", action="store_true", help="print the resolved settings / command and exit")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's torch_dtype)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--fp8", choices=["dequant", "resident"], default="dequant",
                   help="block-FP8 checkpoints: dequantise at load, or keep the weights resident in FP8")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only at load: half the weight memory, faster CPU decode, small error")
    p.add_argument("--no-safety", action="store_true", help="turn the medical safety layer off")
    p.add_argument("--log-text", action="store_true", help="log prompt and completion text (off by default)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(draft_config=None)  # with --backend vllm|sglang: a directory holding the draft's config.json
    return p


def engine_command(args: argparse.Namespace, name: str) -> list[str]:
    """The vLLM / SGLang command serving the same checkpoint (spec model.md §8)."""
    d = args.model_dir if repo_id(args.model_dir) else str(Path(args.model_dir).resolve())
    if args.backend == "vllm":
        cmd = ["vllm", "serve", d, "--trust-remote-code", "--served-model-name", name,
               "--host", args.host, "--port", str(args.port), "--max-num-seqs", str(args.max_batch)]
        if args.max_seq_len:
            cmd += ["--max-model-len", str(args.max_seq_len)]
        if args.max_prefill_tokens:
            cmd += ["--max-num-batched-tokens", str(args.max_prefill_tokens)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
    else:
        cmd = [sys.executable if args.launch else "python", "-m", "sglang.launch_server", "--model-path", d,
               "--trust-remote-code", "--served-model-name", name, "--host", args.host, "--port", str(args.port),
               "--max-running-requests", str(args.max_batch)]
        if args.max_seq_len:
            cmd += ["--context-length", str(args.max_seq_len)]
        if args.max_prefill_tokens:
            cmd += ["--chunked-prefill-size", str(args.max_prefill_tokens)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        k = args.spec_tokens
        if args.draft == "mtp":  # SGLang's NEXTN draft = the checkpoint's MTP layer (one layer, topk 1)
            cmd += ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", str(k),
                    "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(k + 1)]
        elif args.draft and _is_sglang_eagle3(args.draft_config):  # an EAGLE-3 draft in SGLang's own layout
            draft = args.draft if repo_id(args.draft) else str(Path(args.draft).resolve())
            cmd += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", draft,
                    "--speculative-num-steps", str(k), "--speculative-eagle-topk", "1",
                    "--speculative-num-draft-tokens", str(k + 1)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd


def _engine_warnings(args: argparse.Namespace) -> list[str]:
    d = Path(args.model_dir)
    out = []
    remote_code = (d / "configuration_bailing_moe_v2.py").is_file() and (d / "modeling_bailing_moe_v2.py").is_file()
    if not remote_code and not repo_id(args.model_dir):  # a Hub repo ships its own
        out.append(f"{d} lacks configuration_bailing_moe_v2.py / modeling_bailing_moe_v2.py; --trust-remote-code "
                   "needs them (re-export with `angelmed convert --hf-remote-code`)")
    if args.backend == "vllm" and args.draft:
        out.append("vLLM has no MTP/EAGLE support for BailingMoeV2; --draft is ignored for vllm (docs/draft.md)")
    if args.backend == "sglang" and args.draft and args.draft != "mtp" and not _is_sglang_eagle3(args.draft_config):
        from angelmed.draft import is_draft_dir, read_draft_config

        if is_draft_dir(args.draft_config):
            how = (f"export it with `angelmed convert {args.draft} DST --target {args.model_dir}` and pass DST"
                   if read_draft_config(args.draft_config).layout == "llama" else
                   "train one with draft.layout: llama and export it (`angelmed convert DRAFT DST --target MODEL`)")
            out.append(f"{args.draft} is an angelmed EAGLE-3 draft; SGLang loads the LlamaForCausalLMEagle3 "
                       f"directory: {how}. The draft is ignored for sglang (docs/draft.md)")
        else:
            out.append("only --draft mtp or an EAGLE-3 draft in SGLang's layout map to SGLang; the draft is ignored")
    if args.quantize:
        out.append(f"--quantize {args.quantize} is angelmed's own load-time mode; the {args.backend} command serves "
                   "the checkpoint as stored (use `angelmed convert --fp8` for a format it loads)")
    return out


def _is_sglang_eagle3(path: str) -> bool:
    """A draft directory in SGLang/vLLM's EAGLE-3 layout (LlamaForCausalLMEagle3 and relatives)."""
    import json

    try:
        arch = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    from angelmed.draft import DRAFT_ARCH

    return any("Eagle3" in a and a != DRAFT_ARCH for a in arch)  # ours is named ...Eagle3Draft too


def _sampling_defaults(model_dir: str) -> dict:
    from angelmed.checkpoint import read_generation_config
    from angelmed.infer.engine import RECOMMENDED_SAMPLING

    gen = read_generation_config(model_dir)
    out = dict(RECOMMENDED_SAMPLING)
    out.update({k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen})
    return out


def _stop_ids(model_dir: str, tokenizer) -> list[int]:
    from angelmed.checkpoint import read_generation_config

    ids = list(getattr(tokenizer, "stop_ids", None) or [])
    eos = read_generation_config(model_dir).get("eos_token_id")
    for t in ([eos] if isinstance(eos, int) else list(eos or [])):
        if t not in ids:
            ids.append(t)
    return ids


def make_drafter(model, draft: str | None, dtype: str | None = None, device: str = "cpu", model_dir=None):
    """The speculative drafter for `--draft`: None, 'mtp' (the target's own MTP layer), or a directory, dispatched
    on its config's architectures: an angelmed EAGLE-3 draft (Eagle3Drafter) or a BailingMoeV2 checkpoint whose
    MTP layer drafts (MTPDrafter). An MTP drafter scores the draft vocabulary saved beside its checkpoint (`train
    draft --draft.kind mtp --draft.draft_vocab_size N`) when there is one; model_dir: the target's directory."""
    if not draft:
        return None
    from angelmed.infer.speculative import Eagle3Drafter, MTPDrafter

    if draft == "mtp":
        return MTPDrafter.for_checkpoint(model, model_dir) if model_dir else MTPDrafter(model)
    d = Path(draft)
    if not (d / "config.json").is_file():
        raise ValueError(f"--draft {draft}: expected 'mtp' or a directory with a config.json")
    from angelmed.draft import is_draft_dir, load_draft

    if is_draft_dir(d) or _is_sglang_eagle3(draft):  # ours, or e.g. a published EAGLE-3 draft for the target
        w = model.model.word_embeddings.weight
        return Eagle3Drafter(model, load_draft(d, model.config, dtype=w.dtype, device=w.device))
    from angelmed.checkpoint import load_model
    from angelmed.infer.cpu_pack import bf16_storage_

    drafter = load_model(d, dtype=dtype, device=device)
    if drafter.model.word_embeddings.weight.dtype != model.model.word_embeddings.weight.dtype:
        bf16_storage_(drafter, None)  # the target runs bf16 matrices with fp32 arithmetic: so does its drafter
    return MTPDrafter.for_checkpoint(drafter, d)


def build_engine(model_dir: str, max_batch: int = 16, max_seq_len: int | None = None, dtype: str | None = None,
                 device: str = "cpu", draft: str | None = None, spec_tokens: int = 3, max_queue: int = 256,
                 compile: bool = False, tokenizer=None, fp8: str = "dequant", quantize: str | None = None,
                 max_prefill_tokens: int | None = None):
    """Model + tokenizer + engine for a checkpoint directory (shared by serve and chat).

    fp8: how a block-FP8 checkpoint runs: "dequant" (once, at load; fastest on CPUs) or "resident" (weights stay
    FP8 and are dequantised per block inside each linear: half the weight memory).
    quantize: "int8" for int8 weight-only projections and experts (angelmed.infer.int8)."""
    from angelmed.infer.backends import load_tokenizer
    from angelmed.infer.engine import Engine
    from angelmed.infer.quant import load_fp8

    if quantize and fp8 == "resident":
        raise ValueError("--quantize int8 and --fp8 resident are two ways to hold the weights: choose one")
    from angelmed.infer.cpu_pack import bf16_storage_, inference_dtype

    # bf16 on a CPU that only emulates it: fp32 arithmetic (on bf16 matrices, unless quantised some other way)
    asked = dtype
    dtype = inference_dtype(model_dir, dtype, device, bf16_storage=quantize is None and fp8 != "resident")
    if quantize == "int8":  # quantised tensor by tensor while streaming from disk
        from angelmed.infer.int8 import load_int8

        model = load_int8(model_dir, dtype=dtype, device=device)
    else:
        model = load_fp8(model_dir, mode=fp8, dtype=dtype, device=device)
        bf16_storage_(model, asked)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    drafter = make_drafter(model, draft, dtype, device, model_dir)
    engine = Engine(model, tokenizer=tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                    stop_ids=_stop_ids(model_dir, tokenizer), max_queue=max_queue, compile=compile,
                    draft=drafter, spec_tokens=spec_tokens, max_prefill_tokens=max_prefill_tokens)
    if compile:  # greedy and the checkpoint's default sampling: what most requests use
        log.info("compiling the decode step (first requests would otherwise wait for it)")
        log.info("compiled in %.0f s", engine.warm_up() + engine.warm_up(**_sampling_defaults(model_dir)))
    return engine, tokenizer


def main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hub_model = repo_id(args.model_dir)
    name = args.served_model_name or (hub_model[0] if hub_model else Path(args.model_dir).resolve().name)
    try:  # Hub ids: the native server downloads; vLLM/SGLang download themselves (their command gets the id)
        if args.backend == "native" and not args.print_only:
            args.model_dir = local_dir(args.model_dir)
            if args.draft and args.draft != "mtp":
                args.draft = local_dir(args.draft)
        elif args.draft and args.draft != "mtp":  # the command depends on the draft's layout: its config only
            args.draft_config = local_dir(args.draft, config_only=True)
    except FileNotFoundError as e:
        print(f"angelmed serve: {e}", file=sys.stderr)
        return 2
    if not hub_model and not Path(args.model_dir).is_dir():
        print(f"angelmed serve: model directory {args.model_dir!r} not found", file=sys.stderr)
        return 2
    if args.backend != "native":
        for w in _engine_warnings(args):
            print(f"warning: {w}", file=sys.stderr)
        cmd = engine_command(args, name)
        shown = [("$ANGELMED_API_KEY" if args.api_key and i > 0 and cmd[i - 1] == "--api-key" else c)
                 for i, c in enumerate(cmd)]  # never echo the secret
        print(" ".join(shlex.quote(c) if not c.startswith("$") else c for c in shown))
        if args.launch and not args.print_only:
            os.execvp(cmd[0], cmd)
        return 0
    if args.print_only:
        print(f"angelmed native server: model {args.model_dir} as {name!r} on http://{args.host}:{args.port} "
              f"(max_batch {args.max_batch}, max_seq_len {args.max_seq_len or 'config'}, draft {args.draft}, "
              f"safety {'off' if args.no_safety else 'on'}, api key {'set' if args.api_key else 'none'})")
        return 0

    import uvicorn

    from angelmed.serve.app import ServerConfig, create_app

    try:
        engine, tokenizer = build_engine(args.model_dir, args.max_batch, args.max_seq_len, args.dtype, args.device,
                                         args.draft, args.spec_tokens, args.max_queue, args.compile, fp8=args.fp8,
                                         quantize=args.quantize, max_prefill_tokens=args.max_prefill_tokens)
    except (FileNotFoundError, ValueError) as e:  # missing tokenizer/weights, bad config or draft: say which
        print(f"angelmed serve: {e}", file=sys.stderr)
        return 2
    cfg = ServerConfig(served_model_name=name, api_key=args.api_key, log_text=args.log_text,
                       safety=not args.no_safety, sampling_defaults=_sampling_defaults(args.model_dir))
    app = create_app(engine, tokenizer, cfg)
    print(MEDICAL_ADVISORY, file=sys.stderr)
    log.info("serving %s as %r: %s", args.model_dir, name, engine_summary(engine))
    # SIGTERM: uvicorn stops accepting, lets open responses finish (bounded), then the lifespan drains the engine
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def engine_summary(engine) -> str:
    """One line an operator checks at start-up: weight format and resident bytes, cache, compile, draft."""
    from angelmed.infer.int8 import is_int8
    from angelmed.infer.quant import resident_weight_bytes

    model = engine.model
    held = resident_weight_bytes(model)
    weights = held["total"]
    fmt = "int8" if is_int8(model) else ("fp8" if held["fp8"] else str(engine.dtype)[6:])
    draft = f"{type(engine.draft).__name__} k={engine.spec_tokens}" if engine.draft is not None else "none"
    return (f"weights {fmt} {weights / 2**30:.2f} GiB on {engine.device}, {engine.max_batch} slots x "
            f"{engine.max_seq_len} tokens, prefix reuse {'on' if engine.prefix_reuse else 'off'}, "
            f"compile {'on' if engine.compile else 'off'}, draft {draft}")


# ---- terminal chat -------------------------------------------------------------------------------------------
def chat(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="angelmed chat", description="Terminal chat with a checkpoint (streaming).")
    p.add_argument("model_dir")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--draft", default=None, help="'mtp' or a draft checkpoint dir (speculative decoding)")
    p.add_argument("--no-safety", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles before the prompt)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only (half the weight memory)")
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.panel import Panel

    from angelmed.infer.backends import chat_prompt_ids
    from angelmed.infer.engine import GenerationRequest
    from angelmed.serve.app import load_safety

    console = Console()
    console.print(Panel(MEDICAL_ADVISORY, title="angelmed", border_style="yellow"))
    try:
        args.model_dir = local_dir(args.model_dir)
        args.draft = local_dir(args.draft) if args.draft and args.draft != "mtp" else args.draft
        engine, tokenizer = build_engine(args.model_dir, max_batch=1, max_seq_len=args.max_seq_len, dtype=args.dtype,
                                         device=args.device, draft=args.draft, compile=args.compile,
                                         quantize=args.quantize)
    except (FileNotFoundError, ValueError) as e:
        print(f"angelmed chat: {e}", file=sys.stderr)
        return 2
    guard = load_safety(not args.no_safety)
    defaults = _sampling_defaults(args.model_dir)
    if args.temperature is not None:
        defaults["temperature"] = args.temperature
    console.print("[dim]/reset starts a new conversation, /exit quits[/dim]")
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = console.input("[bold cyan]you> [/bold cyan]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not user:
            continue
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": user})
        ids = chat_prompt_ids(tokenizer, messages)
        room = engine.max_seq_len - len(ids)
        if room < 1:
            console.print("[red]the conversation no longer fits the context; /reset to start over[/red]")
            messages.pop()
            continue
        req = GenerationRequest(ids, max_tokens=min(args.max_tokens, room), **defaults)
        console.print("[bold green]angelmed> [/bold green]", end="")
        reply, n_out, cached, t0 = "", 0, 0, time.perf_counter()
        try:
            for d in engine.stream_sync(req):
                reply += d.text
                n_out, cached = n_out + len(d.token_ids), d.cached_tokens
                console.print(d.text, end="", markup=False, highlight=False)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            console.print("[dim] (stopped)[/dim]", end="")
        if guard is not None:
            suffix = guard.guidance_suffix(user, reply)
            if suffix:
                reply += suffix
                console.print(suffix, end="", markup=False, highlight=False)
        dt = time.perf_counter() - t0
        console.print(f"\n[dim]{n_out} tokens, {n_out / dt:.1f} tok/s; prompt {len(ids)} tokens, "
                      f"{cached} from the previous turn's cache[/dim]")
        messages.append({"role": "assistant", "content": reply})

"""Model-level subcommands: info, new, logits, generate, convert. Contract used by tests and tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from angelmed.checkpoint import CheckpointError, load_model, read_generation_config, save_model
from angelmed.config import ConfigError, ModelConfig, get_preset, PRESETS
from angelmed.draft import draft_summary, read_mtp_draft_vocab
from angelmed.hub import local_dir


def _fail(msg: str) -> int:
    print(f"angelmed: error: {msg}", file=sys.stderr)
    return 2


def _load_ids(path: str, vocab_size: int) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ids file {path!r} not found")
    ids = np.load(p)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: expected integer ids of shape [B, T], got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{path}: token ids must be in [0, {vocab_size}), got range [{ids.min()}, {ids.max()}]")
    return torch.from_numpy(ids.astype(np.int64))


def _save_npy(path: str, array: np.ndarray) -> None:
    """Atomic .npy write: a failed run leaves no partial output."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(p)


def _guard(fn):
    def wrapped(argv: list[str]) -> int:
        try:
            return fn(argv)
        except (FileNotFoundError, ValueError, CheckpointError, ConfigError) as e:
            return _fail(str(e))
    return wrapped


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@_guard
def info(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="angelmed info", description="config summary and parameter counts")
    ap.add_argument("model", help="checkpoint or EAGLE-3 draft directory, Hub id, or a preset name")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--gpu-gb", type=float, default=None,
                    help="GPU memory in GB (e.g. 80): also print the fewest GPUs for BF16 and FP8 weights")
    a = ap.parse_args(argv)
    mtp_vocab = None
    if a.model in PRESETS and not Path(a.model).exists():
        cfg = get_preset(a.model)
    else:
        path = local_dir(a.model, config_only=True)
        draft = draft_summary(path)
        if draft is not None:
            return _print_summary(draft, a.json)
        cfg = ModelConfig.from_json(path)
        mtp_vocab = read_mtp_draft_vocab(path)  # `train draft --draft.kind mtp --draft.draft_vocab_size N`
    counts = cfg.param_counts()
    summary = {
        "layers": cfg.num_hidden_layers, "dense_layers": cfg.first_k_dense_replace, "hidden": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv x {cfg.head_dim}",
        "rotary_dim": cfg.rotary_dim, "experts": f"{cfg.num_experts} (top-{cfg.num_experts_per_tok}, "
        f"{cfg.num_groups} groups keep {cfg.topk_group}, {cfg.num_shared_experts} shared)",
        "mtp_layers": cfg.num_nextn_predict_layers, "vocab": cfg.vocab_size,
        "context": cfg.max_position_embeddings, "rope_scaling": cfg.rope_scaling, "dtype": cfg.torch_dtype,
        "fp8": cfg.quantization_config is not None, "params_total": counts["total"],
        "params_active": counts["active"], "params_expert_bias_fp32": counts["expert_bias_fp32"],
        **serving_memory(cfg),
    }
    if mtp_vocab is not None:
        summary["mtp_draft_vocab"] = mtp_vocab.numel()
    if a.gpu_gb:
        summary.update(gpu_plan(summary, a.gpu_gb))
    return _print_summary(summary, a.json, a.gpu_gb, cfg.max_position_embeddings)


def _print_summary(summary: dict, as_json: bool, gpu_gb: float | None = None, context: int = 0) -> int:
    if as_json:
        print(json.dumps(summary))
        return 0
    for k, v in summary.items():
        if k.startswith("params"):
            v = f"{v:,} ({_fmt(v)})"
        elif k.endswith("_bytes"):
            v = f"{v / 2**30:,.2f} GiB" if v >= 2**30 else f"{v / 2**10:,.1f} KiB"
        elif k.startswith("gpus_"):
            v = (f"{v['gpus']} x {gpu_gb:g} GB, {v['kv_cache_bytes'] / 2**30:,.1f} GiB left for the KV cache "
                 f"({v['full_context_sequences']} sequences of {context} tokens)")
        print(f"{k:>30}: {v}")
    return 0


def gpu_plan(summary: dict, gpu_gb: float, usable: float = 0.9) -> dict[str, dict]:
    """Fewest GPUs (a power of two, for tensor parallelism) whose `usable` share of memory holds the weights, and
    the KV cache room left: per weight format."""
    per_gpu = gpu_gb * 1e9 * usable
    out = {}
    for fmt in ("bf16", "fp8"):
        weights = summary[f"weights_{fmt}_bytes"]
        n = 1
        while n * per_gpu < weights:
            n *= 2
        kv = n * per_gpu - weights
        out[f"gpus_{fmt}"] = {"gpus": n, "kv_cache_bytes": int(kv),
                              "full_context_sequences": int(kv // summary["kv_cache_full_context_bytes"])}
    return out


def serving_memory(cfg: ModelConfig) -> dict[str, int]:
    """Resident weights in BF16 and block-FP8, and the BF16 KV cache per token and per full-context sequence."""
    from angelmed.checkpoint import checkpoint_bytes

    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16, main layers
    return {"weights_bf16_bytes": checkpoint_bytes(cfg), "weights_fp8_bytes": checkpoint_bytes(cfg, fp8=True),
            "kv_cache_per_token_bytes": kv, "kv_cache_full_context_bytes": kv * cfg.max_position_embeddings}


@_guard
def new(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="angelmed new", description="randomly initialised checkpoint of a preset")
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("dst")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the preset's)")
    a = ap.parse_args(argv)
    from angelmed.model import Transformer

    cfg = get_preset(a.preset)
    if cfg.param_counts()["total"] > 2e9:
        return _fail(f"preset {a.preset!r} has {_fmt(cfg.param_counts()['total'])} parameters; "
                     "refusing to initialise it in host memory (use `angelmed info` for its plan)")
    model = Transformer(cfg).init_weights(a.seed)
    save_model(model, a.dst, dtype=a.dtype or cfg.torch_dtype)
    print(f"wrote {a.preset} checkpoint to {a.dst}")
    return 0


@_guard
def logits(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="angelmed logits", description="float32 logits for ids.npy")
    ap.add_argument("model")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True, help="logits [B,T,V] float32 .npy")
    ap.add_argument("--mtp-out", help="MTP logits [D,B,T,V] .npy")
    ap.add_argument("--routing-out", help="expert ids [L_moe,B,T,k] .npy (main layers)")
    ap.add_argument("--hidden-out", help="final hidden states [B,T,H] .npy")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    a.model = local_dir(a.model)
    model = load_model(a.model, dtype=a.dtype)
    ids = _load_ids(a.ids, model.config.vocab_size)
    if a.mtp_out and not model.config.num_nextn_predict_layers:
        raise ValueError(f"--mtp-out: {a.model} has no MTP layers (num_nextn_predict_layers = 0)")
    with torch.no_grad():
        out = model(ids, mtp=bool(a.mtp_out))
    results = {a.out: out.logits.float().numpy()}
    if a.mtp_out:
        results[a.mtp_out] = torch.stack(out.mtp_logits).float().numpy()
    if a.routing_out:
        main = out.router[: len(out.router) - (len(out.mtp_logits))]
        results[a.routing_out] = torch.stack([r.idx_Tk for r in main]).numpy().astype(np.int64)
    if a.hidden_out:
        results[a.hidden_out] = out.hidden.float().numpy()
    for path, arr in results.items():  # compute everything first: an error leaves no partial output
        _save_npy(path, arr)
    return 0


@_guard
def generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="angelmed generate", description="continuation of ids.npy")
    ap.add_argument("model")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (default: the sampling settings)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS ids")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", required=True, help="new token ids [B,N] int64 .npy")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    from angelmed.infer.generate import generate as gen

    a.model = local_dir(a.model)
    model = load_model(a.model, dtype=a.dtype)
    ids = _load_ids(a.ids, model.config.vocab_size)
    eos = read_generation_config(a.model).get("eos_token_id", model.config.eos_token_id)
    stop = None if a.ignore_eos else ([eos] if isinstance(eos, int) else list(eos))
    if ids.shape[1] + a.max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({ids.shape[1]}) + --max-new-tokens ({a.max_new_tokens}) exceeds the context "
                         f"of {a.model}")
    new_ids = gen(model, ids, a.max_new_tokens, temperature=0.0 if a.greedy else a.temperature,
                  top_k=a.top_k, top_p=a.top_p, stop_ids=stop, seed=a.seed)
    _save_npy(a.out, new_ids.numpy().astype(np.int64))
    return 0


@_guard
def convert(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="angelmed convert", description="re-save a checkpoint")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--fp8", action="store_true", help="write the official block-FP8 format")
    ap.add_argument("--shards", type=int, default=None, help="number of safetensors shards")
    ap.add_argument("--drop-mtp", action="store_true", help="leave out the MTP layers (vLLM has no MTP for this model)")
    ap.add_argument("--hf-remote-code", action="store_true",
                    help="also write modeling/config files so transformers loads it with trust_remote_code")
    ap.add_argument("--target", default=None,
                    help="SRC is an angelmed EAGLE-3 draft (layout llama): write it as the LlamaForCausalLMEagle3 "
                         "directory SGLang/vLLM load, with this target's head rows")
    a = ap.parse_args(argv)
    if Path(a.dst).resolve() == Path(a.src).resolve():
        raise ValueError("convert: dst must differ from src")
    a.src, a.target = local_dir(a.src), a.target and local_dir(a.target)
    if a.target:
        from angelmed.draft import DraftModel, export_llama_eagle3

        export_llama_eagle3(DraftModel.load(a.src), load_model(a.target, dtype="float32"), a.dst,
                            dtype=getattr(torch, a.dtype or "bfloat16"))
        print(f"wrote {a.dst} (LlamaForCausalLMEagle3; serve with: angelmed serve {a.target} --backend sglang "
              f"--draft {a.dst} --print-only)")
        return 0
    model = load_model(a.src, dtype="float32" if a.fp8 else a.dtype)
    if a.drop_mtp:
        model.drop_mtp()
    save_model(model, a.dst, dtype=a.dtype, fp8=a.fp8, shards=a.shards,
               generation_config=read_generation_config(a.src) or None)
    _copy_tokenizer(Path(a.src), Path(a.dst))
    if a.hf_remote_code:
        from angelmed.hf_remote import export_remote_code

        src = Path(a.src)
        export_remote_code(a.dst, tokenizer=src if (src / "tokenizer.json").is_file() else None)
    print(f"wrote {a.dst}")
    return 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)

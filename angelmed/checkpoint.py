"""Hugging Face checkpoint directories in and out: config.json, safetensors (single or sharded with
an index), block-FP8 weights with `*_scale_inv`, generation_config.json. Atomic writes throughout.

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped files,
so a checkpoint never needs twice its size in RAM. Names on disk are the official ones (spec §6);
the only difference from our module names is that routed experts are stored per expert on disk
(`mlp.experts.{e}.gate_proj.weight`) and stacked in memory (`mlp.experts.gate_proj[e]`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from angelmed.config import ModelConfig
from angelmed.model import Transformer, rope_parameters

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP8_BLOCK = 128
FP8_MAX = 448.0
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Which tensors the official converter quantises, and which of those get power-of-two (UE8M0) scales.
_FP8_RE = re.compile(r"(attention\.query_key_value|attention\.dense|mlp\.(experts\.\d+\.)?(gate|up|down)_proj"
                     r"|mlp\.shared_experts\.(gate|up|down)_proj)\.weight$")
_UE8M0_RE = re.compile(r"(attention\.dense|mlp\.experts\.\d+\.(gate|up)_proj)\.weight$")


class CheckpointError(ValueError):
    pass


# ---- atomic file system helpers ------------------------------------------------------------------
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike):
    """Yield a temporary directory next to `dst`; on success it replaces `dst` in one rename."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        yield tmp
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- FP8 block quantisation (official converter format) ------------------------------------------
def quantize_fp8_block(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (float8_e4m3fn [out, in], fp32 scale_inv [ceil(out/128), ceil(in/128)])."""
    if w.dim() != 2:
        raise CheckpointError(f"FP8 block quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    m, n = w.shape
    pm, pn = math.ceil(m / FP8_BLOCK) * FP8_BLOCK, math.ceil(n / FP8_BLOCK) * FP8_BLOCK
    padded = torch.zeros(pm, pn, dtype=w.dtype, device=w.device)
    padded[:m, :n] = w
    blocks = padded.view(pm // FP8_BLOCK, FP8_BLOCK, pn // FP8_BLOCK, FP8_BLOCK)
    scale = blocks.abs().float().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / FP8_MAX
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale.clamp(min=1e-10))))
    q = (blocks / scale).to(torch.float8_e4m3fn).view(pm, pn)[:m, :n].contiguous()
    return q, scale.view(pm // FP8_BLOCK, pn // FP8_BLOCK).contiguous()


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    m, n = q.shape
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:m, :n]
    return q.float() * s


# ---- reading ---------------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> file holding it."""
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            wmap = index["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({e!r})") from None
        missing = sorted({f for f in wmap.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE}: shard file(s) missing: {missing}")
        return {name: path / f for name, f in wmap.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _open(single) as f:
        return {name: single for name in f.keys()}


@contextlib.contextmanager
def _open(file: Path):
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def iter_checkpoint(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs straight from disk (memory-mapped), file by file."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in _weight_files(Path(path)).items():
        by_file[file].append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{file}: index lists {name!r} but the file does not hold it")
                try:
                    yield name, f.get_tensor(name)
                except SafetensorError as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None


def _target(params: dict[str, torch.Tensor], name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (our parameter name, expert index or None)."""
    m = _EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return name, None


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> Transformer:
    """Allocate without initialising: built on meta, materialised once (no fp32 copy of a bf16 model)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.inv_freq = rope_parameters(cfg)[0].to(device)
    return model


def load_state(model: Transformer, path: str | os.PathLike, strict: bool = True, assign=None,
               expected: set[str] | None = None) -> None:
    """Fill `model` from a checkpoint directory, checking names and shapes; FP8 tensors are dequantised as soon as
    their scales arrive (memory holds one pair at a time). assign(params, name, tensor, path) stores a tensor
    (default `_assign`); expected: the checkpoint names the model needs (default: from its own state dict)."""
    path = Path(path)
    assign = assign or _assign
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    params = {k: v for k, v in params.items() if k != "inv_freq"}
    expected = expected if expected is not None else _checkpoint_names(model)
    scales: dict[str, torch.Tensor] = {}
    pending_fp8: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unknown: list[str] = []

    def store(name: str, tensor: torch.Tensor) -> None:
        if name not in expected:
            unknown.append(name)
            return
        assign(params, name, tensor, path)
        seen.add(name)

    for name, tensor in iter_checkpoint(path):
        if name.endswith("_scale_inv"):
            base = name[: -len("_scale_inv")]
            if base in pending_fp8:
                store(base, dequantize_fp8_block(pending_fp8.pop(base), tensor))
            else:
                scales[base] = tensor
        elif tensor.dtype == torch.float8_e4m3fn:
            if name in scales:
                store(name, dequantize_fp8_block(tensor, scales.pop(name)))
            else:
                pending_fp8[name] = tensor
        else:
            store(name, tensor)
    if pending_fp8:
        name = next(iter(pending_fp8))
        raise CheckpointError(f"{path}: FP8 tensor {name!r} has no {name}_scale_inv")
    missing = sorted(expected - seen)
    if strict and (unknown or missing):
        msg = [f"{path}: checkpoint does not match the config"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unknown:
            msg.append(f"unknown tensors ({len(unknown)}): {sorted(unknown)[:8]}{' …' if len(unknown) > 8 else ''}")
        raise CheckpointError("; ".join(msg))


def _assign(params: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, path: Path) -> None:
    target, expert = _target(params, name)
    dst = params[target] if expert is None else params[target][expert]
    if tuple(dst.shape) != tuple(tensor.shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                              f"the config expects {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(tensor.to(dst.dtype) if name.endswith("expert_bias") else tensor)


def _checkpoint_names(model: Transformer) -> set[str]:
    names = set()
    for name, t in model.state_dict().items():
        if name == "inv_freq":
            continue
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            names |= {f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in range(t.shape[0])}
        else:
            names.add(name)
    return names


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device="cpu") -> Transformer:
    """Load an HF-layout BailingMoeV2 checkpoint. dtype defaults to the config's torch_dtype."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} not found")
    cfg = ModelConfig.from_json(path)
    dtype = _dtype(dtype or cfg.torch_dtype)
    model = empty_model(cfg, dtype, device)
    load_state(model, path)
    return model.eval()


def _dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if d not in table:
        raise CheckpointError(f"unknown dtype {d!r}; expected one of {sorted(table)}")
    return table[d]


def checkpoint_bytes(cfg: ModelConfig, fp8: bool = False, dtype_bytes: int = 2) -> int:
    """Bytes of the checkpoint's tensors (what a server holds resident before the KV cache), from the shapes of a
    meta-device model: `dtype_bytes` per parameter, expert biases fp32, and with fp8 one byte per quantised
    weight plus one fp32 scale per 128x128 block (the official converter's choice of tensors)."""
    from angelmed.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.replace(quantization_config=None))
    total = 0
    for name, t in model.state_dict().items():
        if name == "inv_freq":
            continue
        # stacked experts [E, rows, cols] are E separate checkpoint matrices
        mats = t.shape[0] if re.search(r"\.mlp\.experts\.(gate|up|down)_proj$", name) else 1
        official = re.sub(r"\.mlp\.experts\.(\w+)$", r".mlp.experts.0.\1.weight", name)
        if name.endswith("expert_bias"):
            total += 4 * t.numel()
        elif fp8 and _FP8_RE.search(official):
            rows, cols = t.shape[-2:]
            total += t.numel() + 4 * mats * _blocks(rows) * _blocks(cols)
        else:
            total += dtype_bytes * t.numel()
    return total


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


# ---- writing ---------------------------------------------------------------------------------------
def hf_state_dict(model: nn.Module, dtype: torch.dtype | None = None, fp8: bool = False,
                  prefix: str = "") -> dict[str, torch.Tensor]:
    """Our state dict under the official names (experts unstacked), optionally cast or FP8-quantised. A submodule
    (e.g. one layer) gives its part with `prefix` (e.g. "model.layers.3.") before its names."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(prefix=prefix).items():
        if name == "inv_freq":
            continue
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$", name)
        items = ([(f"{m.group(1)}.{e}.{m.group(2)}.weight{m.group(3) or ''}", t[e]) for e in range(t.shape[0])]
                 if m else [(name, t)])
        for n, x in items:
            x = x.detach().cpu()
            if x.dtype == torch.int8:
                raise CheckpointError("model holds int8 weights (a serving mode, angelmed.infer.int8): save the "
                                      "checkpoint it was loaded from instead")
            if x.dtype == torch.float8_e4m3fn or n.endswith("_scale_inv"):  # FP8-resident model (infer/quant.py)
                if not fp8:
                    raise CheckpointError("model holds FP8 weights; save with fp8=True or call "
                                          "infer.quant.dequantize_model_ first")
                out[n] = x.contiguous() if x.dtype == torch.float8_e4m3fn else x.float().contiguous()
            elif n.endswith("expert_bias"):
                out[n] = x.float().contiguous()
            elif fp8 and _FP8_RE.search(n):
                q, s = quantize_fp8_block(x.float(), ue8m0=bool(_UE8M0_RE.search(n)))
                out[n], out[n + "_scale_inv"] = q, s
            else:
                out[n] = (x.to(dtype) if dtype is not None else x).contiguous()
    return out


def save_model(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               fp8: bool = False, shards: int | None = None, generation_config: dict | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write an HF directory atomically. shards: number of safetensors shards (None/1 = single file)."""
    path = Path(path)
    dtype = _dtype(dtype) if dtype is not None else None
    cfg = model.config
    torch_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
        dtype or model.model.word_embeddings.weight.dtype]
    cfg = cfg.replace(torch_dtype="bfloat16" if fp8 else torch_dtype,
                      quantization_config=dict(FP8_QUANT_CONFIG) if fp8 else None)
    if fp8 and dtype is None:
        dtype = torch.bfloat16  # official FP8 checkpoints keep the unquantised tensors in BF16
    sd = hf_state_dict(model, dtype, fp8)
    with atomic_dir(path) as tmp:
        cfg.to_json(tmp / "config.json")
        write_safetensors(sd, tmp, shards)
        gen = generation_config or default_generation_config(cfg)
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        for fname, text in (extra_files or {}).items():
            atomic_write_text(tmp / fname, text)
    return path


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32}


def write_with_tensors(src: str | os.PathLike, dst: str | os.PathLike, new: dict[str, torch.Tensor],
                       extra_files: dict[str, str | bytes] | None = None, omit: tuple[str, ...] = ()) -> Path:
    """Write `dst` atomically as checkpoint `src` with the tensors `new` (official names) replaced. Only the shards
    holding them are rewritten (their other tensors copied as they are); every other file is hard-linked (copied
    across filesystems), so a 200 GB checkpoint with a retrained MTP layer costs about one shard's write. A replaced
    tensor keeps its format on disk: cast to its dtype, or block-FP8 quantised again with a new `_scale_inv`.
    omit: files of `src` not to carry over."""
    src, dst = Path(src), Path(dst)
    files = _weight_files(src)
    unknown = sorted(set(new) - set(files))
    if unknown:
        raise CheckpointError(f"{src}: no tensor(s) {unknown[:8]} to replace")
    disk_dtype: dict[str, str] = {}
    for file in {files[n] for n in new}:  # each file opened once (an MoE layer has hundreds of tensors)
        with _open(file) as f:
            disk_dtype |= {n: f.get_slice(n).get_dtype() for n in new if files[n] == file}
    values: dict[str, torch.Tensor] = {}
    for name, t in new.items():
        t = t.detach().cpu()
        if disk_dtype[name].startswith("F8"):
            if name + "_scale_inv" not in files:
                raise CheckpointError(f"{src}: FP8 tensor {name!r} has no {name}_scale_inv")
            values[name], values[name + "_scale_inv"] = quantize_fp8_block(t.float(),
                                                                            ue8m0=bool(_UE8M0_RE.search(name)))
        else:
            values[name] = t.to(_SAFETENSORS_DTYPES[disk_dtype[name]]).contiguous()
    touched = {files[n] for n in values}
    with atomic_dir(dst) as tmp:
        for p in src.iterdir():
            if p.is_file() and p not in touched and p.name not in (extra_files or {}) and p.name not in omit:
                try:  # (extra files are written beside the links, never through one into the source)
                    os.link(p, tmp / p.name)
                except OSError:
                    shutil.copy2(p, tmp / p.name)
        for file in touched:
            with _open(file) as f:
                sd = {name: values[name] if name in values else f.get_tensor(name) for name in f.keys()}
            save_file(sd, str(tmp / file.name), metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return dst


def write_safetensors(sd: dict[str, torch.Tensor], out_dir: Path, shards: int | None = None) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    if not shards or shards <= 1:
        save_file(sd, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    total = sum(t.numel() * t.element_size() for t in sd.values())
    max_size = math.ceil(total / shards)
    while True:  # greedy packing can overshoot the shard count at exactly total/shards; loosen until it fits
        split = split_torch_state_dict_into_shards(
            sd, filename_pattern="model{suffix}.safetensors", max_shard_size=max_size)
        if len(split.filename_to_tensors) <= shards:
            break
        max_size = math.ceil(max_size * 1.05)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(out_dir / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def default_generation_config(cfg: ModelConfig) -> dict:
    eos = cfg.eos_token_id
    gen = {"eos_token_id": eos, "pad_token_id": cfg.pad_token_id, "do_sample": False}
    if cfg.bos_token_id is not None:
        gen["bos_token_id"] = cfg.bos_token_id
    return gen


def read_generation_config(path: str | os.PathLike) -> dict:
    p = Path(path) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None

"""Run configuration for every training stage: dataclasses, YAML recipes and `--section.key value` overrides.

Resolution order: stage defaults (`default_config(stage)`) <- YAML file <- command-line overrides. Every
value is type-checked against the dataclass annotations; an unknown key or a wrong type raises
`RunConfigError` naming the key, where it came from, and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class RunConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    preset: str = "tiny"  # angelmed.config preset when init_from is empty
    init_from: str | None = None  # HF checkpoint directory (or Hub repo id) to start from (CPT from a base, ...)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (preset runs only)
    init_seed: int = 0


@dataclass
class DataSection:
    data_root: str | None = None  # default: $ANGELMED_DATA_ROOT
    tokenizer: str = "byte"  # "byte" (built-in byte-level stand-in) or a tokenizer directory
    sources: list[dict[str, Any]] = field(default_factory=list)  # [{spec, weight}]; see train/data.py
    heldout_fraction: float = 0.02  # documents/samples routed to the held-out split (by stable hash)
    seq_len: int = 128
    micro_batch_size: int = 4  # rows per rank per micro-batch
    eod_mask_loss: bool = True  # CPT: no loss where the *input* token is EOD (Ling/Megatron)
    reset_position_ids: bool = False  # CPT: per-document positions + document attention (SFT: always)
    only_last_assistant: bool = False  # SFT: loss on the last assistant turn only
    packing: str = "bfd"  # SFT: bfd (truncate overflow) | bfd_split | wrapped
    pack_buffer: int = 256  # SFT: samples packed together per round
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine/WSD end at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # WSD: share of steps in the final decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only (norm weights and biases excluded)
    grad_clip: float = 1.0  # 0 disables


@dataclass
class LossSection:
    mtp_weight: float = 0.1  # lambda in L_main + (lambda/D) sum_k L_k
    mtp_weight_schedule: list[list[float]] = field(default_factory=list)  # [[from_step, lambda], ...]
    z_loss_coef: float = 3.5e-6
    seq_balance_alpha: float = 0.0


@dataclass
class BalanceSection:
    bias_update_rate: float = 1e-3
    bias_zero_mean: bool = True
    freeze: bool = False  # True: biases never change (same as rate 0)


@dataclass
class TrainSection:
    steps: int = 100
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights and optimizer state)
    activation_checkpointing: bool = False  # keep only each layer's input; recompute the layer in backward
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    run_dir: str = "runs/cpt"
    log_every: int = 1
    eval_every: int = 50  # held-out loss every N steps (and at the end); 0 = end only
    eval_batches: int = 4
    save_every: int = 0  # checkpoint every N steps (and always at the end); 0 = end only
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in run_dir) | never | path of a checkpoint directory
    export_dtype: str = "bfloat16"  # dtype of the final exported HF model (run_dir/model)
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure this machine's matmul rate at start


@dataclass
class RunConfig:
    stage: str = "cpt"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- stage defaults (training.md §9) -------------------------------------------------------------
def default_config(stage: str) -> RunConfig:
    cfg = RunConfig(stage=stage)
    if stage == "sft":
        cfg.balance.freeze = True  # SFT/GRPO: biases frozen by default (§1.1 item 8)
        cfg.loss.z_loss_coef = 0.0
        cfg.optim.lr = 2e-5
        cfg.optim.schedule = "constant"
        cfg.train.run_dir = "runs/sft"
    return cfg


# ---- type checking -----------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` checked (and, for YAML's '1e-3' strings, converted) against annotation `tp`."""
    def fail() -> typing.NoReturn:
        raise RunConfigError(f"{source}: key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            fail()
        for opt in options:
            if opt is type(None):
                continue
            try:
                return check_value(value, opt, key, source)
            except RunConfigError:
                pass
        fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail()
        args = typing.get_args(tp)
        return {k: check_value(v, args[1], f"{key}.{k}", source) for k, v in value.items()} if args else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return build_dataclass(tp, value, source, prefix=f"{key}.")
    raise RunConfigError(f"{source}: key {key!r} has an unsupported annotation {tp!r}")


def build_dataclass(cls: type, values: dict[str, Any], source: str, prefix: str = "", base: Any = None) -> Any:
    """`cls(**values)` with every key checked; keys missing from `values` come from `base` (or defaults)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise RunConfigError(f"{source}: unknown key {prefix + unknown[0]!r} (known keys in "
                             f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        current = getattr(base, name) if base is not None else None
        if name in values:
            v = values[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(v, dict):
                kwargs[name] = build_dataclass(hints[name], v, source, f"{prefix}{name}.", current)
            else:
                kwargs[name] = check_value(v, hints[name], f"{prefix}{name}", source)
        elif base is not None:
            kwargs[name] = current
    return cls(**kwargs)


# ---- overrides ------------------------------------------------------------------------------------------
def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--train.lr', '3e-4', '--data.seq_len=64'] -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RunConfigError(f"command line: expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            dotted, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise RunConfigError(f"command line: {arg} needs a value")
            dotted, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = dotted.replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"command line: --{dotted} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def resolve_config(cls: type, base: Any, stage: str, path: str | Path | None, overrides: list[str] | None) -> Any:
    """base <- YAML file <- command-line overrides, type-checked against `cls` (any stage's run config)."""
    cfg = base
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RunConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        if data.get("stage", stage) != stage:
            raise RunConfigError(f"{path}: stage {data['stage']!r} does not match the command ({stage!r})")
        cfg = build_dataclass(cls, data, str(path), base=cfg)
    if overrides:
        cfg = build_dataclass(cls, parse_overrides(overrides), "command line", base=cfg)
    return cfg


def load_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None,
                config_only: bool = False) -> RunConfig:
    cfg = resolve_config(RunConfig, default_config(stage), stage, path, overrides)
    download_init_from(cfg, config_only)
    validate(cfg)
    return cfg


def download_init_from(cfg, config_only: bool = False) -> None:
    """model.init_from as a local directory (see `checkpoint_dir`; config_only: just its config.json, for plans
    that allocate nothing)."""
    cfg.model.init_from = checkpoint_dir("model.init_from", cfg.model.init_from, config_only)


def checkpoint_dir(key: str, value: str | None, config_only: bool = False) -> str | None:
    """A config value naming a checkpoint directory: a Hugging Face repo id there is downloaded (angelmed.hub);
    a failure is a config error naming the key."""
    from angelmed.hub import local_dir

    try:
        return value and local_dir(value, config_only)
    except FileNotFoundError as e:
        raise RunConfigError(f"{key}: {e}") from None


def validate(cfg: RunConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise RunConfigError(msg)

    t, o, d = cfg.train, cfg.optim, cfg.data
    need(o.schedule in ("cosine", "wsd", "constant"), f"optim.schedule: expected cosine|wsd|constant, got {o.schedule!r}")
    need(t.precision in ("fp32", "bf16"), f"train.precision: expected fp32|bf16, got {t.precision!r}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device: expected auto|cpu|cuda, got {t.device!r}")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    need(d.seq_len >= 2, f"data.seq_len must be >= 2, got {d.seq_len}")
    need(d.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {d.micro_batch_size}")
    need(0 <= d.heldout_fraction < 1, f"data.heldout_fraction must be in [0, 1), got {d.heldout_fraction}")
    need(d.packing in ("bfd", "bfd_split", "wrapped"), f"data.packing: expected bfd|bfd_split|wrapped, got {d.packing!r}")
    need(0 <= o.warmup_steps, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 < o.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    need(cfg.balance.bias_update_rate >= 0, f"balance.bias_update_rate must be >= 0, got {cfg.balance.bias_update_rate}")
    for i, pair in enumerate(cfg.loss.mtp_weight_schedule):
        need(len(pair) == 2, f"loss.mtp_weight_schedule[{i}]: expected [from_step, weight], got {pair}")

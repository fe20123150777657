"""ModelConfig: the BailingMoeV2 `config.json`, as a dataclass, with named presets.

Field names are the HF config.json keys (model_type "bailing_moe"). Missing keys take the *reference*
defaults (configuration_bailing_moe_v2.py), with a warning for the ones that silently change numerics
(spec model.md §1.3). `to_dict` always writes every key vLLM and SGLang read (spec §8.1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_TYPE = "bailing_moe"
ARCHITECTURES = ["BailingMoeV2ForCausalLM"]
AUTO_MAP = {
    "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
    "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
    "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
}

# Keys whose absence silently changes the network (reference default differs from the real model).
_WARN_IF_MISSING = {
    "routed_scaling_factor": "routing weights are not scaled (reference default 1.0; Ling-flash uses 2.5)",
    "partial_rotary_factor": "RoPE rotates all of head_dim (reference default 1.0; Ling-flash uses 0.5)",
    "n_group": "reference default 8 groups",
    "topk_group": "reference default 4 groups kept",
    "head_dim": "falls back to 128 (reference default)",
}
# Keys a checkpoint must carry: without them there is no network to build.
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # shape (reference defaults are Ling-mini's)
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    use_rmsnorm: bool = True
    use_qk_norm: bool = True
    use_bias: bool = False
    use_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # rotary
    partial_rotary_factor: float = 1.0
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    # MoE
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = None
    first_k_dense_replace: int = 1
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    router_dtype: str = "fp32"
    moe_router_enable_expert_bias: bool = True
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.0
    # misc keys engines read
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    output_router_logits: bool = False
    use_cache: bool = True
    pad_token_id: int = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] = 156892
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    # keys we do not interpret but keep so a load/save round trip loses nothing
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_expert_intermediate_size(self) -> int:
        # Load rule (spec §8.1): width = moe_intermediate_size x num_shared_experts, never the extra key.
        return self.moe_intermediate_size * (self.num_shared_experts or 0)

    @property
    def num_groups(self) -> int:
        """Expert groups for group-limited routing; 1 means plain top-k (n_group null/0/1)."""
        return self.n_group if self.n_group and self.n_group > 1 else 1

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices (in state-dict numbering) of MoE layers, MTP layers included."""
        main = list(range(self.first_k_dense_replace, self.num_hidden_layers))
        mtp = list(range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers))
        return main + mtp

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(self.score_function == "sigmoid", f"score_function: expected 'sigmoid', got {self.score_function!r}")
        need(self.hidden_act == "silu", f"hidden_act: expected 'silu', got {self.hidden_act!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(0 < self.partial_rotary_factor <= 1, f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0, f"rotary dim head_dim*partial_rotary_factor = {self.rotary_dim} must be even")
        need(1 <= self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")
        g = self.num_groups
        if g > 1:
            need(self.num_experts % g == 0, f"num_experts ({self.num_experts}) must be divisible by n_group ({g})")
            need(self.num_experts // g >= 2, f"n_group ({g}) leaves fewer than 2 experts per group")
            need(self.topk_group is not None and 1 <= self.topk_group <= g,
                 f"topk_group must be in 1..n_group ({g}), got {self.topk_group}")
            need(self.topk_group * (self.num_experts // g) >= self.num_experts_per_tok,
                 "topk_group groups hold fewer experts than num_experts_per_tok")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace out of range")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None), f"rope_scaling type {kind!r} not supported (yarn only)")

    # ---- I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        d = dict(d)
        mt = d.pop("model_type", MODEL_TYPE)
        if mt not in (MODEL_TYPE, "bailing_moe_v2"):
            raise ConfigError(f"{source}: model_type {mt!r} is not a BailingMoeV2 model (expected {MODEL_TYPE!r})")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        for key, why in _WARN_IF_MISSING.items():
            if key not in d:
                log.warning("%s: key %r missing; using the reference default: %s", source, key, why)
        if d.get("head_dim") is None:
            d.pop("head_dim", None)  # reference: null head_dim -> 128 default
        for k in ("architectures", "auto_map", "transformers_version"):
            d.pop(k, None)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for k, v in d.items():
            (kwargs if k in known else extra)[k] = v
        for f in fields(cls):
            if f.name in kwargs and kwargs[f.name] is not None:
                kwargs[f.name] = _coerce(f, kwargs[f.name], source)
        cfg = cls(**kwargs, extra=extra)
        cfg._warn_yarn()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architectures": ARCHITECTURES, "model_type": MODEL_TYPE, "auto_map": AUTO_MAP}
        for f in fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        # Export rule (§8.1): the per-expert width, so every engine builds moe_intermediate x n_shared.
        d["moe_shared_expert_intermediate_size"] = self.moe_intermediate_size
        d["use_rmsnorm"] = True
        if d["quantization_config"] is None:
            del d["quantization_config"]
        if d["bos_token_id"] is None:
            del d["bos_token_id"]
        for k, v in self.extra.items():
            d.setdefault(k, v)
        d.pop("norm_head", None)  # vLLM L2-normalises lm_head if present and true
        d.pop("rotary_dim", None)  # vLLM would take it over partial_rotary_factor
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        from angelmed.checkpoint import atomic_write_text

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def _warn_yarn(self) -> None:
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            orig = rs.get("original_max_position_embeddings")
            if orig and not math.isclose(self.max_position_embeddings / orig, rs.get("factor", 1.0)):
                log.warning(
                    "YaRN: max_position_embeddings/original (%s/%s) != factor %s; using factor (as transformers "
                    "4.57, vLLM, SGLang do)", self.max_position_embeddings, orig, rs.get("factor"))

    # ---- parameter counts ---------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Exact counts by formula: total, active (per token), expert_bias (fp32), embedding."""
        H, V = self.hidden_size, self.vocab_size
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim * H
        attn = qkv + H * self.num_attention_heads * self.head_dim
        if self.use_qkv_bias or self.use_bias:
            attn += (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        if self.use_bias:
            attn += H
        attn += 2 * self.head_dim if self.use_qk_norm else 0
        norms = 2 * H
        dense = 3 * H * self.intermediate_size
        expert = 3 * H * self.moe_intermediate_size
        shared = 3 * H * self.shared_expert_intermediate_size
        router = self.num_experts * H
        moe_total = self.num_experts * expert + shared + router
        moe_active = self.num_experts_per_tok * expert + shared + router
        n_dense = self.first_k_dense_replace
        n_moe = self.num_hidden_layers - n_dense
        D = self.num_nextn_predict_layers
        mtp_extra = 3 * H + 2 * H * H  # enorm, hnorm, final_layernorm, eh_proj
        embed = V * H * (1 if self.tie_word_embeddings else 2)
        total = embed + H + n_dense * (attn + norms + dense) + n_moe * (attn + norms + moe_total)
        total += D * (attn + norms + moe_total + mtp_extra)
        active = embed + H + n_dense * (attn + norms + dense) + n_moe * (attn + norms + moe_active)
        bias = (n_moe + D) * self.num_experts if self.moe_router_enable_expert_bias else 0
        return {"total": total, "active": active, "expert_bias_fp32": bias, "embedding": embed,
                "mtp": D * (attn + norms + moe_total + mtp_extra)}


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Check a config value's type; ints are accepted for floats."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "int | None": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "dict | None": lambda v: isinstance(v, dict),
        "int | list[int]": lambda v: isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v)),
    }.get(t)
    if ok is not None and not ok(value):
        raise ConfigError(f"{source}: key {f.name!r} expects {t}, got {type(value).__name__} {value!r}")
    if t == "float":
        return float(value)
    return value


# ---- presets -----------------------------------------------------------------------------------
def _preset(**kw) -> ModelConfig:
    base = dict(
        partial_rotary_factor=0.5, rope_theta=600000.0, routed_scaling_factor=2.5, num_shared_experts=1,
        first_k_dense_replace=1, use_qk_norm=True, torch_dtype="bfloat16", mtp_loss_scaling_factor=0.1,
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, Any] = {
    # unit tests: fast, still exercises groups, shared expert, dense layer and MTP
    "tiny": lambda: _preset(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        moe_intermediate_size=32, max_position_embeddings=256, num_nextn_predict_layers=1,
        pad_token_id=511, eos_token_id=511, torch_dtype="float32", initializer_range=0.02),
    # CPU pipeline runs (speedrun): a few million parameters
    "small": lambda: _preset(
        vocab_size=6144, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        moe_intermediate_size=128, max_position_embeddings=2048, num_nextn_predict_layers=1,
        pad_token_id=0, eos_token_id=0, torch_dtype="float32"),
    # ~100M total / ~30M active
    "base-100m": lambda: _preset(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_experts=24, num_experts_per_tok=4, n_group=4, topk_group=2,
        moe_intermediate_size=256, max_position_embeddings=4096, num_nextn_predict_layers=1,
        pad_token_id=0, eos_token_id=0, torch_dtype="float32"),
    # the real Ling-flash-2.0 / AntAngelMed shape (released chat checkpoint: no MTP layer)
    "flash-100b": lambda: _preset(
        vocab_size=157184, hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        moe_intermediate_size=1024, max_position_embeddings=32768, num_nextn_predict_layers=0,
        pad_token_id=156892, bos_token_id=156891, eos_token_id=[156892, 156895]),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()

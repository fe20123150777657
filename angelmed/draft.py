"""EAGLE-3-style draft model: one decoder layer fed the target's low/middle/high hidden states.

    g_t   = fc(cat[h_low_t, h_mid_t, h_high_t])                  fused target features at position t
    u_t   = eh_proj(cat[enorm(E[x_{t+1}]), hnorm(g_t)])           with the target's (frozen) embedding
    o_t   = final_norm(block(u_t))                                one dense decoder layer (target's attention kind)
    q_t   = softmax(W_head[vocab_map] o_t)                        target's (frozen) lm_head: predicts x_{t+2}

`vocab_map` (optional, EAGLE-3's reduced draft vocabulary) keeps only the rows of the frozen head for the most
frequent target tokens, so each draft step costs a fraction of a full-vocabulary projection.

Chained drafting feeds o back in place of g: step j (1-based) for base position t runs at RoPE position t+j-1,
takes token x_{t+j} and o^{(j-1)}_t, and predicts x_{t+j+1}. At inference its attention sees the draft's cached
step-1 states of positions <= t (computed from real target features) and its own chain states of base t.

`layout: llama` builds instead the decoder layer of `LlamaForCausalLMEagle3`, the layout vLLM and SGLang serve:

    x_t   = cat[input_layernorm(E[x_{t+1}]), hidden_norm(g_t)]     2H wide, read by q/k/v directly
    r_t   = g_t + attn(x_t);  r_t = r_t + mlp(post_attention_layernorm(r_t))
    q_t   = softmax(W_head[vocab_map] norm(r_t))                  the chain feeds the pre-norm r back

with plain Llama attention (full RoPE, no QK-norm). `export_llama_eagle3` writes such a draft in their format.

Training-time test (EAGLE-3): the steps are unrolled during training with exactly that attention pattern. Step j's
keys are [step-1 keys of all positions (causal, same packed segment), step-2..j keys of the same base only
(diagonal)], so the draft learns on its own multi-step rollouts under the inference-time view. `ttt_attention=False`
gives the plain unrolled variant (each step causal over its own states), kept for comparison.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from angelmed.config import ModelConfig
from angelmed.model import MLP, Attention, DecoderLayer, RMSNorm, Transformer, rope_cos_sin, rope_parameters

DRAFT_ARCH = "AngelmedEagle3Draft"
DRAFT_MODEL_TYPE = "angelmed_eagle3_draft"
IGNORE_INDEX = -100
LAYOUTS = ("angelmed", "llama")  # the draft's decoder layer: ours, or LlamaForCausalLMEagle3's
MTP_DRAFT_VOCAB = "mtp_draft_vocab.json"  # beside a checkpoint: the target ids its MTP drafter scores


@dataclass
class DraftConfig:
    hidden_size: int
    vocab_size: int
    feature_layers: tuple[int, int, int]  # target layers whose outputs are fused (low, middle, high)
    target: dict  # the target's ModelConfig (shapes of the draft's decoder layer come from it)
    intermediate_size: int | None = None  # dense MLP width of the draft layer (default: target's)
    draft_vocab_size: int | None = None  # None: the full target vocabulary; else a frequent-token subset
    layout: str = "angelmed"  # or "llama": the LlamaForCausalLMEagle3 layer vLLM and SGLang serve
    # an imported LlamaForCausalLMEagle3 draft: its own layer shapes (heads, head_dim, rope, ...), and its own
    # lm_head / embedding where it ships them (ours use the target's, frozen)
    layer_config: dict | None = None
    own_head: bool = False
    own_embedding: bool = False

    @classmethod
    def for_target(cls, cfg: ModelConfig, feature_layers: tuple[int, ...] | None = None,
                   intermediate_size: int | None = None, draft_vocab_size: int | None = None,
                   layout: str = "angelmed") -> "DraftConfig":
        L = cfg.num_hidden_layers
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
        # vLLM and SGLang capture a layer's output as the next layer's input, so the last layer is out of reach;
        # their default layers (inputs of 2, L/2, L-3) are the outputs of 1, L/2-1, L-4
        top = L - 1 if layout == "angelmed" else L - 2
        default = (min(1, L - 1), L // 2, L - 1) if layout == "angelmed" else \
            tuple(min(max(i, 0), top) for i in (1, L // 2 - 1, L - 4))
        layers = tuple(feature_layers) if feature_layers else default
        if len(layers) != 3 or not all(0 <= i <= top for i in layers):
            raise ValueError(f"feature_layers: expected 3 layer indices in [0, {top}] for the {layout} layout, "
                             f"got {list(layers)}")
        if draft_vocab_size is not None and not 0 < draft_vocab_size <= cfg.vocab_size:
            raise ValueError(f"draft_vocab_size: expected 1..{cfg.vocab_size} (or None), got {draft_vocab_size}")
        if draft_vocab_size == cfg.vocab_size:
            draft_vocab_size = None
        return cls(cfg.hidden_size, cfg.vocab_size, layers, cfg.to_dict(),
                   intermediate_size or cfg.intermediate_size, draft_vocab_size, layout)

    def target_config(self) -> ModelConfig:
        """The config of the draft's decoder layer: the target's shapes, one dense layer."""
        d = dict(self.target)
        d.update(first_k_dense_replace=1, num_hidden_layers=1, num_nextn_predict_layers=0,
                 intermediate_size=self.intermediate_size or d["intermediate_size"], quantization_config=None)
        if self.layout == "llama":  # plain Llama attention
            d.update(use_qk_norm=False, partial_rotary_factor=1.0, use_qkv_bias=False, use_bias=False)
        d.update(self.layer_config or {})
        return ModelConfig.from_dict(d, source="draft config")

    def check_target(self, cfg: ModelConfig, where: str = "draft") -> None:
        """Raise if this draft cannot serve a target of config `cfg` (shapes, layer indices)."""
        problems = []
        if cfg.hidden_size != self.hidden_size:
            problems.append(f"hidden_size {self.hidden_size} vs target {cfg.hidden_size}")
        if cfg.vocab_size != self.vocab_size:
            problems.append(f"vocab_size {self.vocab_size} vs target {cfg.vocab_size}")
        if max(self.feature_layers) >= cfg.num_hidden_layers:
            problems.append(f"feature_layers {list(self.feature_layers)} vs target's {cfg.num_hidden_layers} layers")
        if problems:
            raise ValueError(f"{where}: does not fit the target model: " + "; ".join(problems))


class LlamaEagle3Layer(nn.Module):
    """The decoder layer of LlamaForCausalLMEagle3: q/k/v read cat[input_layernorm(embedding), hidden_norm(g)]
    (2H wide) and the residual stream starts from g. Returns the pre-norm stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.hidden_norm = RMSNorm(H, eps)
        self.self_attn = Attention(cfg)
        self.self_attn.query_key_value = nn.Linear(2 * H, self.self_attn.query_key_value.out_features, bias=False)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, cfg.intermediate_size)

    def forward(self, emb_BTD: Tensor, g_BTD: Tensor, rope, mask, pos_BT=None, cache=None) -> Tensor:
        x = torch.cat([self.input_layernorm(emb_BTD), self.hidden_norm(g_BTD)], dim=-1)
        r = g_BTD + self.self_attn(x, rope, mask, pos_BT, cache)
        return r + self.mlp(self.post_attention_layernorm(r))


class DraftModel(nn.Module):
    def __init__(self, dc: DraftConfig):
        super().__init__()
        self.draft_config = dc
        cfg = dc.target_config()
        H = dc.hidden_size
        self.fc = nn.Linear(3 * H, H, bias=False)
        if dc.layout == "llama":
            self.midlayer = LlamaEagle3Layer(cfg)
            self.norm = RMSNorm(H, cfg.rms_norm_eps)
        else:
            self.enorm = RMSNorm(H, cfg.rms_norm_eps)
            self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
            self.layer = DecoderLayer(cfg, moe=False)
            self.final_norm = RMSNorm(H, cfg.rms_norm_eps)
        if dc.own_head:
            self.lm_head = nn.Linear(H, dc.draft_vocab_size or dc.vocab_size, bias=False)
        if dc.own_embedding:
            self.embed_tokens = nn.Embedding(dc.vocab_size, H)
        if dc.draft_vocab_size:
            # target ids of the draft vocabulary (sorted); saved with the weights
            self.register_buffer("vocab_map", torch.arange(dc.draft_vocab_size))
        else:
            self.vocab_map = None
        # fp32 and not a buffer: casting the draft to bf16 must not round the rotary frequencies
        self._inv_freq, self.rope_scaling = rope_parameters(cfg)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DraftModel":
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def set_vocab(self, target_ids: Tensor | list[int]) -> None:
        ids = torch.as_tensor(target_ids, dtype=torch.long).unique(sorted=True)
        if self.vocab_map is None or ids.numel() != self.vocab_map.numel():
            raise ValueError(f"set_vocab: expected {self.draft_config.draft_vocab_size} distinct ids, got {ids.numel()}")
        if ids.min() < 0 or ids.max() >= self.draft_config.vocab_size:
            raise ValueError(f"set_vocab: ids must lie in [0, {self.draft_config.vocab_size})")
        self.vocab_map.copy_(ids.to(self.vocab_map.device))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.draft_config.feature_layers)

    # ---- the network -------------------------------------------------------------------------------------
    def fuse(self, feats: list[Tensor]) -> Tensor:
        return self.fc(torch.cat(feats, dim=-1))

    def rope(self, pos_BT: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._inv_freq.device != pos_BT.device:
            self._inv_freq = self._inv_freq.to(pos_BT.device)
        return rope_cos_sin(self._inv_freq, self.rope_scaling, pos_BT, dtype)

    def forward(self, emb_BTD: Tensor, g_BTD: Tensor, rope, mask, pos_BT=None, cache=None) -> Tensor:
        """One draft step: the state the next chained step takes in place of g (see `head_input`)."""
        if self.draft_config.layout == "llama":
            return self.midlayer(emb_BTD, g_BTD, rope, mask, pos_BT, cache)
        u = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(g_BTD)], dim=-1))
        u, _ = self.layer(u, rope, mask, pos_BT, cache)
        return self.final_norm(u)

    def head_input(self, o_BTD: Tensor) -> Tensor:
        """What the head scores: a step's output, after the final norm in the llama layout (there the chain takes
        the pre-norm state)."""
        return self.norm(o_BTD) if self.draft_config.layout == "llama" else o_BTD

    def embed(self, ids_BT: Tensor, target: Transformer) -> Tensor:
        """Embedding of the tokens the draft takes in: the target's (frozen), or its own when it ships one."""
        if self.draft_config.own_embedding:
            return self.embed_tokens(ids_BT)
        with torch.no_grad():
            return target.model.word_embeddings(ids_BT)

    def head_weight(self, target: Transformer) -> Tensor:
        """Rows of the target's frozen lm_head that the draft scores (all rows without a vocab_map); an imported
        draft's own head."""
        if self.draft_config.own_head:
            return self.lm_head.weight
        w = target.head_weight.detach()
        return w if self.vocab_map is None else w[self.vocab_map]

    # ---- persistence: an HF-style directory with its own config ------------------------------------------
    def save(self, path: str | Path, extra_files: dict[str, str | bytes] | None = None) -> None:
        """Atomic directory write: config.json, model.safetensors (+ extra files, e.g. training state)."""
        from safetensors.torch import save_file

        from angelmed.checkpoint import atomic_dir

        with atomic_dir(path) as tmp:
            d = asdict(self.draft_config)
            d["feature_layers"] = list(d["feature_layers"])
            d = {"architectures": [DRAFT_ARCH], "model_type": DRAFT_MODEL_TYPE, **d}
            (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    @classmethod
    def load(cls, path: str | Path, dtype=torch.float32, device="cpu") -> "DraftModel":
        from safetensors.torch import load_file

        d = read_draft_config(path)
        model = cls(d)
        state = load_file(Path(path) / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: draft weights do not match its config: missing {missing}, "
                             f"unexpected {unexpected}")
        model.to(device=device, dtype=dtype)
        if model.vocab_map is not None:
            model.vocab_map = model.vocab_map.long()
        return model.eval()


LLAMA_EAGLE3_ARCH = "LlamaForCausalLMEagle3"


def export_llama_eagle3(draft: DraftModel, target: Transformer, path: str | Path,
                        dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a `layout: llama` draft as the LlamaForCausalLMEagle3 directory SGLang (and vLLM) load as an EAGLE-3
    draft: fc, midlayer.* (q/k/v/o split out of our fused projection), norm, lm_head = the target's head rows the
    draft scores (or its own), d2t/t2d for a reduced vocabulary. No embed_tokens unless the draft has its own: the
    engines then share the target's, as the draft was trained. The aux layer ids go in `eagle_config` with
    SGLang's meaning (the output of layer i)."""
    from safetensors.torch import save_file

    from angelmed.checkpoint import atomic_dir

    dc = draft.draft_config
    if dc.layout != "llama":
        raise ValueError(f"export: this draft has the {dc.layout!r} layout, whose layer {LLAMA_EAGLE3_ARCH} cannot "
                         f"express (docs/draft.md); train one with draft.layout: llama")
    dc.check_target(target.config, "export")
    cfg, a, m = dc.target_config(), draft.midlayer.self_attn, draft.midlayer
    q, k, v = a.query_key_value.weight.split([a.n_q * a.d, a.n_kv * a.d, a.n_kv * a.d])
    weights = {
        "fc.weight": draft.fc.weight, "norm.weight": draft.norm.weight, "lm_head.weight": draft.head_weight(target),
        "midlayer.input_layernorm.weight": m.input_layernorm.weight,
        "midlayer.hidden_norm.weight": m.hidden_norm.weight,
        "midlayer.self_attn.q_proj.weight": q, "midlayer.self_attn.k_proj.weight": k,
        "midlayer.self_attn.v_proj.weight": v, "midlayer.self_attn.o_proj.weight": a.dense.weight,
        "midlayer.post_attention_layernorm.weight": m.post_attention_layernorm.weight,
        "midlayer.mlp.gate_proj.weight": m.mlp.gate_proj.weight, "midlayer.mlp.up_proj.weight": m.mlp.up_proj.weight,
        "midlayer.mlp.down_proj.weight": m.mlp.down_proj.weight}
    if dc.own_embedding:
        weights["embed_tokens.weight"] = draft.embed_tokens.weight
    weights = {k: w.detach().to("cpu", dtype).contiguous() for k, w in weights.items()}
    if draft.vocab_map is not None:  # draft id i is target id i + d2t[i]; t2d marks the target ids kept
        ids = draft.vocab_map.detach().cpu().long()
        weights["d2t"] = ids - torch.arange(ids.numel())
        weights["t2d"] = torch.zeros(dc.vocab_size, dtype=torch.bool).index_fill_(0, ids, True)
    config = {
        "architectures": [LLAMA_EAGLE3_ARCH], "model_type": "llama", "hidden_size": dc.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "num_hidden_layers": 1,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": dc.vocab_size, "draft_vocab_size": dc.draft_vocab_size or dc.vocab_size,
        "target_hidden_size": dc.hidden_size, "tie_word_embeddings": False, "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(dc.feature_layers), "use_aux_hidden_state": True}}
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def _llama_eagle3_names(w: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensor names as SGLang writes them (`midlayer.*`, no `model.` prefix); other trainers write `layers.0.*`
    and/or a `model.` prefix, which vLLM maps the same way."""
    out = {}
    for k, v in w.items():
        k = k.removeprefix("model.")
        out["midlayer." + k.removeprefix("layers.0.") if k.startswith("layers.0.") else k] = v
    return out


_LLAMA_VARIANTS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output", "attention_bias")


def _llama_eagle3_feature_layers(config: dict) -> tuple[int, ...] | None:
    """A LlamaForCausalLMEagle3 config's aux layers as target layer outputs: `eagle_config`'s ids are outputs
    (SGLang), the top-level key's are inputs (vLLM); None: the engines' default."""
    if (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"):
        return tuple(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return tuple(i - 1 for i in config["eagle_aux_hidden_state_layer_ids"])
    return None


def import_llama_eagle3(path: str | Path, target_config: ModelConfig) -> DraftModel:
    """A LlamaForCausalLMEagle3 directory (as SGLang and vLLM load, e.g. a published EAGLE-3 draft for the target)
    as a `layout: llama` DraftModel with its own layer shapes, lm_head and (if shipped) embedding. The feature
    layers come from `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang: layer outputs), else the top-level
    key (vLLM: layer inputs), else the engines' default. Variants of the layer we do not build are refused."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    try:
        c = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: cannot read ({e})") from None
    where = f"{path}: LlamaForCausalLMEagle3 draft"
    if LLAMA_EAGLE3_ARCH not in (c.get("architectures") or []):
        raise ValueError(f"{cfg_file}: architectures {c.get('architectures')}, expected [{LLAMA_EAGLE3_ARCH!r}]")
    eagle = c.get("eagle_config") or {}
    bad = [k for k in _LLAMA_VARIANTS if c.get(k) or eagle.get(k)]
    if c.get("num_hidden_layers", 1) != 1 or c.get("hidden_act", "silu") != "silu" or \
            eagle.get("use_aux_hidden_state", True) is False:
        bad.append("num_hidden_layers != 1, hidden_act != silu or use_aux_hidden_state false")
    if bad:
        raise ValueError(f"{where}: unsupported layer variant(s) {bad}")
    H = c["hidden_size"]
    if c.get("target_hidden_size", H) != H or target_config.hidden_size != H:
        raise ValueError(f"{where}: hidden_size {H} (target_hidden_size {c.get('target_hidden_size', H)}) vs the "
                         f"target's {target_config.hidden_size}; only equal widths are supported")
    layers = _llama_eagle3_feature_layers(c)
    w = _llama_eagle3_names(load_file(str(path / "model.safetensors")))
    p = "midlayer."
    need = ["fc.weight", "norm.weight", "lm_head.weight", *(p + f"self_attn.{x}_proj.weight" for x in "qkvo"),
            *(p + f"{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
            *(p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down"))]
    missing = [k for k in need if k not in w]
    if missing:
        raise ValueError(f"{where}: model.safetensors lacks {missing}")
    V, Nd = c.get("vocab_size", target_config.vocab_size), c.get("draft_vocab_size") or target_config.vocab_size
    if V != target_config.vocab_size:
        raise ValueError(f"{where}: vocab_size {V} vs the target's {target_config.vocab_size}")
    dc = DraftConfig.for_target(target_config, layers, c["intermediate_size"], Nd if Nd != V else None, "llama")
    dc.layer_config = {"num_attention_heads": c["num_attention_heads"],
                       "num_key_value_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
                       "head_dim": c.get("head_dim", H // c["num_attention_heads"]),
                       "rms_norm_eps": c.get("rms_norm_eps", 1e-6), "rope_theta": c.get("rope_theta", 10000.0),
                       "rope_scaling": c.get("rope_scaling"),
                       "max_position_embeddings": c.get("max_position_embeddings",
                                                        target_config.max_position_embeddings)}
    dc.own_head, dc.own_embedding = True, "embed_tokens.weight" in w
    draft = DraftModel(dc)
    state = {"fc.weight": w["fc.weight"], "norm.weight": w["norm.weight"], "lm_head.weight": w["lm_head.weight"],
             p + "self_attn.query_key_value.weight": torch.cat([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
             p + "self_attn.dense.weight": w[p + "self_attn.o_proj.weight"]}
    for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        state[p + f"{name}.weight"] = w[p + f"{name}.weight"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        state[p + f"mlp.{name}.weight"] = w[p + f"mlp.{name}.weight"]
    if dc.own_embedding:
        state["embed_tokens.weight"] = w["embed_tokens.weight"]
    if dc.draft_vocab_size:
        if "d2t" not in w:
            raise ValueError(f"{where}: draft_vocab_size {Nd} < vocab_size {V} but no d2t tensor")
        state["vocab_map"] = torch.arange(Nd) + w["d2t"].long()
    try:
        draft.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:  # shapes that contradict the config
        raise ValueError(f"{where}: weights do not match its config.json: {e}") from None
    return draft.eval()


def load_draft(path: str | Path, target_config: ModelConfig, dtype=torch.float32, device="cpu") -> DraftModel:
    """An EAGLE-3 draft directory for this target: ours (`DraftModel.save`), or a LlamaForCausalLMEagle3 one
    (imported)."""
    if is_draft_dir(path):
        draft = DraftModel.load(path, dtype=dtype, device=device)
    else:
        draft = import_llama_eagle3(path, target_config).to(device=device, dtype=dtype)
    draft.draft_config.check_target(target_config, str(path))
    return draft


def is_draft_dir(path: str | Path) -> bool:
    """True when `path` holds an angelmed EAGLE-3 draft (by its config's architectures)."""
    f = Path(path) / "config.json"
    try:
        return DRAFT_ARCH in json.loads(f.read_text()).get("architectures", [])
    except (OSError, ValueError, AttributeError):
        return False


def draft_summary(path: str | Path) -> dict | None:
    """What `angelmed info` shows for an EAGLE-3 draft directory, ours or LlamaForCausalLMEagle3; None for anything
    else. Feature layers are target layer outputs. Parameters are counted from the weights file's header, when the
    directory has one (a Hub draft read config-only has not)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        c = json.loads((path / "config.json").read_text())
        arch = c.get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    if DRAFT_ARCH in arch:
        dc = read_draft_config(path)
        layer, t = dc.target_config(), dc.target
        s = {"kind": f"EAGLE-3 draft, {dc.layout} layout", "hidden": dc.hidden_size,
             "intermediate": layer.intermediate_size, "feature_layers": list(dc.feature_layers),
             "heads": f"{layer.num_attention_heads}q/{layer.num_key_value_heads}kv x {layer.head_dim}",
             "vocab": dc.vocab_size, "draft_vocab": dc.draft_vocab_size or dc.vocab_size,
             "target": f"{t['num_hidden_layers']} layers, hidden {t['hidden_size']}, vocab {t['vocab_size']}"}
    elif LLAMA_EAGLE3_ARCH in arch:
        layers = _llama_eagle3_feature_layers(c)
        H, nh = c.get("hidden_size"), c.get("num_attention_heads", 1)
        s = {"kind": "EAGLE-3 draft, LlamaForCausalLMEagle3 (vLLM / SGLang)", "hidden": H,
             "intermediate": c.get("intermediate_size"),
             "feature_layers": list(layers) if layers else "the serving engine's default",
             "heads": f"{nh}q/{c.get('num_key_value_heads', nh)}kv x {c.get('head_dim', (H or 0) // nh)}",
             "vocab": c.get("vocab_size"), "draft_vocab": c.get("draft_vocab_size") or c.get("vocab_size"),
             "target": f"hidden {c.get('target_hidden_size', H)}, vocab {c.get('vocab_size')}"}
    else:
        return None
    weights = path / "model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:  # header only: the shapes
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        s["params_total"] = sum(math.prod(v) for k, v in shapes.items() if k not in ("vocab_map", "d2t", "t2d"))
    return s


def read_draft_config(path: str | Path) -> DraftConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no draft config.json at {path}")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    if DRAFT_ARCH not in d.get("architectures", []):
        raise ValueError(f"{cfg_file}: not an angelmed draft model (architectures {d.get('architectures')}, "
                         f"expected [{DRAFT_ARCH!r}])")
    d.pop("architectures")
    d.pop("model_type", None)
    known = set(DraftConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cfg_file}: unknown draft config key(s) {unknown}")
    missing = sorted(k for k in ("hidden_size", "vocab_size", "feature_layers", "target") if k not in d)
    if missing:
        raise ValueError(f"{cfg_file}: missing draft config key(s) {missing}")
    if d.get("layout", "angelmed") not in LAYOUTS:
        raise ValueError(f"{cfg_file}: layout: expected one of {list(LAYOUTS)}, got {d['layout']!r}")
    d["feature_layers"] = tuple(d["feature_layers"])
    return DraftConfig(**d)


# ---- training ----------------------------------------------------------------------------------------------
class MTPHead(nn.Module):
    """The target's own MTP layer `depth` seen as a draft, for the same training-time-test training: it takes the
    target's final hidden state (instead of fused layer features) and the embedding of the next token, and scores
    with the full frozen lm_head. Trained against the frozen target on multi-step rollouts, the MTP layer becomes a
    chain drafter (`infer.speculative.MTPDrafter`: `--draft mtp`); CPT teaches it one step, with teacher forcing.
    Saved as the target's checkpoint with only this layer's tensors replaced (`checkpoint.write_with_tensors`), so
    it stays the official layout."""

    feature_layers: tuple[int, ...] = ()

    def __init__(self, target: Transformer, source: str | Path, depth: int = 0, vocab_map: Tensor | None = None):
        """vocab_map: the draft vocabulary (sorted target ids) to train and serve the head with, saved beside the
        checkpoint as `mtp_draft_vocab.json`; None: the full vocabulary."""
        super().__init__()
        if target.config.num_nextn_predict_layers <= depth:
            raise ValueError(f"{source}: the target has {target.config.num_nextn_predict_layers} MTP layer(s); "
                             f"MTP depth {depth} needs at least {depth + 1}")
        self.layer = target.model.layers[target.num_layers + depth]
        self.prefix = f"model.layers.{target.num_layers + depth}."
        self.source = Path(source)
        self._target = [target]  # not a submodule: only the MTP layer is this module's
        self.vocab_map = None
        if vocab_map is not None:
            self.set_vocab(vocab_map)

    def set_vocab(self, target_ids: Tensor | list[int]) -> None:
        device = self._target[0].model.word_embeddings.weight.device
        self.vocab_map = torch.as_tensor(target_ids, dtype=torch.long, device=device).unique(sorted=True)

    def fuse(self, feats: list[Tensor]) -> Tensor:
        return feats[0]

    def rope(self, pos_BT: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        t = self._target[0]
        return rope_cos_sin(t.inv_freq, t.rope_scaling, pos_BT, dtype)

    def forward(self, emb_BTD: Tensor, g_BTD: Tensor, rope, mask, pos_BT=None, cache=None) -> Tensor:
        return self.layer(emb_BTD, g_BTD, rope, mask, pos_BT, cache)[0]

    def head_input(self, o_BTD: Tensor) -> Tensor:
        return o_BTD

    def embed(self, ids_BT: Tensor, target: Transformer) -> Tensor:
        with torch.no_grad():
            return target.model.word_embeddings(ids_BT)

    def head_weight(self, target: Transformer) -> Tensor:
        w = target.head_weight.detach()
        return w if self.vocab_map is None else w[self.vocab_map]

    def save(self, path: str | Path, extra_files: dict[str, str | bytes] | None = None) -> None:
        from angelmed.checkpoint import hf_state_dict, write_with_tensors

        new = hf_state_dict(self.layer, prefix=self.prefix)  # this layer only: the rest of a target may be FP8
        extra = dict(extra_files or {})
        if self.vocab_map is not None:
            extra[MTP_DRAFT_VOCAB] = json.dumps({"ids": self.vocab_map.tolist()}) + "\n"
        write_with_tensors(self.source, path, new, extra, omit=(MTP_DRAFT_VOCAB,))  # never the source's


def read_mtp_draft_vocab(path: str | Path) -> Tensor | None:
    """The MTP drafter's vocabulary saved beside checkpoint `path` (`mtp_draft_vocab.json`), or None."""
    f = Path(path) / MTP_DRAFT_VOCAB
    if not f.is_file():
        return None
    try:
        ids = json.loads(f.read_text())["ids"]
        if not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError("expected a non-empty list of token ids")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not an MTP draft vocabulary {{\"ids\": [token ids]}} ({e})") from None
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


@torch.no_grad()
def target_features(target: Transformer, ids_BT: Tensor, layers: tuple[int, ...], pos_BT=None,
                    segment_BT=None) -> tuple[list[Tensor], Tensor]:
    """Hidden outputs of the chosen target layers (no layers: the final hidden state, what an MTP layer takes) and
    the target's logits (frozen teacher)."""
    out = target(ids_BT, pos_BT=pos_BT, segment_BT=segment_BT, keep_layers=tuple(layers))
    return (out.layer_hidden if layers else [out.hidden]), out.logits


class _StackedKV:
    """Training-time-test 'cache': keeps every step's keys/values and returns them all, in step order."""

    def __init__(self):
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def update(self, pos_BT: Tensor, k_BKTd: Tensor, v_BKTd: Tensor) -> tuple[Tensor, Tensor]:
        self.k.append(k_BKTd)
        self.v.append(v_BKTd)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


def _shift_left(x: Tensor, j: int, fill) -> Tensor:
    """x[:, t + j] at column t (the last j columns filled)."""
    pad = torch.full_like(x[:, :j], fill)
    return torch.cat([x[:, j:], pad], dim=1)


def unrolled_step_logits(draft: DraftModel, target: Transformer, ids_BT: Tensor, feats: list[Tensor], steps: int,
                         pos_BT: Tensor | None = None, segment_BT: Tensor | None = None,
                         ttt_attention: bool = True) -> list[Tensor]:
    """Draft logits (fp32, over the draft vocabulary) of steps 1..steps for every base position t: entry j-1 is
    [B, T, Vd], the prediction of x_{t+j+1}. Columns with t + j >= T are filler (callers mask them)."""
    B, T = ids_BT.shape
    dev = ids_BT.device
    if pos_BT is None:
        pos_BT = torch.arange(T, device=dev).expand(B, T)
    seg = torch.ones_like(ids_BT) if segment_BT is None else segment_BT
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    first_block = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # [B,1,T,T]
    diag = torch.eye(T, dtype=torch.bool, device=dev).expand(B, 1, T, T)
    head = draft.head_weight(target)
    g = draft.fuse(feats)
    cache = _StackedKV() if ttt_attention else None
    out = []
    for j in range(1, steps + 1):
        e = draft.embed(_shift_left(ids_BT, j, 0), target)
        if ttt_attention:
            pos_j = pos_BT + (j - 1)  # where step j of base t runs at inference
            mask = torch.cat([first_block] + [diag] * (j - 1), dim=-1)
            o = draft(e, g, draft.rope(pos_j, g.dtype), mask, pos_j, cache)
        else:
            o = draft(e, g, draft.rope(pos_BT, g.dtype), first_block if segment_BT is not None else None)
        out.append(F.linear(draft.head_input(o), head).float())
        g = o  # the next step sees the draft's own features
    return out


def draft_loss_from_features(draft: DraftModel, target: Transformer, ids_BT: Tensor, feats: list[Tensor],
                             t_logits: Tensor, steps: int = 3, labels_BT: Tensor | None = None,
                             pos_BT: Tensor | None = None, segment_BT: Tensor | None = None,
                             ttt_attention: bool = True, step_weight: float = 1.0) -> tuple[Tensor, list[float]]:
    """Training-time-test loss. Step j at base t predicts x_{t+j+1}; its soft label is the frozen target's
    distribution at position t+j (restricted to the draft vocabulary and renormalised): forward KL.

    labels_BT (packed-batch convention, -100 = no loss): labels[i] != -100 when token i+1 is to be predicted;
    step j at base t counts when labels[t+j] != -100 and t+j lies in t's packed segment. step_weight w: step j is
    weighted w^(j-1). Returns the loss and per-step top-1 agreement with the target's greedy token.
    """
    B, T = ids_BT.shape
    logits = unrolled_step_logits(draft, target, ids_BT, feats, steps, pos_BT, segment_BT, ttt_attention)
    t_logits = t_logits.detach()
    t_top = t_logits.argmax(-1)
    if draft.vocab_map is not None:
        t_logits = t_logits[..., draft.vocab_map]
    t_logp = t_logits.log_softmax(-1)
    seg = torch.ones_like(ids_BT) if segment_BT is None else segment_BT
    want = torch.ones_like(ids_BT, dtype=torch.bool) if labels_BT is None else labels_BT != IGNORE_INDEX
    total, norm, agree = 0.0, 0.0, []
    for j, logq in enumerate(logits, start=1):
        if j >= T:
            break
        valid = torch.zeros_like(want)
        valid[:, :T - j] = want[:, j:] & (seg[:, j:] == seg[:, :T - j])
        m = valid.float()
        teacher = _shift_left(t_logp, j, 0.0)
        logq = logq.log_softmax(-1)
        kl = (teacher.exp() * (teacher - logq)).sum(-1)
        w = step_weight ** (j - 1)
        total = total + w * (kl * m).sum() / m.sum().clamp(min=1)
        norm += w
        pred = logq.argmax(-1) if draft.vocab_map is None else draft.vocab_map[logq.argmax(-1)]
        hit = (pred == _shift_left(t_top, j, -1)).float()
        agree.append(float((hit * m).sum() / m.sum().clamp(min=1)))
    return total / max(norm, 1e-9), agree


def draft_loss(draft: DraftModel, target: Transformer, ids_BT: Tensor, steps: int = 3,
               loss_mask_BT: Tensor | None = None, ttt_attention: bool = True) -> tuple[Tensor, list[float]]:
    """Unrolled multi-step loss on plain (unpacked) rows. loss_mask_BT[b, i]: token i is to be predicted."""
    feats, t_logits = target_features(target, ids_BT, draft.feature_layers)
    labels = None
    if loss_mask_BT is not None:
        labels = torch.where(_shift_left(loss_mask_BT.bool(), 1, False), 0, IGNORE_INDEX)
    return draft_loss_from_features(draft, target, ids_BT, feats, t_logits, steps, labels,
                                    ttt_attention=ttt_attention)

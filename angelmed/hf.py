"""angelmed models as Hugging Face transformers models (`model_type` "bailing_moe").

`BailingMoeV2Config` is a `PretrainedConfig` whose keys and defaults are those of `angelmed.config.ModelConfig`;
`BailingMoeV2ForCausalLM` is a `PreTrainedModel` + `GenerationMixin` built from the modules of `angelmed.model`
(the same network, not a copy): loss from `labels` (main CE + the same-row MTP loss of training.md §3), HF caches for
`generate`, padding masks, gradient checkpointing, and checkpoints in the official per-expert layout.

Importing this module registers the classes with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(dir)` needs no `trust_remote_code`. The remote-code files written by
`angelmed.hf_remote` are generated from this file, config.py, model.py and checkpoint.py.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from angelmed.checkpoint import CheckpointError, _checkpoint_names, _weight_files, load_state
from angelmed.config import _REQUIRED, AUTO_MAP, MODEL_TYPE, ModelConfig
from angelmed.model import DecoderLayer, Experts, MTPLayer, Transformer, rope_parameters

logger = logging.getLogger(__name__)

# ModelConfig keys that PretrainedConfig itself owns (it stores and serialises them).
_HF_OWNED_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
_STACKED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def _model_config_keys() -> list[str]:
    return [f.name for f in fields(ModelConfig) if f.name != "extra"]


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


class BailingMoeV2Config(PretrainedConfig):
    """config.json of a BailingMoeV2 model. Every model key and default is `ModelConfig`'s (one source of truth).

    Block-FP8 `quantization_config` is dropped: the weights are dequantised when loaded, and a re-saved model is
    not FP8. `to_dict` applies ModelConfig's export rules (the keys vLLM and SGLang read).
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs):
        model_kwargs = {k: kwargs.pop(k) for k in _model_config_keys() if k in kwargs}
        torch_dtype = model_kwargs.pop("torch_dtype", None)
        quant = model_kwargs.pop("quantization_config", None)
        if quant is not None and not (isinstance(quant, dict) and quant.get("quant_method") == "fp8"):
            kwargs["quantization_config"] = quant  # not ours: transformers' quantizer logic will see (and refuse) it
        if all(k in model_kwargs for k in _REQUIRED):  # a real config.json: checks, coercion, missing-key warnings
            cfg = ModelConfig.from_dict(model_kwargs, source="BailingMoeV2Config")
        else:  # programmatic construction, e.g. BailingMoeV2Config(): reference defaults
            cfg = ModelConfig(**model_kwargs)
        values = {k: getattr(cfg, k) for k in _model_config_keys() if k not in ("torch_dtype", "quantization_config")}
        for key in _HF_OWNED_KEYS:
            kwargs[key] = values.pop(key)
        if torch_dtype is not None and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch_dtype
        super().__init__(**kwargs)
        for key, value in values.items():
            setattr(self, key, value)

    def to_model_config(self) -> ModelConfig:
        skip = ("torch_dtype", "quantization_config")  # PretrainedConfig: `dtype`; FP8 is dequantised at load
        values = {k: getattr(self, k) for k in _model_config_keys() if k not in skip and hasattr(self, k)}
        values["torch_dtype"] = _dtype_name(getattr(self, "dtype", None)) or "bfloat16"
        values["quantization_config"] = None
        return ModelConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        exported = self.to_model_config().to_dict()
        exported.pop("architectures", None)  # transformers sets it from the saved class
        d.update(exported)
        d["auto_map"] = dict(AUTO_MAP)
        for key in ("norm_head", "rotary_dim"):  # engines would misread these (config.py export rules)
            d.pop(key, None)
        return d


# ---- modules ----------------------------------------------------------------------------------------
class _GradientCheckpointed:
    """Mixin for a decoder layer: recompute its forward in backward when transformers enables checkpointing."""

    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(super().__call__, *args, **kwargs)
        return super().__call__(*args, **kwargs)


class BailingMoeV2DecoderLayer(_GradientCheckpointed, DecoderLayer):
    pass


class BailingMoeV2MTPLayer(_GradientCheckpointed, MTPLayer):
    pass


_CHECKPOINTED_CLASS = {DecoderLayer: BailingMoeV2DecoderLayer, MTPLayer: BailingMoeV2MTPLayer}


class _MaskedTransformer(Transformer):
    """angelmed's Transformer whose attention mask can be given for one call (HF padding masks and caches)."""

    def causal_mask(self, pos_BT, segment_BT, S):
        override = self.__dict__.get("mask_override")
        return override if override is not None else super().causal_mask(pos_BT, segment_BT, S)


class _HFCacheLayer:
    """One layer of a transformers `Cache` behind the interface angelmed's attention uses (`update(pos, k, v)`)."""

    def __init__(self, cache: Cache, layer_idx: int, cache_position: Tensor, total_len: int):
        self.cache, self.layer_idx = cache, layer_idx
        self.cache_kwargs = {"cache_position": cache_position}
        # Transformer.forward reads caches[0].k.shape[2] (slots); the mask itself is supplied by the HF model.
        self.k = torch.empty(0, 0, total_len, 0, device="meta")

    def update(self, pos_BT: Tensor, k_BKTd: Tensor, v_BKTd: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k_BKTd, v_BKTd, self.layer_idx, self.cache_kwargs)


def _stack_expert_tensors(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook on Experts: accept the official per-expert names (`experts.{e}.gate_proj.weight`)."""
    E = module.gate_proj.shape[0]
    for name in ("gate_proj", "up_proj", "down_proj"):
        keys = [f"{prefix}{e}.{name}.weight" for e in range(E)]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(k) for k in keys])


def unstack_experts(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stacked expert params ([E, ...] under `mlp.experts.gate_proj`) -> official per-expert names."""
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        m = _STACKED_EXPERT_RE.match(name)
        if m and isinstance(t, Tensor) and t.dim() == 3:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
        else:
            out[name] = t
    return out


def segments_from_positions(position_ids: Tensor | None) -> Tensor | None:
    """Packed rows (padding-free batches restart position_ids at 0 per document) -> document ids, else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    if not bool((position_ids[:, 1:] == 0).any()):
        return None
    return (position_ids == 0).cumsum(-1)


def mtp_cross_entropy(logits_BTV: Tensor, labels_BT: Tensor, depth: int, segment_BT: Tensor | None = None,
                      num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100) -> Tensor:
    """Loss of MTP depth `depth` (1-based): position t predicts labels[t + depth + 1] of the SAME row.

    Positions whose target lies past the end of the row, ignored labels, and (packed rows) targets in another
    document are excluded. Mean over the counted targets, or sum / num_items_in_batch when given (transformers'
    gradient-accumulation convention, as for the main loss).
    """
    shift = depth + 1
    B, T, V = logits_BTV.shape
    if T <= shift:
        return logits_BTV.sum() * 0.0
    target_BT = labels_BT[:, shift:].to(logits_BTV.device)
    if segment_BT is not None:
        crosses = segment_BT[:, shift:] != segment_BT[:, :-shift]
        target_BT = target_BT.masked_fill(crosses.to(target_BT.device), ignore_index)
    pred = logits_BTV[:, : T - shift].float().reshape(-1, V)
    total = F.cross_entropy(pred, target_BT.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (target_BT != ignore_index).sum().clamp(min=1)


@dataclass
class BailingMoeV2ModelOutput(BaseModelOutputWithPast):
    router_logits: tuple[Tensor, ...] | None = None
    mtp_hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class BailingMoeV2CausalLMOutput(CausalLMOutputWithPast):
    lm_loss: Tensor | None = None
    mtp_losses: tuple[Tensor, ...] | None = None
    mtp_logits: tuple[Tensor, ...] | None = None
    router_logits: tuple[Tensor, ...] | None = None


class BailingMoeV2PreTrainedModel(PreTrainedModel):
    config_class = BailingMoeV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BailingMoeV2DecoderLayer", "BailingMoeV2MTPLayer"]
    # The router ("gate": weight + fp32 expert_bias) is never cast down or quantised. Router math is fp32 anyway,
    # and Router keeps expert_bias fp32 through any .to(dtype).
    _keep_in_fp32_modules = ["gate"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _set_keep_in_fp32(self, config: BailingMoeV2Config) -> None:
        # transformers checks that every listed name exists; a model without MoE layers has no "gate".
        if not config.to_model_config().moe_layer_ids:
            self._keep_in_fp32_modules = None

    def _init_weights(self, module: nn.Module) -> None:
        # One initialisation for the whole network: angelmed's Transformer.init_weights (norms 1, biases 0,
        # weights N(0, initializer_range), expert_bias 0, rope recomputed).
        if isinstance(module, BailingMoeV2Model):
            module._net.init_weights()
        elif isinstance(module, BailingMoeV2ForCausalLM) and module.lm_head is not None:
            module.lm_head.weight.data.normal_(0.0, self.config.initializer_range)

    def _fix_state_dict_keys_on_save(self, state_dict: dict) -> dict:
        return unstack_experts(super()._fix_state_dict_keys_on_save(state_dict))

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, checkpoint_files, pretrained_model_name_or_path, **kwargs):
        """Fill the (meta-device) model from the checkpoint with angelmed.checkpoint: per-expert tensors are
        stacked, block-FP8 tensors dequantised, names and shapes checked (a mismatch is an error, not a warning)."""
        if kwargs.get("hf_quantizer") is not None:
            raise ValueError(f"{cls.__name__}: transformers quantization (quantization_config) is not supported; "
                             "block-FP8 checkpoints are dequantised at load, other schemes via `angelmed convert`")
        if kwargs.get("device_mesh") is not None:
            raise ValueError(f"{cls.__name__}: tensor parallel loading (tp_plan/device_mesh) is not supported")
        device_map = kwargs.get("device_map") or {}
        if "disk" in device_map.values():
            raise ValueError(f"{cls.__name__}: disk offload in device_map is not supported")
        devices = set(device_map.values())
        # One device: load straight onto it. Several: load on CPU; transformers then dispatches per device_map.
        model.to_empty(device=devices.pop() if len(devices) == 1 else "cpu")
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        else:
            _fill_from_checkpoint(model, Path(checkpoint_files[0]).parent)
        regex = kwargs.get("keep_in_fp32_regex")
        if regex is not None:
            for name, param in model.named_parameters():
                if regex.search(name):
                    param.data = param.data.float()
        return model, [], [], [], None, []

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """transformers' save_pretrained (official per-expert tensor names), plus the remote-code files that the
        config's auto_map names, so `trust_remote_code=True` loads the directory without angelmed."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process and self._auto_class is None:  # remote-code classes: transformers copies the files
            try:
                importlib.import_module("angelmed.hf_remote").write_remote_code(save_directory)
            except ImportError:
                logger.warning("angelmed is not installed: %s has no remote-code files; load it with angelmed",
                               save_directory)


def _fill_from_checkpoint(model: nn.Module, path: Path) -> None:
    if isinstance(model, BailingMoeV2ForCausalLM):
        load_state(model, path)
        return
    # A base model reads a causal-LM checkpoint ("model." names; lm_head ignored) or a saved base model.
    names = set(_weight_files(path))
    if not any(n.startswith("model.") for n in names):
        load_state(model, path)
        return
    holder = nn.Module()
    holder.model = model
    missing = sorted(_checkpoint_names(holder) - names)
    if missing:
        raise CheckpointError(f"{path}: missing tensors ({len(missing)}): {missing[:8]}")
    load_state(holder, path, strict=False)


class BailingMoeV2Model(BailingMoeV2PreTrainedModel):
    """The decoder (embeddings, layers incl. MTP, final norm). Modules are angelmed.model's; forward is
    angelmed's `Transformer.forward`, run on a Transformer that shares this module's children and buffers."""

    def __init__(self, config: BailingMoeV2Config):
        super().__init__(config)
        model_cfg = config.to_model_config()
        net = _MaskedTransformer(model_cfg.replace(tie_word_embeddings=True))  # the network, minus lm_head
        self.word_embeddings = net.model.word_embeddings
        self.layers = net.model.layers
        self.norm = net.model.norm
        self.register_buffer("inv_freq", net.inv_freq, persistent=False)
        for layer in self.layers:
            layer.__class__ = _CHECKPOINTED_CLASS[type(layer)]  # same module, checkpointable __call__
        for module in self.modules():
            if isinstance(module, Experts):
                module.register_load_state_dict_pre_hook(_stack_expert_tensors)
        # From here on `net` owns nothing: its `model` is this module and its buffers are ours, so device moves,
        # PEFT module swaps and resized embeddings are seen by both.
        net.config = model_cfg
        net.__dict__["_modules"] = {"model": self, "lm_head": None}
        net.__dict__["_parameters"] = {}
        net.__dict__["_buffers"] = self._buffers
        net.__dict__["_non_persistent_buffers_set"] = self._non_persistent_buffers_set
        self.__dict__["_net"] = net
        self._set_keep_in_fp32(config)
        self.post_init()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # inv_freq stays fp32 whatever dtype the model is cast to (as the reference's rotary buffer is built).
        self.inv_freq = rope_parameters(self._net.config)[0].to(self.inv_freq.device)
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                cache_position: Tensor | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, output_attentions: bool | None = None,
                return_mtp_hidden: bool = False, **kwargs) -> BailingMoeV2ModelOutput:
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__}: inputs_embeds is not supported (MTP layers need token ids); "
                             "pass input_ids")
        if input_ids is None:
            raise ValueError(f"{type(self).__name__}: input_ids is required")
        if output_attentions:
            raise ValueError(f"{type(self).__name__}: output_attentions is not supported (SDPA attention)")
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__}")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if return_mtp_hidden or (self.training and self.is_gradient_checkpointing):
            use_cache = False
        if return_mtp_hidden and past_key_values is not None:
            raise ValueError("MTP outputs need a cache-free forward (past_key_values=None)")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None

        B, T = input_ids.shape
        dev = input_ids.device
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=dev)
        total = past + T
        if past_key_values is not None and past_key_values.is_compileable:
            total = past_key_values.get_max_cache_shape()

        keys_valid_BS = None
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        elif attention_mask is not None and not bool(attention_mask.all()):
            keys_valid_BS = attention_mask.bool()
        if position_ids is None:
            if keys_valid_BS is not None:
                pos_full = (keys_valid_BS.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos_full[:, cache_position.clamp(max=pos_full.shape[1] - 1)]
            else:
                position_ids = cache_position[None].expand(B, T)
        segment_BT = None
        if mask is None and past_key_values is None and keys_valid_BS is None:
            segment_BT = segments_from_positions(position_ids)  # packed rows: attention stays in each document
        elif mask is None and (keys_valid_BS is not None or past > 0 or total != T):
            mask = _slot_mask(cache_position, total, keys_valid_BS, B)

        caches = None
        if past_key_values is not None:
            caches = [_HFCacheLayer(past_key_values, i, cache_position, total)
                      for i in range(self.config.num_hidden_layers)]

        captured: list[Tensor] = []
        hooks = []
        if output_hidden_states:
            hooks.append(self.word_embeddings.register_forward_hook(lambda m, i, o: captured.append(o)))
            for layer in self.layers[: self.config.num_hidden_layers]:
                hooks.append(layer.register_forward_hook(lambda m, i, o: captured.append(o[0])))
        net = self._net
        net.__dict__["mask_override"] = mask
        try:
            out = net(input_ids, pos_BT=position_ids, segment_BT=segment_BT, caches=caches, mtp=return_mtp_hidden,
                      compute_logits=False)
        finally:
            net.__dict__["mask_override"] = None
            for h in hooks:
                h.remove()
        hidden_states = tuple(captured[: self.config.num_hidden_layers]) + (out.hidden,) if hooks else None
        router_logits = tuple(r.logits_TE for r in out.router) if output_router_logits else None
        return BailingMoeV2ModelOutput(
            last_hidden_state=out.hidden, past_key_values=past_key_values, hidden_states=hidden_states,
            router_logits=router_logits, mtp_hidden_states=tuple(out.mtp_hidden) if return_mtp_hidden else None)


def _slot_mask(cache_position: Tensor, total: int, keys_valid_BS: Tensor | None, B: int) -> Tensor:
    """[B,1,T,S] bool: query t (at cache slot cache_position[t]) sees slots <= its own that are not padding.
    Every query also sees its own slot, so a padding row never has an empty softmax."""
    slots_S = torch.arange(total, device=cache_position.device)
    own_TS = slots_S[None, :] == cache_position[:, None]
    allowed = (slots_S[None, :] <= cache_position[:, None])[None].expand(B, -1, -1)
    if keys_valid_BS is not None:
        valid = torch.zeros(B, total, dtype=torch.bool, device=cache_position.device)
        n = min(total, keys_valid_BS.shape[1])
        valid[:, :n] = keys_valid_BS[:, :n]
        allowed = allowed & valid[:, None, :]
    return (allowed | own_TS[None])[:, None]


class BailingMoeV2ForCausalLM(BailingMoeV2PreTrainedModel, GenerationMixin):
    """Causal LM with the official names (`model.layers.*`, `lm_head`).

    `labels` (unshifted, -100 = ignore) give loss = CE_main + mtp_loss_scaling_factor / D * sum_k CE_mtp_k, with
    MTP-k at position t trained on labels[t+k+1] of the same row (training.md §3); `lm_loss` and `mtp_losses`
    are returned too. `output_mtp_logits=True` returns the per-depth MTP logits.
    """

    def __init__(self, config: BailingMoeV2Config):
        super().__init__(config)
        self.model = BailingMoeV2Model(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self._set_keep_in_fp32(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> BailingMoeV2Model:
        return self.model

    def set_decoder(self, decoder: BailingMoeV2Model) -> None:
        self.model = decoder

    def _logits(self, h_BTD: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(h_BTD, self.model.word_embeddings.weight).float()
        return self.lm_head(h_BTD).float()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                cache_position: Tensor | None = None, logits_to_keep: int | Tensor = 0,
                output_hidden_states: bool | None = None, output_router_logits: bool | None = None,
                output_attentions: bool | None = None, output_mtp_logits: bool = False,
                **kwargs) -> BailingMoeV2CausalLMOutput:
        cfg = self.config
        depth = cfg.num_nextn_predict_layers
        mtp_loss_on = (labels is not None and depth > 0 and cfg.mtp_loss_scaling_factor > 0
                       and past_key_values is None)
        run_mtp = mtp_loss_on or output_mtp_logits
        if run_mtp and depth == 0:
            raise ValueError("output_mtp_logits=True, but the model has no MTP layer (num_nextn_predict_layers=0)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=False if run_mtp else use_cache, cache_position=cache_position,
                         output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                         output_attentions=output_attentions, return_mtp_hidden=run_mtp)
        h = out.last_hidden_state
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif labels is None and isinstance(logits_to_keep, Tensor):
            h = h[:, logits_to_keep]
        logits = self._logits(h)
        mtp_logits = tuple(self._logits(hk) for hk in out.mtp_hidden_states) if run_mtp else None

        loss = lm_loss = mtp_losses = None
        if labels is not None:
            n_items = kwargs.get("num_items_in_batch")
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size,
                                         num_items_in_batch=n_items)
            loss = lm_loss
            if mtp_loss_on:
                segment_BT = segments_from_positions(position_ids) if attention_mask is None else None
                mtp_losses = tuple(mtp_cross_entropy(lg, labels, k + 1, segment_BT, n_items)
                                   for k, lg in enumerate(mtp_logits))
                loss = lm_loss + cfg.mtp_loss_scaling_factor / depth * sum(mtp_losses)
        return BailingMoeV2CausalLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            lm_loss=lm_loss, mtp_losses=mtp_losses, mtp_logits=mtp_logits if output_mtp_logits else None,
            router_logits=out.router_logits)


def register_auto_classes() -> None:
    """Make `bailing_moe` configs and checkpoints load through AutoConfig / AutoModel / AutoModelForCausalLM."""
    AutoConfig.register(MODEL_TYPE, BailingMoeV2Config, exist_ok=True)
    AutoModel.register(BailingMoeV2Config, BailingMoeV2Model, exist_ok=True)
    AutoModelForCausalLM.register(BailingMoeV2Config, BailingMoeV2ForCausalLM, exist_ok=True)


if __name__ == "angelmed.hf":  # not when this code runs as transformers remote code
    register_auto_classes()

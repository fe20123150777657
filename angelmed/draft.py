"""EAGLE-3-style draft model: one decoder layer fed the target's low/middle/high hidden states.

    g_t   = fc(cat[h_low_t, h_mid_t, h_high_t])                  fused target features at position t
    u_t   = eh_proj(cat[enorm(E[x_{t+1}]), hnorm(g_t)])           with the target's (frozen) embedding
    o_t   = final_norm(block(u_t))                                one dense decoder layer
    p_t   = softmax(lm_head(o_t))                                 target's (frozen) lm_head: predicts x_{t+2}

Chained drafting feeds o_t back in place of g: step j at position t sees o^{(j-1)}_t and x_{t+j}, as an
MTP layer's recursion does. Training runs these steps unrolled ("training-time test"), so the draft
learns from its own features, not only from the target's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from angelmed.config import ModelConfig
from angelmed.model import DecoderLayer, RMSNorm, Transformer, rope_cos_sin

DRAFT_ARCH = "AngelmedEagle3Draft"


@dataclass
class DraftConfig:
    hidden_size: int
    vocab_size: int
    feature_layers: tuple[int, int, int]  # target layers whose outputs are fused (low, middle, high)
    target: dict  # the target's ModelConfig (shapes of the draft's decoder layer come from it)
    intermediate_size: int | None = None  # dense MLP width of the draft layer (default: target's)

    @classmethod
    def for_target(cls, cfg: ModelConfig) -> "DraftConfig":
        L = cfg.num_hidden_layers
        layers = (min(1, L - 1), L // 2, L - 1)
        return cls(cfg.hidden_size, cfg.vocab_size, layers, cfg.to_dict(), cfg.intermediate_size)

    def target_config(self) -> ModelConfig:
        d = dict(self.target)
        d.update(first_k_dense_replace=1, num_hidden_layers=1, num_nextn_predict_layers=0,
                 intermediate_size=self.intermediate_size or d["intermediate_size"], quantization_config=None)
        return ModelConfig.from_dict(d, source="draft config")


class DraftModel(nn.Module):
    def __init__(self, dc: DraftConfig):
        super().__init__()
        self.draft_config = dc
        cfg = dc.target_config()
        H = dc.hidden_size
        self.fc = nn.Linear(3 * H, H, bias=False)
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.layer = DecoderLayer(cfg, moe=False)
        self.final_norm = RMSNorm(H, cfg.rms_norm_eps)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DraftModel":
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def fuse(self, feats: list[Tensor]) -> Tensor:
        return self.fc(torch.cat(feats, dim=-1))

    def forward(self, emb_BTD: Tensor, g_BTD: Tensor, rope, mask, pos_BT=None, cache=None) -> Tensor:
        u = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(g_BTD)], dim=-1))
        u, _ = self.layer(u, rope, mask, pos_BT, cache)
        return self.final_norm(u)

    # ---- persistence: an HF-style directory with its own config ------------------------------
    def save(self, path: str | Path) -> None:
        from angelmed.checkpoint import atomic_dir, atomic_write_text
        from safetensors.torch import save_file

        with atomic_dir(path) as tmp:
            d = asdict(self.draft_config)
            d.update(architectures=[DRAFT_ARCH], model_type="angelmed_eagle3_draft")
            atomic_write_text(tmp / "config.json", json.dumps(d, indent=2) + "\n")
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: str | Path, dtype=torch.float32) -> "DraftModel":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no draft config.json at {path}")
        d = json.loads(cfg_file.read_text())
        if DRAFT_ARCH not in d.get("architectures", []):
            raise ValueError(f"{cfg_file}: not an angelmed draft model (architectures {d.get('architectures')})")
        for k in ("architectures", "model_type"):
            d.pop(k)
        d["feature_layers"] = tuple(d["feature_layers"])
        model = cls(DraftConfig(**d))
        missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: draft weights do not match its config: missing {missing}, unexpected {unexpected}")
        return model.to(dtype).eval()


@torch.no_grad()
def target_features(target: Transformer, ids_BT: Tensor, layers: tuple[int, ...], pos_BT=None) -> tuple[list[Tensor], Tensor]:
    """Hidden outputs of the chosen target layers and the target's logits (frozen teacher)."""
    feats: dict[int, Tensor] = {}
    hooks = [target.model.layers[i].register_forward_hook(
        lambda m, inp, out, i=i: feats.__setitem__(i, out[0])) for i in layers]
    try:
        out = target(ids_BT, pos_BT=pos_BT)
    finally:
        for h in hooks:
            h.remove()
    return [feats[i] for i in layers], out.logits


def draft_loss(draft: DraftModel, target: Transformer, ids_BT: Tensor, steps: int = 3,
               loss_mask_BT: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """Unrolled multi-step training loss. Step j (1-based) at position t predicts x_{t+j+1}; its target is
    the frozen target model's distribution at position t+j (soft labels, forward KL). Returns the mean
    loss and per-step top-1 agreement with the target's greedy token (a proxy for acceptance)."""
    B, T = ids_BT.shape
    feats, t_logits = target_features(target, ids_BT, draft.draft_config.feature_layers)
    t_logp = t_logits.log_softmax(-1)
    pos = torch.arange(T, device=ids_BT.device).expand(B, T)
    rope = rope_cos_sin(target.inv_freq, target.rope_scaling, pos, feats[0].dtype)
    g = draft.fuse(feats)
    emb_all = target.model.word_embeddings(ids_BT).detach()
    total, acc = 0.0, []
    for j in range(1, steps + 1):
        n = T - j  # positions t with a next-token input x_{t+j}
        if n <= 0:
            break
        emb = emb_all[:, j:]
        o = draft(emb, g[:, :n], tuple(r[:, :n] for r in rope), None)
        logp = target.logits_from_hidden(o).log_softmax(-1)
        teacher = t_logp[:, j:].detach()  # target's prediction at t+j is the distribution of x_{t+j+1}
        kl = (teacher.exp() * (teacher - logp)).sum(-1)
        m = torch.ones_like(kl) if loss_mask_BT is None else loss_mask_BT[:, j:].float()
        total = total + (kl * m).sum() / m.sum().clamp(min=1)
        acc.append(((logp.argmax(-1) == teacher.argmax(-1)).float() * m).sum().item() / max(m.sum().item(), 1))
        g = o  # training-time test: the next step sees the draft's own features
    return total / max(len(acc), 1), acc

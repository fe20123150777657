"""`layout: llama` drafts and their export to the LlamaForCausalLMEagle3 directory SGLang/vLLM load: the exported
weights, run by an independent implementation of that layer (written here from vLLM's llama_eagle3.py semantics),
give our draft's logits for the catch-up step over a sequence and for a chained step."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from angelmed.draft import DraftConfig, DraftModel, export_llama_eagle3, import_llama_eagle3, target_features
from safetensors.torch import save_file
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.speculative import Eagle3Drafter
from angelmed.model import KVCache
from test_engine import greedy_ref, prompts, tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model(3)


def llama_draft(target, vocab: int | None = 100, seed: int = 4) -> DraftModel:
    dc = DraftConfig.for_target(target.config, draft_vocab_size=vocab, layout="llama")
    d = DraftModel(dc).init_weights(seed, std=0.1)
    for name, p in d.named_parameters():  # norms away from 1, so a misplaced norm shows
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    if vocab:
        d.set_vocab(torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(seed))[:vocab])
    return d.eval()


# ---- the reference: LlamaForCausalLMEagle3 from its exported files alone ----------------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x_HTd, pos_T, theta):
    d = x_HTd.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos_T[:, None].double() * inv
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x_HTd[..., :d // 2], x_HTd[..., d // 2:]
    return x_HTd * cos + torch.cat([-x2, x1], -1) * sin


class Reference:
    def __init__(self, path):
        self.c = json.loads((path / "config.json").read_text())
        self.w = load_file(str(path / "model.safetensors"))

    def embed(self, ids, target):
        e = self.w.get("embed_tokens.weight")
        return (target.model.word_embeddings.weight if e is None else e)[ids]

    def step(self, emb_TD, g_TD, pos_T, past):
        """One draft step over T new positions; past: (k, v, positions) of earlier steps. Returns the pre-norm
        state."""
        c, w, p = self.c, self.w, "midlayer."
        nq, nkv, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
        x = torch.cat([_rms(emb_TD, w[p + "input_layernorm.weight"], eps),
                       _rms(g_TD, w[p + "hidden_norm.weight"], eps)], -1)
        T = x.shape[0]
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(T, nq, hd).transpose(0, 1)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = _rope(q, pos_T, c["rope_theta"]), _rope(k, pos_T, c["rope_theta"])
        past.append((k, v, pos_T))
        K = torch.cat([e[0] for e in past], 1).repeat_interleave(nq // nkv, 0)
        Vv = torch.cat([e[1] for e in past], 1).repeat_interleave(nq // nkv, 0)
        kpos = torch.cat([e[2] for e in past])
        s = (q @ K.transpose(1, 2)) / math.sqrt(hd)
        s = s.masked_fill(kpos[None, None, :] > pos_T[None, :, None], float("-inf"))
        o = (s.softmax(-1) @ Vv).transpose(0, 1).reshape(T, nq * hd) @ w[p + "self_attn.o_proj.weight"].T
        r = g_TD + o
        h = _rms(r, w[p + "post_attention_layernorm.weight"], eps)
        mlp = (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T))
        return r + mlp @ w[p + "mlp.down_proj.weight"].T

    def logits(self, r_TD):
        """Over the target vocabulary (-inf outside the draft's), draft id i -> target id i + d2t[i]."""
        sub = _rms(r_TD, self.w["norm.weight"], self.c["rms_norm_eps"]) @ self.w["lm_head.weight"].T
        if "d2t" not in self.w:
            return sub
        full = torch.full((sub.shape[0], self.c["vocab_size"]), float("-inf"))
        full[:, torch.arange(sub.shape[1]) + self.w["d2t"]] = sub
        return full


def check_against_reference(draft: DraftModel, target, ref: Reference) -> None:
    """A catch-up step over a sequence, then one chained step: our drafter's logits over the target vocabulary equal
    the reference's from the exported files."""
    ids = torch.tensor([prompts(1, seed=5)[0] + prompts(1, seed=6)[0]])
    T = ids.shape[1]
    with torch.no_grad():
        feats, _ = target_features(target, ids, draft.draft_config.feature_layers)
        g = ref.w["fc.weight"] @ torch.cat(feats, -1)[0].T
        # step 1 at positions 0..T-2 (token t+1, features at t), then one chained step at T-1 from the state at T-2
        pos, nxt = torch.arange(T - 1), 7
        past = []
        r1 = ref.step(ref.embed(ids[0, 1:], target), g.T[:T - 1], pos, past)
        r2 = ref.step(ref.embed([nxt], target), r1[-1:], torch.tensor([T - 1]), past)
        want = torch.cat([ref.logits(r1), ref.logits(r2)])

        drafter = Eagle3Drafter(target, draft)
        lc = draft.draft_config.target_config()
        cache = KVCache(1, T + 4, lc.num_key_value_heads, lc.head_dim, torch.float32)
        o1 = drafter._run(ids[:, 1:], drafter.fuse(feats)[:, :T - 1], pos[None], [cache])
        o2 = drafter._run(torch.tensor([[nxt]]), o1[:, -1:], torch.tensor([[T - 1]]), [cache])
        got = drafter._full_logits(torch.cat([o1[0], o2[0]]))
    fin = want.isfinite()
    assert torch.equal(fin, got.isfinite())
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


def test_export_equals_an_independent_llama_eagle3(tmp_path, target):
    draft = llama_draft(target)
    export_llama_eagle3(draft, target, tmp_path / "out", dtype=torch.float32)
    ref = Reference(tmp_path / "out")
    assert ref.c["architectures"] == ["LlamaForCausalLMEagle3"] and ref.c["draft_vocab_size"] == 100
    assert "embed_tokens.weight" not in ref.w  # the engines share the target's embedding
    assert ref.c["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(draft.draft_config.feature_layers)
    assert int(ref.w["t2d"].sum()) == 100
    check_against_reference(draft, target, ref)


def test_import_of_a_foreign_llama_eagle3_draft(tmp_path, target):
    """A draft as others publish them: its own lm_head and embedding, other head counts and head_dim than the
    target, an unsorted d2t, vLLM's top-level aux layer ids (layer inputs). Imported, it drafts exactly what the
    reference computes from its files; exported again, the files are unchanged."""
    export_llama_eagle3(llama_draft(target), target, tmp_path / "ours", dtype=torch.float32)
    c = json.loads((tmp_path / "ours" / "config.json").read_text())
    w = load_file(str(tmp_path / "ours" / "model.safetensors"))
    g = torch.Generator().manual_seed(9)
    H, V, Nd, heads, kv, hd = c["hidden_size"], c["vocab_size"], 100, 2, 1, 24
    w["lm_head.weight"] = torch.randn(Nd, H, generator=g) * 0.5
    w["embed_tokens.weight"] = torch.randn(V, H, generator=g)
    w["d2t"] = torch.randperm(V, generator=g)[:Nd] - torch.arange(Nd)
    for x, n in (("q", heads), ("k", kv), ("v", kv)):
        w[f"midlayer.self_attn.{x}_proj.weight"] = torch.randn(n * hd, 2 * H, generator=g) * 0.1
    w["midlayer.self_attn.o_proj.weight"] = torch.randn(H, heads * hd, generator=g) * 0.1
    c.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, rope_theta=5000.0)
    c["eagle_aux_hidden_state_layer_ids"] = [1, 2, 1]  # vLLM: inputs of those layers = outputs of 0, 1, 0
    del c["eagle_config"]
    src = tmp_path / "foreign"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(c))
    save_file(w, str(src / "model.safetensors"))

    draft = import_llama_eagle3(src, target.config)
    assert draft.draft_config.feature_layers == (0, 1, 0)
    check_against_reference(draft, target, Reference(src))
    export_llama_eagle3(draft, target, tmp_path / "again", dtype=torch.float32)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in w.items() if k != "t2d")

    ps = prompts(2, seed=8)  # the native engine serves it with exact verification
    eng = Engine(target, max_batch=2, max_seq_len=96, draft=Eagle3Drafter(target, draft), spec_tokens=2)
    res = eng.generate([GenerationRequest(p, max_tokens=12, stop_ids=[]) for p in ps])
    assert [r.token_ids for r in res] == [greedy_ref(target, p, 12) for p in ps]


def test_import_takes_vllm_style_tensor_names(tmp_path, target):
    """`model.layers.0.*` / `model.fc.weight` (other trainers' names) import as `midlayer.*` / `fc.weight`; a
    missing tensor is named."""
    export_llama_eagle3(llama_draft(target), target, tmp_path / "a", dtype=torch.float32)
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    renamed = {k if k == "lm_head.weight" else "model." + k.replace("midlayer.", "layers.0."): v for k, v in w.items()}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    save_file(renamed, str(tmp_path / "b" / "model.safetensors"))
    check_against_reference(import_llama_eagle3(tmp_path / "b", target.config), target, Reference(tmp_path / "a"))
    del renamed["model.layers.0.mlp.up_proj.weight"]
    save_file(renamed, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match="midlayer.mlp.up_proj.weight"):
        import_llama_eagle3(tmp_path / "b", target.config)


def test_import_refuses_layer_variants_it_does_not_build(tmp_path, target):
    export_llama_eagle3(llama_draft(target), target, tmp_path / "d", dtype=torch.float32)
    c = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**c, "norm_before_residual": True}))
    with pytest.raises(ValueError, match="norm_before_residual"):
        import_llama_eagle3(tmp_path / "d", target.config)
    (tmp_path / "d" / "config.json").write_text(json.dumps({**c, "target_hidden_size": 2 * c["hidden_size"]}))
    with pytest.raises(ValueError, match="target_hidden_size"):
        import_llama_eagle3(tmp_path / "d", target.config)


def test_llama_layout_draft_keeps_greedy_output(target):
    draft = llama_draft(target, vocab=None, seed=6)
    ps = prompts(3, seed=7)
    eng = Engine(target, max_batch=2, max_seq_len=96, draft=Eagle3Drafter(target, draft), spec_tokens=3)
    res = eng.generate([GenerationRequest(p, max_tokens=20, stop_ids=[]) for p in ps])
    assert [r.token_ids for r in res] == [greedy_ref(target, p, 20) for p in ps]


def test_llama_layout_feature_layers_stay_below_the_last(target):
    L = target.config.num_hidden_layers
    assert max(DraftConfig.for_target(target.config, layout="llama").feature_layers) <= L - 2
    with pytest.raises(ValueError, match="feature_layers"):
        DraftConfig.for_target(target.config, feature_layers=(0, 1, L - 1), layout="llama")
    with pytest.raises(ValueError, match="layout"):
        DraftConfig.for_target(target.config, layout="medusa")


def test_convert_cli_writes_the_sglang_layout(tmp_path, target, capsys):
    from angelmed.checkpoint import save_model
    from angelmed.commands import convert
    from angelmed.serve.cli import _is_sglang_eagle3

    save_model(target, tmp_path / "target")
    llama_draft(target).save(tmp_path / "draft")
    assert convert([str(tmp_path / "draft"), str(tmp_path / "out"), "--target", str(tmp_path / "target")]) == 0
    assert _is_sglang_eagle3(str(tmp_path / "out"))
    from angelmed.serve.cli import make_drafter
    assert isinstance(make_drafter(target, str(tmp_path / "out")), Eagle3Drafter)  # served natively too
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16
    DraftModel(DraftConfig.for_target(target.config)).init_weights(0).save(tmp_path / "native")
    capsys.readouterr()
    assert convert([str(tmp_path / "native"), str(tmp_path / "out2"), "--target", str(tmp_path / "target")]) != 0
    assert "draft.layout: llama" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_info_describes_draft_directories(tmp_path, target, capsys):
    from angelmed.checkpoint import save_model
    from angelmed.commands import info

    c = target.config
    H, I, hd, nq, nkv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    native = DraftModel(DraftConfig.for_target(c, draft_vocab_size=100)).init_weights(0)
    native.save(tmp_path / "native")
    draft = llama_draft(target)
    draft.save(tmp_path / "ours")
    save_model(target, tmp_path / "target")
    export_llama_eagle3(draft, target, tmp_path / "sglang", dtype=torch.float32)

    def summary(path):
        capsys.readouterr()
        assert info([str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    s = summary(tmp_path / "native")  # fc, enorm/hnorm, eh_proj, the decoder layer (qk-norm), final norm
    assert s["kind"] == "EAGLE-3 draft, angelmed layout" and s["draft_vocab"] == 100 and s["vocab"] == c.vocab_size
    assert s["params_total"] == 3 * H * H + 2 * H + 2 * H * H + H + (nq + 2 * nkv) * hd * H + nq * hd * H \
        + 2 * hd + H + 3 * I * H + H
    # the SGLang directory: q/k/v read 2H, three layer norms, the final norm and the draft-vocabulary head
    llama_params = 3 * H * H + (nq + 2 * nkv) * hd * 2 * H + nq * hd * H + 3 * H + 3 * I * H + H
    s = summary(tmp_path / "sglang")
    assert s["kind"].endswith("LlamaForCausalLMEagle3 (vLLM / SGLang)") and s["heads"] == f"{nq}q/{nkv}kv x {hd}"
    assert s["feature_layers"] == list(draft.draft_config.feature_layers)
    assert s["params_total"] == llama_params + 100 * H and s["draft_vocab"] == 100
    assert summary(tmp_path / "ours")["params_total"] == llama_params  # ours scores the target's head rows
    assert summary(tmp_path / "target")["layers"] == c.num_hidden_layers  # a model still gets the model summary

"""Our export loads in vLLM and vLLM generates what we generate (fp32, greedy).

The fast tests check the export itself (MTP dropped without changing the main network, remote-code config
module readable by transformers). The slow test needs the separate vLLM venv (`python
benchmarks/bench_vllm.py --setup-venv`, or ANGELMED_VLLM_VENV) and is skipped without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_vllm  # noqa: E402
from angelmed.checkpoint import load_model  # noqa: E402
from angelmed.config import get_preset  # noqa: E402
from angelmed.model import Transformer  # noqa: E402


def test_drop_mtp_keeps_the_main_network():
    cfg = get_preset("small")
    assert cfg.num_nextn_predict_layers == 1
    model = Transformer(cfg).init_weights(0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        model.drop_mtp()
        after = model(ids).logits
    assert model.config.num_nextn_predict_layers == 0
    assert len(model.model.layers) == cfg.num_hidden_layers
    assert not any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in model.state_dict())
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    data = REPO.parent / "shared" / "data"
    if not (data / "medquad").is_dir():
        pytest.skip(f"MedQuAD not found under {data}")
    return bench_vllm.export_checkpoint(tmp_path_factory.mktemp("vllm") / "ckpt", "small", "float32",
                                        data_root=data, tokenizer_chars=300_000)


def test_export_is_what_vllm_needs(exported: Path):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0 and cfg["head_dim"] >= 32
    assert cfg["auto_map"]["AutoConfig"] == "configuration_bailing_moe_v2.BailingMoeV2Config"
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
    assert layers == set(range(cfg["num_hidden_layers"]))  # no MTP tensors
    for name in ("tokenizer.json", "tokenizer_config.json", "configuration_bailing_moe_v2.py",
                 "modeling_bailing_moe_v2.py"):
        assert (exported / name).is_file(), name
    # transformers loads the remote-code config the way vLLM does (trust_remote_code)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(exported), trust_remote_code=True)
    assert hf.model_type == "bailing_moe"
    assert (hf.num_experts, hf.n_group, hf.topk_group, hf.partial_rotary_factor) == (16, 4, 2, 0.5)
    assert hf.vocab_size == cfg["vocab_size"]
    assert load_model(exported).config.vocab_size == cfg["vocab_size"]


@pytest.mark.slow
def test_vllm_greedy_matches_ours(exported: Path):
    if not bench_vllm.has_vllm():
        pytest.skip(f"no vLLM venv at {bench_vllm.VENV} (python benchmarks/bench_vllm.py --setup-venv)")
    prompts = bench_vllm.prompt_ids(exported, 3, 24)
    out = bench_vllm.run_vllm(exported, [{"name": "g", "prompts": prompts, "max_tokens": 8, "logprobs": True}],
                              dtype="float32", max_model_len=64, max_num_seqs=4)
    theirs = out["jobs"]["g"]
    model = load_model(exported, dtype="float32")
    assert bench_vllm.greedy_ours(model, prompts, 8) == theirs["token_ids"]
    ours_lp = bench_vllm.teacher_forced_logprobs(model, prompts, theirs["token_ids"])
    for o, v in zip(ours_lp, theirs["logprobs"]):
        assert o == pytest.approx(v, abs=1e-3)

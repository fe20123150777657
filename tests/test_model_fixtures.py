"""The definition of a correct model: the official reference's outputs on the golden fixtures."""

import json

import numpy as np
import pytest
import torch

from angelmed.checkpoint import load_model
from angelmed.infer.generate import generate

MODEL_FIXTURES = ["tiny_mtp", "tiny_yarn", "tiny_groups_sharded", "small_fp8"]


def _tol(fx, key):
    return json.loads((fx / "manifest.json").read_text())["tolerances"][key]["atol"]


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(fx):
        if fx.name not in cache:
            model = load_model(fx, dtype="float32")
            ids = torch.from_numpy(np.load(fx / "ids.npy"))
            with torch.no_grad():
                cache[fx.name] = (model, ids, model(ids, mtp=model.config.num_nextn_predict_layers > 0))
        return cache[fx.name]

    return get


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_logits_and_hidden(fixtures_dir, loaded, name):
    fx = fixtures_dir / name
    _, _, out = loaded(fx)
    np.testing.assert_allclose(out.logits.numpy(), np.load(fx / "logits.npy"), rtol=0, atol=_tol(fx, "logits"))
    np.testing.assert_allclose(out.hidden.numpy(), np.load(fx / "hidden.npy"), rtol=0, atol=_tol(fx, "hidden"))


@pytest.mark.parametrize("name", ["tiny_mtp", "tiny_groups_sharded", "small_fp8"])
def test_mtp_logits_per_depth(fixtures_dir, loaded, name):
    fx = fixtures_dir / name
    _, _, out = loaded(fx)
    expected = np.load(fx / "mtp_logits.npy")
    assert len(out.mtp_logits) == expected.shape[0]
    for d in range(expected.shape[0]):  # depth >= 2 is the correct per-depth output, not the reference bug
        np.testing.assert_allclose(out.mtp_logits[d].numpy(), expected[d], rtol=0, atol=_tol(fx, "mtp_logits"))


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_routing_sets_identical(fixtures_dir, loaded, name):
    fx = fixtures_dir / name
    model, _, out = loaded(fx)
    routing = np.load(fx / "routing.npz")
    layer_ids = model.config.moe_layer_ids
    assert sorted(routing.files) == sorted(f"layer{i}" for i in layer_ids)
    for info, lid in zip(out.router, layer_ids):
        np.testing.assert_array_equal(np.sort(info.idx_Tk.numpy(), -1), np.sort(routing[f"layer{lid}"], -1))


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_greedy_tokens_with_kv_cache(fixtures_dir, loaded, name):
    fx = fixtures_dir / name
    model, ids, _ = loaded(fx)
    expected = np.load(fx / "greedy_tokens.npy")
    got = generate(model, ids, expected.shape[1])  # no EOS stop: fixture eos = vocab-1
    np.testing.assert_array_equal(got.numpy(), expected)


def test_fp8_fixture_is_not_the_unquantized_model(fixtures_dir, loaded):
    fx = fixtures_dir / "small_fp8"
    _, _, out = loaded(fx)
    gap = np.abs(out.logits.numpy() - np.load(fx / "logits_unquantized.npy")).max()
    assert gap > 1000 * _tol(fx, "logits")


def test_main_logits_do_not_depend_on_mtp(fixtures_dir, loaded):
    fx = fixtures_dir / "tiny_mtp"
    model, ids, out = loaded(fx)
    with torch.no_grad():
        plain = model(ids, mtp=False)
    torch.testing.assert_close(plain.logits, out.logits, rtol=0, atol=0)


def test_expert_bias_changes_routing_negative_control(fixtures_dir):
    """Ignoring the selection bias must break parity (guards against a test that cannot fail)."""
    fx = fixtures_dir / "tiny_mtp"
    model = load_model(fx, dtype="float32")
    for m in model.modules():
        if hasattr(m, "expert_bias"):
            m.expert_bias.zero_()
    ids = torch.from_numpy(np.load(fx / "ids.npy"))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    assert np.abs(logits - np.load(fx / "logits.npy")).max() > 1e-2

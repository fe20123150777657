"""The `angelmed` command-line contract (info, new, logits, generate, convert)."""

import json
import subprocess
import sys

import numpy as np
from safetensors import safe_open


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "angelmed", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_logits_mtp_routing_match_fixture(fixtures_dir, tmp_path):
    fx = fixtures_dir / "tiny_groups_sharded"
    run("logits", fx, "--ids", fx / "ids.npy", "--out", tmp_path / "l.npy", "--mtp-out", tmp_path / "m.npy",
        "--routing-out", tmp_path / "r.npy")
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), np.load(fx / "logits.npy"), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), np.load(fx / "mtp_logits.npy"), rtol=0, atol=1e-4)
    routing = np.load(tmp_path / "r.npy")
    expected = np.load(fx / "routing.npz")
    assert routing.shape == (3, 2, 24, 4)  # main MoE layers 2..4 (5, 6 are MTP)
    for i, lid in enumerate(range(2, 5)):
        np.testing.assert_array_equal(np.sort(routing[i], -1), np.sort(expected[f"layer{lid}"], -1))


def test_generate_greedy_matches_fixture(fixtures_dir, tmp_path):
    fx = fixtures_dir / "tiny_mtp"
    run("generate", fx, "--ids", fx / "ids.npy", "--max-new-tokens", 16, "--greedy", "--ignore-eos",
        "--out", tmp_path / "g.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), np.load(fx / "greedy_tokens.npy"))


def test_new_info_convert(tmp_path):
    run("new", "tiny", tmp_path / "t", "--seed", 1)
    info = json.loads(run("info", tmp_path / "t", "--json").stdout)
    assert info["params_total"] == 315_776 and info["mtp_layers"] == 1
    run("convert", tmp_path / "t", tmp_path / "t8", "--fp8")
    assert json.loads((tmp_path / "t8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    run("convert", tmp_path / "t", tmp_path / "tb", "--dtype", "bfloat16")
    for d, key in (("tb", "weights_bf16_bytes"), ("t8", "weights_fp8_bytes")):  # info's memory = bytes written
        with safe_open(str(tmp_path / d / "model.safetensors"), "pt") as f:
            assert info[key] == sum(f.get_tensor(k).nbytes for k in f.keys()), key
    big = json.loads(run("info", "flash-100b", "--json").stdout)  # the published 206 GB BF16 / ~104 GB FP8
    assert abs(big["weights_bf16_bytes"] / 1e9 - 206) < 1 and abs(big["weights_fp8_bytes"] / 1e9 - 104) < 1
    assert big["kv_cache_per_token_bytes"] == 64 * 1024  # 32 layers x 4 kv heads x 128 x (K, V) x bf16
    for gb, bf16, fp8 in ((141, 2, 1), (80, 4, 2)):  # published: FP8 fits one H200 but not one H100
        plan = json.loads(run("info", "flash-100b", "--json", "--gpu-gb", gb).stdout)
        assert (plan["gpus_bf16"]["gpus"], plan["gpus_fp8"]["gpus"]) == (bf16, fp8)
        room = fp8 * gb * 1e9 * 0.9 - big["weights_fp8_bytes"]
        assert plan["gpus_fp8"]["kv_cache_bytes"] == int(room)
        assert plan["gpus_fp8"]["full_context_sequences"] == int(room // (2 * 2**30))  # 2 GiB per 32K sequence
    run("convert", tmp_path / "t", tmp_path / "ts", "--shards", 2)
    assert (tmp_path / "ts" / "model-00002-of-00002.safetensors").is_file()
    ids = np.arange(10)[None]
    np.save(tmp_path / "ids.npy", ids)
    run("logits", tmp_path / "t", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "a.npy")
    run("logits", tmp_path / "ts", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_ids_out_of_vocab_clear_error_no_output(fixtures_dir, tmp_path):
    np.save(tmp_path / "ids.npy", np.array([[1, 2, 512]]))
    p = run("logits", fixtures_dir / "tiny_mtp", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "o.npy",
            check=False)
    assert p.returncode == 2 and "[0, 512)" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o.npy").exists()


def test_missing_checkpoint_clear_error(tmp_path):
    p = run("info", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "config.json" in p.stderr


def test_unknown_command():
    p = run("frobnicate", check=False)
    assert p.returncode == 2 and "unknown command" in p.stderr

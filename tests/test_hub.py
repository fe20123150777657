"""Hugging Face repo ids where a model directory is expected: downloaded (here: a stand-in for snapshot_download
that copies a local checkpoint, since tests run offline), local paths untouched, failures named."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest

from angelmed.checkpoint import save_model
from angelmed.hub import CHECKPOINT_FILES, local_dir, repo_id
from test_engine import tiny_model


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A fake Hub holding one repo, 'acme/tiny-med'; records every download."""
    src = tmp_path / "published"
    save_model(tiny_model(0), src)
    calls = []

    def snapshot_download(repo, revision=None, allow_patterns=None, **kw):
        calls.append((repo, revision, allow_patterns))
        if repo != "acme/tiny-med":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 {repo}")
        dst = tmp_path / "cache" / repo.replace("/", "--") / (revision or "main")
        if not dst.exists():
            keep = ["config.json"] if allow_patterns == ["config.json"] else None
            shutil.copytree(src, dst, ignore=None if keep is None else
                            lambda d, names: [n for n in names if n not in keep])
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_repo_ids_and_paths(tmp_path):
    assert repo_id("acme/tiny-med") == ("acme/tiny-med", None)
    assert repo_id("acme/tiny-med@v1.0") == ("acme/tiny-med", "v1.0")
    assert repo_id(str(tmp_path)) is None  # an existing path is a path
    assert repo_id("/abs/missing/dir") is None and repo_id("just-a-name") is None
    assert local_dir(str(tmp_path)) == str(tmp_path)


def test_download_fetches_checkpoint_files_and_names_failures(hub):
    d = local_dir("acme/tiny-med@v1.0")
    assert hub[-1] == ("acme/tiny-med", "v1.0", CHECKPOINT_FILES)
    assert (Path(d) / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="no such local directory.*acme/missing"):
        local_dir("acme/missing")


def test_cli_commands_take_repo_ids(hub, tmp_path, capsys):
    from angelmed.commands import info
    from angelmed.serve.cli import main as serve

    assert info(["acme/tiny-med"]) == 0
    assert hub[-1][2] == ["config.json"]  # info reads the config only
    assert "layers" in capsys.readouterr().out
    # vLLM downloads the model itself: the printed command names the repo, nothing is fetched
    n = len(hub)
    assert serve(["acme/tiny-med", "--backend", "vllm", "--print-only"]) == 0
    out = capsys.readouterr().out
    assert "vllm serve acme/tiny-med " in out and "--served-model-name acme/tiny-med" in out and len(hub) == n
    assert serve(["acme/nothing-here", "--port", "0"]) == 2
    assert "acme/nothing-here" in capsys.readouterr().err


def test_generate_from_a_repo_id_downloads_the_checkpoint(hub, tmp_path):
    import numpy as np

    from angelmed.commands import generate

    np.save(tmp_path / "ids.npy", np.array([[5, 6, 7]]))
    assert generate(["acme/tiny-med", "--ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "3", "--greedy",
                     "--out", str(tmp_path / "out.npy")]) == 0
    assert hub[-1] == ("acme/tiny-med", None, CHECKPOINT_FILES)
    assert np.load(tmp_path / "out.npy").shape == (1, 3)


def test_sglang_command_passes_a_hub_draft_id_through(hub, tmp_path, monkeypatch, capsys):
    """An EAGLE-3 draft on the Hub in SGLang's layout: its config decides the flags, the id goes to SGLang."""
    import json

    from angelmed.serve.cli import main as serve

    real = huggingface_hub.snapshot_download
    draft = tmp_path / "eagle3"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))

    def fake(repo, revision=None, allow_patterns=None, **kw):
        if repo == "acme/tiny-med-eagle3":
            hub.append((repo, revision, allow_patterns))
            return str(draft)
        return real(repo, revision, allow_patterns, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert serve(["acme/tiny-med", "--backend", "sglang", "--draft", "acme/tiny-med-eagle3", "--print-only"]) == 0
    out = capsys.readouterr().out
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path acme/tiny-med-eagle3 " in out
    assert hub[-1] == ("acme/tiny-med-eagle3", None, ["config.json"])


def test_training_starts_from_a_repo_id(hub):
    """model.init_from takes a repo id: the run starts from the downloaded checkpoint; a dry-run plan fetches only
    its config."""
    from angelmed.train.config import load_config

    cfg = load_config("sft", None, ["--model.init_from", "acme/tiny-med"])
    assert hub[-1] == ("acme/tiny-med", None, CHECKPOINT_FILES)
    assert (Path(cfg.model.init_from) / "model.safetensors").is_file()
    load_config("cpt", None, ["--model.init_from", "acme/tiny-med"], config_only=True)
    assert hub[-1][2] == ["config.json"]

"""Run config: YAML + overrides, type checks, errors that name the key."""

import pytest

from angelmed.train.cli import main as train_main
from angelmed.train.config import RunConfigError, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_resolve_with_types(tmp_path):
    p = write(tmp_path, "stage: cpt\noptim:\n  lr: 1e-3\n  warmup_steps: 3\ntrain:\n  steps: 7\n")
    cfg = load_config("cpt", p, ["--optim.lr", "5e-4", "--train.grad_accum=2", "--data.sources",
                                 "[{spec: medquad}]", "--loss.mtp_weight_schedule", "[[0, 0.3], [100, 0.1]]"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)  # '1e-3' YAML string accepted as float
    assert cfg.optim.warmup_steps == 3 and cfg.train.steps == 7 and cfg.train.grad_accum == 2
    assert cfg.data.sources == [{"spec": "medquad"}]
    assert cfg.loss.mtp_weight_schedule == [[0.0, 0.3], [100.0, 0.1]]
    assert cfg.data.seq_len == 128  # untouched default


def test_stage_defaults():
    cpt, sft = load_config("cpt"), load_config("sft")
    assert not cpt.balance.freeze and cpt.balance.bias_update_rate == 1e-3 and cpt.balance.bias_zero_mean
    assert cpt.loss.z_loss_coef == 3.5e-6
    assert sft.balance.freeze and sft.loss.z_loss_coef == 0.0


@pytest.mark.parametrize("text, needle", [
    ("optim:\n  learning_rate: 1.0\n", "optim.learning_rate"),
    ("bogus: 1\n", "'bogus'"),
    ("train:\n  steps: many\n", "train.steps"),
    ("train:\n  steps: 2.5\n", "train.steps"),
    ("balance:\n  freeze: 1\n", "balance.freeze"),
    ("data:\n  sources: {kind: medquad}\n", "data.sources"),
])
def test_yaml_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(RunConfigError) as e:
        load_config("cpt", write(tmp_path, text))
    assert needle in str(e.value) and "run.yaml" in str(e.value)


def test_override_errors_name_the_key():
    with pytest.raises(RunConfigError, match=r"train\.stepz"):
        load_config("cpt", None, ["--train.stepz", "3"])
    with pytest.raises(RunConfigError, match=r"optim\.lr.*float.*'fast'"):
        load_config("cpt", None, ["--optim.lr", "fast"])
    with pytest.raises(RunConfigError, match="optim.schedule"):
        load_config("cpt", None, ["--optim.schedule", "linear"])
    with pytest.raises(RunConfigError, match="needs a value"):
        parse_overrides(["--train.steps"])


def test_cli_reports_bad_key(capsys):
    assert train_main(["cpt", "--train.nonsense", "1"]) == 2
    assert "train.nonsense" in capsys.readouterr().err
    assert train_main(["nope"]) == 2
    assert train_main([]) == 0


def test_model_override_keys_checked(tmp_path):
    from angelmed.train.loop import model_config

    cfg = load_config("cpt", None, ["--model.overrides", "{num_hidden_layers: 2}"])
    assert model_config(cfg.model).num_hidden_layers == 2
    with pytest.raises(RunConfigError, match="num_layers"):
        model_config(load_config("cpt", None, ["--model.overrides", "{num_layers: 2}"]).model)
    with pytest.raises(RunConfigError, match="num_hidden_layers"):
        model_config(load_config("cpt", None, ["--model.overrides", "{num_hidden_layers: two}"]).model)

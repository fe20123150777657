"""GRPO trainer: learning on a learnable reward, routing replay (R3), dynamic sampling, loss-variant wiring,
mu > 1 ratios/clipping, resume, config errors. The loss maths itself is tested in test_grpo_loss.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import angelmed.train.grpo as grpo_mod
from angelmed.config import get_preset
from angelmed.infer.engine import Engine
from angelmed.model import Transformer
from angelmed.train.config import RunConfigError
from angelmed.train.grpo import GRPOTrainer, run
from angelmed.train.grpo_config import grpo_default_config, load_grpo_config
from angelmed.train.grpo_loss import aggregate as real_aggregate
from angelmed.train.grpo_loss import zero_std_groups
from angelmed.train.rollout import Sampling, collate, generate_groups, policy_logprobs, PromptItem

REPO = Path(__file__).resolve().parents[1]
LOW = 128  # the learnable reward: share of completion tokens with id < LOW (about 1/4 at random init)


def low_id_share(prompts, completions, completion_ids, **columns):
    return [sum(t < LOW for t in ids) / len(ids) for ids in completion_ids]


def write_prompts(path: Path, n: int = 64) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Describe case {i}.", "k": i}) + "\n")
    return path


def tiny_cfg(tmp_path: Path, prompts: Path | None = None, **grpo):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = grpo_default_config()
    cfg.model.preset = "tiny"
    cfg.grpo.prompts = [{"source": str(prompts or write_prompts(tmp_path / "prompts.jsonl"))}]
    cfg.grpo.group_size = 8
    cfg.grpo.prompts_per_step = 4
    cfg.grpo.max_completion_length = 16
    cfg.grpo.eval_size = 0
    cfg.data.heldout_fraction = 0.1
    cfg.data.micro_batch_size = 16
    cfg.optim.lr = 3e-3
    cfg.train.steps = 2
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.resume = "never"
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.train.peak_flops = 1e12  # skip the matmul-rate measurement
    cfg.train.eval_every = 0
    cfg.train.threads = 1
    for k, v in grpo.items():
        setattr(cfg.grpo, k, v)
    return cfg


def set_up(cfg, rewards=(low_id_share,)) -> GRPOTrainer:
    tr = GRPOTrainer(cfg, list(rewards))
    tr._setup()
    return tr


# ---- learning -------------------------------------------------------------------------------------------
def test_mean_reward_rises_on_a_learnable_reward(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.train.steps = 12
    cfg.grpo.eval_size = 8
    records = []
    run(cfg, rewards=[low_id_share], on_step_end=lambda step, rec: records.append(rec))
    rewards = [r["reward_mean"] for r in records]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert 0.15 < first < 0.35  # about LOW / vocab (512) at random init
    assert last > first + 0.05, rewards
    # held-out greedy reward is logged at step 0 (baseline) and at the end
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "heldout_reward" in lines[0]
    assert "heldout_reward" in records[-1]
    for key in ("reward_std", "reward/low_id_share/mean", "advantage_std", "clip_low_frac", "clip_high_frac",
                "entropy", "completion_len_mean", "truncated_frac", "frac_reward_zero_std", "routing_disagree",
                "ratio_mean", "rollout_time_s", "train_time_s", "grad_norm", "lr", "loss"):
        assert key in records[-1], key
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ---- routing replay ---------------------------------------------------------------------------------------
def _rollout_fixture():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).init_weights(3)
    engine = Engine(model, None, max_batch=8, max_seq_len=64, stop_ids=[])
    items = [PromptItem([5, 17, 99, 3, 250], []), PromptItem([7, 8, 9], [])]
    seeds = [[11, 12, 13], [21, 22, 23]]
    comps = generate_groups(engine, items, 3, Sampling(max_tokens=10, temperature=1.0), seeds, record_routing=True)
    return model, comps


def test_engine_records_the_experts_of_every_processed_token():
    model, comps = _rollout_fixture()
    n_moe = sum(1 for i in model.config.moe_layer_ids if i < model.config.num_hidden_layers)
    for c in comps:
        seq = c.prompt_ids + c.completion_ids[:-1]
        assert len(c.routing) == n_moe
        assert all(r.shape == (len(seq), model.config.num_experts_per_tok) for r in c.routing)
        # a plain full-sequence forward (no replay) picks the same expert sets (fp32, unchanged weights)
        with torch.no_grad():
            free = model(torch.tensor([seq])).routing
        for rec, ids in zip(c.routing, free):
            assert torch.equal(rec.long().sort(-1).values, ids[0].sort(-1).values)


def test_replay_forces_the_recorded_experts_and_reproduces_rollout_logprobs():
    model, comps = _rollout_fixture()
    cfg = model.config
    batch = collate(comps, torch.device("cpu"), len(comps[0].routing), cfg.num_experts_per_tok)
    gates = [layer.mlp.gate for layer in model.model.layers[:cfg.num_hidden_layers] if hasattr(layer.mlp, "gate")]
    seen = []
    hooks = [g.register_forward_hook(lambda m, i, o: seen.append(o[1].detach().clone())) for g in gates]
    try:
        logp, _, out = policy_logprobs(model, batch, replay=True)
    finally:
        for h in hooks:
            h.remove()
    B, T = batch.ids_BT.shape
    for layer, ids in enumerate(seen):  # the ids the MoE layers actually used
        ids_BTk = ids.view(B, T, -1)
        for b, c in enumerate(comps):
            n = len(c.prompt_ids) + len(c.completion_ids) - 1
            assert torch.equal(ids_BTk[b, :n], c.routing[layer].long())
    # identical weights: the replayed training forward gives the rollout's log-probs
    m = batch.mask_BL
    assert torch.allclose(logp[m], batch.rollout_logp_BL[m], atol=2e-5)
    # gate weights come from the live router scores: the router gets a gradient through the replayed path
    logp[m].sum().backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates)


def test_replaying_other_experts_changes_the_forward():
    """Forcing is real: replaying shifted expert ids changes the ids used and the log-probs."""
    model, comps = _rollout_fixture()
    cfg = model.config
    batch = collate(comps, torch.device("cpu"), len(comps[0].routing), cfg.num_experts_per_tok)
    batch.forced = [(f + 1) % cfg.num_experts for f in batch.forced]
    with torch.no_grad():
        logp, _, out = policy_logprobs(model, batch, replay=True)
    assert all(torch.equal(info.idx_Tk, f) for info, f in zip(out.router, batch.forced))
    m = batch.mask_BL
    assert (logp[m] - batch.rollout_logp_BL[m]).abs().max() > 1e-3


def test_routing_disagreement_metric_counts_forced_mismatches(tmp_path):
    tr = set_up(tiny_cfg(tmp_path))
    ro = tr.rollout(0)
    batch = collate(ro["kept"], torch.device("cpu"), len(tr.gates), tr.mcfg.num_experts_per_tok)
    from angelmed.train.rollout import routing_disagreement

    _, _, out = policy_logprobs(tr.model, batch)
    assert routing_disagreement(tr.gates, out.router, batch)[0] == 0.0  # same weights: the router agrees
    batch.forced = [(f + 1) % tr.mcfg.num_experts for f in batch.forced]  # recorded ids now all wrong
    _, _, out = policy_logprobs(tr.model, batch, replay=False)
    dis, dis_tok, n = routing_disagreement(tr.gates, out.router, batch)
    assert dis == 1.0 and dis_tok == 1.0 and n == int(batch.valid_BT.sum())


# ---- dynamic sampling -----------------------------------------------------------------------------------
def even_prompts_constant(prompts, completions, completion_ids, k, **columns):
    """Prompts with even k: every completion gets 1.0 (zero-variance group); odd k: the learnable share."""
    return [1.0 if kk % 2 == 0 else sum(t < LOW for t in ids) / len(ids) for kk, ids in zip(k, completion_ids)]


def test_dynamic_sampling_skips_zero_variance_groups(tmp_path):
    G, P = 8, 4
    plain = set_up(tiny_cfg(tmp_path / "a"), [even_prompts_constant]).rollout(0)
    assert plain["groups"] == P and len(plain["kept"]) == P * G  # without filtering every group is kept
    zero = int(zero_std_groups(plain["all_total"], G).sum())
    assert zero > 0 and plain["zero_groups"] == zero

    tr = set_up(tiny_cfg(tmp_path / "b", dynamic_sampling=True, max_gen_batches=1), [even_prompts_constant])
    ro = tr.rollout(0)
    assert ro["gen_batches"] == 1
    assert len(ro["kept"]) // G == P - ro["zero_groups"] < P
    assert not zero_std_groups(ro["total"], G).any()

    tr = set_up(tiny_cfg(tmp_path / "c", dynamic_sampling=True, max_gen_batches=0), [even_prompts_constant])
    ro = tr.rollout(0)  # refill until P qualifying groups
    assert ro["gen_batches"] >= 2 and len(ro["kept"]) == P * G
    assert not zero_std_groups(ro["total"], G).any()
    assert [c.group for c in ro["kept"]] == [i // G for i in range(P * G)]


def test_all_zero_variance_batch_skips_the_update(tmp_path):
    tr = set_up(tiny_cfg(tmp_path, dynamic_sampling=True), [lambda prompts, completions, **kw: [0.5] * len(completions)])
    before = [p.detach().clone() for p in tr.model.parameters()]
    rec = tr.train_step(0)
    assert rec["skipped_update"] and rec["frac_reward_zero_std"] == 1.0 and rec["groups_kept"] == 0
    assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))


# ---- loss variants and mu -------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_config_selects_the_loss_aggregation(tmp_path, monkeypatch, loss_type):
    calls = []

    def spy(loss_NL, mask_NL, *args, **kw):
        calls.append((args, int(mask_NL.sum())))
        return real_aggregate(loss_NL, mask_NL, *args, **kw)

    monkeypatch.setattr(grpo_mod, "aggregate", spy)
    cfg = tiny_cfg(tmp_path, loss_type=loss_type)
    cfg.data.micro_batch_size = 12  # 32 completions -> 3 micro-batches
    tr = set_up(cfg)
    rec = tr.train_step(0)
    assert len(calls) == 3
    lengths = rec["completion_len_mean"] * rec["completions"]  # every completion token is active
    for (lt, max_len, global_tokens, nproc, accum), _ in calls:
        assert (lt, max_len, nproc, accum) == (loss_type, 16, 1, 3)
        assert global_tokens == pytest.approx(lengths)  # counted over the whole batch, before the loop
    assert sum(n for _, n in calls) == rec["active_tokens"] == round(lengths)


def test_mu_greater_than_one_gives_nontrivial_ratios_and_clipping(tmp_path):
    cfg = tiny_cfg(tmp_path, num_iterations=4)
    cfg.optim.lr = 1e-2
    rec = set_up(cfg).train_step(0)
    assert rec["old_logprobs"] == "train"
    assert rec["ratio_max"] > 1.0 + 0.28 or rec["ratio_min"] < 1.0 - 0.2
    assert rec["clip_low_frac"] + rec["clip_high_frac"] > 0


def test_mu_one_with_training_old_logprobs_has_unit_ratio(tmp_path):
    rec = set_up(tiny_cfg(tmp_path, old_logprobs="train")).train_step(0)
    assert rec["ratio_min"] == rec["ratio_max"] == 1.0
    assert rec["clip_low_frac"] == rec["clip_high_frac"] == 0.0
    assert rec["rollout_kl"] == pytest.approx(0.0, abs=1e-4)  # fp32 rollout = fp32 training forward


def test_rollout_correction_and_kl_are_wired(tmp_path):
    rec = set_up(tiny_cfg(tmp_path, rollout_correction="token_tis", beta=0.04)).train_step(0)
    assert rec["old_logprobs"] == "train"
    assert rec["rollout_is_mean"] == pytest.approx(1.0, abs=1e-3)
    assert rec["rollout_is_clipped_frac"] == 0.0
    assert rec["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference equals the policy before the first update


# ---- resume -----------------------------------------------------------------------------------------------
def test_resume_continues_exactly(tmp_path):
    cfg = tiny_cfg(tmp_path / "a")
    cfg.train.steps, cfg.train.save_every, cfg.train.keep_last = 4, 2, 5
    full = []
    run(cfg, rewards=[low_id_share], on_step_end=lambda s, r: full.append(r))

    cfg_b = tiny_cfg(tmp_path / "b", prompts=tmp_path / "a" / "prompts.jsonl")
    cfg_b.train.steps, cfg_b.train.save_every, cfg_b.train.resume = 4, 2, "auto"
    ckpt = Path(cfg.train.run_dir) / "checkpoints" / "step_00000002"
    shutil.copytree(ckpt, Path(cfg_b.train.run_dir) / "checkpoints" / ckpt.name)
    resumed = []
    run(cfg_b, rewards=[low_id_share], on_step_end=lambda s, r: resumed.append(r))
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["reward_mean"] for r in resumed] == [r["reward_mean"] for r in full[2:]]
    a = load_file(Path(cfg.train.run_dir) / "checkpoints" / "step_00000004" / "model" / "model.safetensors")
    b = load_file(Path(cfg_b.train.run_dir) / "checkpoints" / "step_00000004" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- config -----------------------------------------------------------------------------------------------
def test_shipped_configs_load_with_stage_defaults():
    tiny = load_grpo_config(REPO / "configs" / "grpo_tiny.yaml", ["--grpo.group_size", "6"])
    assert tiny.grpo.group_size == 6 and tiny.grpo.loss_type == "dapo" and tiny.balance.freeze
    small = load_grpo_config(REPO / "configs" / "grpo_small.yaml")
    assert small.optim.lr == 1e-6 and small.grpo.epsilon_high == 0.28 and small.grpo.beta == 0.0
    assert small.grpo.routing_replay and small.loss.mtp_weight == 0 and small.loss.z_loss_coef == 0


@pytest.mark.parametrize("override, message", [
    (["--grpo.loss_type", "ppo"], "grpo.loss_type"),
    (["--grpo.group_size", "1"], "grpo.group_size"),
    (["--grpo.rollout_correction", "token_tis", "--grpo.temperature", "0.7"], "grpo.rollout_correction"),
    (["--loss.z_loss_coef", "1e-3"], "loss.z_loss_coef"),
    (["--grpo.nonsense", "1"], "grpo.nonsense"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(RunConfigError, match=message):
        load_grpo_config(REPO / "configs" / "grpo_tiny.yaml", override)


@pytest.mark.slow
def test_cli_runs_the_tiny_config(tmp_path):
    from angelmed.train.cli import main

    rc = main(["grpo", "--config", str(REPO / "configs" / "grpo_tiny.yaml"), "--train.steps", "1",
               "--train.run_dir", str(tmp_path / "run"), "--train.progress", "false", "--grpo.eval_size", "2"])
    assert rc == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 1


# ---- truncation, overlong, aggregation modes, bf16 rollout copy ------------------------------------------
def test_truncated_completions_masked_and_overlong_penalised(tmp_path):
    tr = set_up(tiny_cfg(tmp_path, mask_truncated_completions=True, overlong_penalty=True, overlong_buffer=8))
    ro = tr.rollout(0)
    kept = ro["kept"]
    lengths = torch.tensor([len(c.completion_ids) for c in kept], dtype=torch.float32)
    # DAPO soft punishment with L_max 16, buffer 8: -(len - 8) / 8 beyond 8 tokens, -1 at 16
    expected = -((lengths - 8).clamp(min=0) / 8).clamp(max=1)
    assert torch.allclose(ro["per"]["overlong"], expected)
    assert torch.allclose(ro["total"], ro["per"]["low_id_share"] + expected)
    adv = tr.advantages(ro["total"], ro["per"])
    rec = tr._update(kept, adv)
    assert rec["active_tokens"] == sum(len(c.completion_ids) for c in kept if not c.truncated)


def test_normalize_then_sum_and_seq_mis_run(tmp_path):
    def half(prompts, completions, completion_ids, **kw):
        return [None if i % 3 == 0 else float(ids[0] % 2) for i, ids in enumerate(completion_ids)]

    cfg = tiny_cfg(tmp_path, reward_aggregation="normalize_then_sum", rollout_correction="seq_mis")
    tr = set_up(cfg, [low_id_share, ("half", half, 0.5)])
    rec = tr.train_step(0)
    assert rec["reward/half/none_frac"] == pytest.approx(11 / 32)
    assert rec["rollout_masked_frac"] == 0.0  # fp32 rollout = training forward: no sequence leaves [1/2, 2]
    assert rec["advantage_std"] == pytest.approx(1.0, abs=0.05)  # GDPO normalises over the batch


def test_bf16_training_rolls_out_from_a_synced_copy(tmp_path):
    from angelmed.train import dist as tdist

    cfg = tiny_cfg(tmp_path)
    cfg.train.precision = "bf16"
    tr = set_up(cfg)
    try:
        assert tr.rollout_model is not tr.model
        assert next(tr.rollout_model.parameters()).dtype == torch.bfloat16
        rec = tr.train_step(0)
        tr._sync_rollout_weights()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        master = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True))
        copy = tr.rollout_model.state_dict()
        assert all(torch.equal(copy[k], v.to(copy[k].dtype)) for k, v in master.items())
        assert abs(rec["ratio_mean"] - 1) < 0.05 and rec["routing_disagree"] < 0.1
    finally:
        tdist.cleanup(tr.info)

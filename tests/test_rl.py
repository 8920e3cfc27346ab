"""rl stage: GRPO's pieces against hand-computed values, the stage end to end on a tiny model,
kill-and-resume, and one step on a tiny Gemma4 with an NF4 base."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_MODELS, save_model_dir, tree_sha256
from safetensors.torch import load_file
from test_sft import build_inputs, run_stage, sft_params

from nla_repro import config as C
from nla_repro.models import load_base
from nla_repro.nla import ActivationVerbalizer, build_ar, load_ar, load_av, lora, save_adapter
from nla_repro.templates import format_explanation, load_template
from nla_repro.training import grpo
from nla_repro.training import run as training_run

# Groups of 4 and 16 new tokens: the tiny SFT AV rarely writes EOS (12 of 200 samples ended
# within 24 tokens), so with groups of 2 and 8 tokens most draws left every group flat (all
# -2.0, no gradient); here some group mixes a finished rollout with failed ones.
RL_SMALL = C.RLConfig(
    group_size=4,
    vectors_per_step=4,
    max_steps=4,
    save_interval=2,
    eval_interval=2,
    val_rows=4,
    max_new_tokens=16,
    micro_batch=2,
    av_lr=1e-2,
    ar_lr=1e-2,
    warmup_steps=1,
)


def rl_params(**rl) -> C.Params:
    return replace(sft_params(), rl=replace(RL_SMALL, **rl))


# --- the pieces ---------------------------------------------------------------------------


def test_group_advantages_match_hand_computed_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv, flat = grpo.group_advantages(rewards, group_size=4, eps=0.0)
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std of 1..4
    expected = [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    assert flat == 1  # the group of equal rewards: no gradient, and counted
    adv_eps, _ = grpo.group_advantages(rewards, group_size=4, eps=1.0)
    torch.testing.assert_close(adv_eps[:4], torch.tensor(expected[:4]).double() * std / (std + 1))
    two, flat2 = grpo.group_advantages(torch.tensor([0.0, 1.0, -2.0, -2.0]), 2, 1e-4)
    assert flat2 == 1 and two[2:].eq(0).all() and two[0] < 0 < two[1]


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.log_softmax(torch.randn(3, 7), dim=-1)
    assert torch.equal(grpo.k3_kl(logp, logp), torch.zeros_like(logp))
    other = torch.log_softmax(torch.randn(3, 7), dim=-1)
    kl = grpo.k3_kl(logp, other)
    assert (kl[logp != other] > 0).all()
    # exp(d) - d - 1 at d = ref - logp = 1
    assert grpo.k3_kl(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.e - 2)


@pytest.mark.parametrize(
    ("text", "finished", "formatted", "why"),
    [
        ("a flood in town", True, False, None),
        ("", True, False, "empty"),
        ("   ", True, False, "empty"),
        ("...!", True, False, "unparseable"),
        ("a flood in town that goes on", False, False, "truncated"),
        (format_explanation(["rain", "final token: town"]), True, True, None),
        ("a flood in town", True, True, "unparseable"),
    ],
)
def test_failed_rollouts_score_as_an_orthogonal_reconstruction(text, finished, formatted, why):
    assert grpo.rollout_failure(text, finished, formatted) == why
    mse = torch.tensor([0.3])
    r = grpo.rewards(mse, [why], "mse")
    assert r.item() == pytest.approx(-2.0 if why else -0.3)
    r_log = grpo.rewards(mse, [why], "log_mse")
    assert r_log.item() == pytest.approx(-math.log(2.0) if why else -math.log(0.3))


def test_policy_loss_pushes_up_the_rollout_with_the_positive_advantage():
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    logp_all = torch.log_softmax(logits, dim=-1)
    tokens = torch.tensor([[1, 2, 3], [1, 2, 3]])
    logp = logp_all.gather(-1, tokens[..., None])[..., 0]
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, kl = grpo.policy_loss(logp, logp.detach(), mask, torch.tensor([1.0, -1.0]), 0.01)
    assert torch.equal(kl, torch.zeros(2))
    loss.backward()
    # Gradient descent raises the first rollout's tokens' logits and lowers the second's.
    assert (logits.grad[0].gather(-1, tokens[0][:, None]) < 0).all()
    assert (logits.grad[1].gather(-1, tokens[1][:, None]) > 0).all()


# --- the stage ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_done(tmp_path_factory) -> Path:
    """Inputs and a trained SFT pair, as the rl stage finds them."""
    import os

    root = tmp_path_factory.mktemp("rl_inputs")
    build_inputs(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_stage("sft_av", rl_params()) == 0
        assert run_stage("sft_ar", rl_params()) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def repo(sft_done, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(sft_done, root)
    monkeypatch.chdir(root)
    return root


def test_rl_stage_writes_a_loadable_pair_curves_and_metrics(repo):
    assert run_stage("rl", rl_params()) == 0
    for role in ("av", "ar"):
        meta = yaml.safe_load((C.RL_DIR / role / "nla_meta.yaml").read_text())
        assert meta["stage"] == "rl" and meta["rl_step"] == 4
        assert meta["model"] == f"nla-{role}-rl"
        assert set(meta["sft_files_sha256"]) >= {"adapter_model.safetensors"}
    # Only the policy adapter is published, never the frozen reference copy.
    weights = load_file(C.RL_AV_DIR / "adapter_model.safetensors")
    assert weights and not any(grpo.REFERENCE_ADAPTER in k for k in weights)
    sft = load_file(C.AV_DIR / "adapter_model.safetensors")
    assert weights.keys() == sft.keys()
    assert any(not torch.equal(weights[k], sft[k]) for k in sft)  # RL moved the policy
    av = load_av(C.RL_AV_DIR, C.BASE_DIR, device="cpu")
    ar = load_ar(C.RL_AR_DIR, C.BASE_DIR, device="cpu")
    assert av.generate(torch.randn(2, 32), 4) and ar.predict(["a flood"]).shape == (1, 32)
    curve = pd.read_csv(C.RL_DIR / "train_curve.csv")
    assert curve["step"].tolist() == [1, 2, 3, 4]
    for column in ("reward_mean", "reward_std", "kl", "length", "failed", "lr"):
        assert curve[column].notna().all(), column
    # The AR trains on the valid rollouts: a step where all failed has no AR loss.
    assert curve["ar_loss"].notna().tolist() == (curve["failed"] < 1).tolist()
    assert curve["kl"].iloc[0] == 0.0  # step 0's policy is the SFT policy
    assert (curve["reward_mean"] >= -2.0).all() and (curve["reward_mean"] <= 0).all()
    val = pd.read_csv(C.RL_DIR / "val_curve.csv")
    assert val["step"].tolist() == [0, 2, 4]
    metrics = json.loads(C.RL_METRICS.read_text())
    per_step = RL_SMALL.vectors_per_step * RL_SMALL.group_size
    assert (
        metrics["rollouts"] == per_step * 4 and metrics["groups"] == RL_SMALL.vectors_per_step * 4
    )
    assert 0 <= metrics["flat_groups"] < metrics["groups"]  # some group had a gradient
    assert metrics["val_at_start"]["step"] == 0 and metrics["val_at_release"]["step"] == 4


def test_frozen_ar_keeps_the_sft_ar(repo):
    assert run_stage("rl", rl_params(train_ar=False)) == 0
    rl_ar = load_file(C.RL_AR_DIR / "adapter_model.safetensors")
    sft_ar = load_file(C.AR_DIR / "adapter_model.safetensors")
    assert all(torch.equal(rl_ar[k], sft_ar[k]) for k in sft_ar)
    assert pd.read_csv(C.RL_DIR / "train_curve.csv")["ar_loss"].isna().all()


def test_kill_and_resume_gives_bit_equal_adapters(repo):
    params = rl_params()
    assert run_stage("rl", params) == 0
    full, full_metrics = tree_sha256(C.RL_DIR), C.RL_METRICS.read_bytes()
    shutil.rmtree(C.RL_DIR)
    save = training_run.TrainingRun.save

    def crash_after_2(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            raise RuntimeError("simulated crash")

    training_run.TrainingRun.save = crash_after_2
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_stage("rl", params)
    finally:
        training_run.TrainingRun.save = save
    assert not (C.RL_AV_DIR / "adapter_model.safetensors").exists()
    steps = []
    real = grpo.GRPOTrainer.step
    grpo.GRPOTrainer.step = lambda self, s: steps.append(s) or real(self, s)
    try:
        assert run_stage("rl", params) == 0
    finally:
        grpo.GRPOTrainer.step = real
    assert steps == [2, 3]  # resumed after the step-2 checkpoint
    assert tree_sha256(C.RL_DIR) == full  # weights, optimizer, RNG, curves, sidecars
    assert C.RL_METRICS.read_bytes() == full_metrics


def test_rl_refuses_a_prefix_av(repo, capsys):
    params = replace(rl_params(), av=replace(rl_params().av, kind="prefix"))
    assert run_stage("rl", params) != 0
    assert "injection AV" in capsys.readouterr().err


# --- one step on a tiny Gemma4 with an NF4 base -------------------------------------------


def test_one_rl_step_on_a_tiny_gemma4_with_nf4_on_cpu(tmp_path):
    base_dir = save_model_dir(TINY_MODELS["gemma4_causal"](width=64), tmp_path / "base")
    cfg = C.AVConfig(lora_r=4, lora_dropout=0.0)
    model, tok = load_base(base_dir, "nf4", "float32", "cpu")
    av = ActivationVerbalizer(lora(model, cfg, False), tok, load_template("av.v1"), None, 48)
    assert "Linear4bit" in {type(m).__name__ for m in av.model.modules()}
    save_adapter(av.model, tmp_path / "sft_av")
    av.model.load_adapter(tmp_path / "sft_av", adapter_name=grpo.REFERENCE_ADAPTER)
    av.model.set_adapter(grpo.POLICY_ADAPTER)
    ar_model, ar_tok = load_base(base_dir, "nf4", "float32", "cpu")
    ar = build_ar(ar_model, ar_tok, load_template("ar.v1"), C.ARConfig(lora_r=4), 2)
    before = {k: v.clone() for k, v in av.named_parameters() if v.requires_grad}
    trainer = grpo.GRPOTrainer(
        av, ar, torch.randn(4, 64), torch.randn(2, 64), replace(RL_SMALL, av_lr=1e-1), False
    )
    result = trainer.step(0)
    assert result.row["kl"] == 0.0 and math.isfinite(result.row["reward_mean"])
    assert result.tokens > 0
    trainer.step(1)  # step 0 is warmup at lr 0.5 * av_lr; step 1 moves the weights for sure
    after = dict(av.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The reference adapter is still the SFT adapter.
    ref = {k: v for k, v in av.model.state_dict().items() if grpo.REFERENCE_ADAPTER in k}
    saved = load_file(tmp_path / "sft_av" / "adapter_model.safetensors")
    assert len(ref) == len(saved)
    for key, value in saved.items():
        live = key.replace(".weight", f".{grpo.REFERENCE_ADAPTER}.weight")
        assert torch.equal(ref[live], value)


def test_a_response_holding_the_marker_is_scored_with_the_vector_at_the_prompt_only(tmp_path):
    save_model_dir(TINY_MODELS["llama"](), tmp_path / "base")
    model, tok = load_base(tmp_path / "base", device="cpu")
    av = ActivationVerbalizer(
        lora(model, C.AVConfig(lora_r=4), False), tok, load_template("av.v1"), None, 48
    )
    eos = tok.eos_token_id
    marker = av.marker.token_id
    vectors = torch.randn(2, 32)
    logp, mask = av.response_logprobs([[5, marker, 6, eos], [7, eos]], vectors)
    assert mask.sum().item() == 6 and torch.isfinite(logp).all()
    # The vector changes the scores (it is injected), the second marker is read as a token.
    other, _ = av.response_logprobs([[5, marker, 6, eos], [7, eos]], torch.randn(2, 32))
    assert not torch.allclose(logp[mask], other[mask])

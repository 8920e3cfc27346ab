"""sft_av / sft_ar stages: checkpoints, release step, resume, curves, memory levers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import peft
import pytest
import torch
import yaml
from conftest import save_model_dir, tiny_llama, tree_sha256, write_corpus
from safetensors.torch import load_file

from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.io import sha256_file
from nla_repro.models import load_base
from nla_repro.nla import ActivationVerbalizer, load_ar, load_av, lora
from nla_repro.stages import extract, label
from nla_repro.templates import load_template
from nla_repro.training import run as training_run
from nla_repro.training import sft as trainer

TEXTS = [
    f"Note {i}: the {w} river floods the town after rain."
    for i, w in enumerate("abcdefghijklmnopqrstuvwx")
]


def sft_params(width: int = 32, **av_ar) -> C.Params:
    small = dict(
        lora_r=4,
        lora_alpha=8.0,
        micro_batch=2,
        max_steps=6,
        save_interval=2,
        eval_interval=2,
        warmup_steps=1,
        max_length=48,
        lr=1e-2,
    )
    av = replace(C.AVConfig(**small), **av_ar.pop("av", {}))
    ar = replace(C.ARConfig(**small), **av_ar.pop("ar", {}))
    base = replace(C.BaseConfig(device="cpu"), **av_ar.pop("base", {}))
    return replace(
        C.Params(),
        base=base,
        extract=C.ExtractConfig(layer=2, max_length=32, batch_size=8),
        label=C.LabelConfig(mode="source_text"),
        av=av,
        ar=ar,
    )


def build_inputs(root: Path, width: int = 32) -> None:
    """models/base, corpus, activations and source_text labels, as the stages write them."""
    save_model_dir(tiny_llama(n_layers=4, width=width), root / C.BASE_DIR)
    write_corpus(root, TEXTS)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = sft_params()
        extract.run(params, work_root=root / C.WORK_DIR)
        label.run(params, chunk_root=root / C.LABEL_CHUNKS_DIR)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_inputs")
    build_inputs(root)
    return root


@pytest.fixture
def repo(inputs, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(inputs, root)
    monkeypatch.chdir(root)
    return root


def run_stage(stage: str, params: C.Params) -> int:
    Path("params.yaml").write_text(C.dump_params(params))
    return main([stage])


def test_inputs_have_rows_in_train_and_val(inputs):
    labels = pd.read_parquet(inputs / C.LABELS_PATH)
    counts = labels["split"].value_counts()
    assert counts["train"] >= 8 and counts["val"] >= 2


def test_sft_av_writes_checkpoints_release_curves_and_a_peft_adapter(repo):
    assert run_stage("sft_av", sft_params()) == 0
    ckpts = sorted(p.name for p in (C.AV_DIR / "checkpoints").iterdir())
    assert ckpts == ["step_2", "step_4", "step_6"]
    assert not (C.AV_DIR / "README.md").exists()  # PEFT's placeholder card is not shipped
    # Only the newest checkpoint keeps the optimizer state.
    assert [p.name for p in (C.AV_DIR / "checkpoints").glob("*/optimizer.pt")] == ["optimizer.pt"]
    assert (C.AV_DIR / "checkpoints/step_6/optimizer.pt").exists()
    meta = yaml.safe_load((C.AV_DIR / "nla_meta.yaml").read_text())
    assert meta["step"] == 6 and meta["layer"] == 2 and meta["d_model"] == 32
    assert meta["av"]["kind"] == "injection" and meta["av"]["marker_token_id"] >= 0
    assert set(meta["inputs_sha256"]) == {str(C.LABELS_PATH), str(C.ACTIVATIONS_PATH)}
    assert meta["templates"]["av"]["version"] == "av.v1"
    assert meta["validation"]["step"] == 6

    val = pd.read_csv(C.AV_DIR / "val_curve.csv")
    assert val["step"].tolist() == [0, 2, 4, 6]
    gap = val["val_loss_shuffled"] - val["val_loss"]
    assert (val["vector_use_gap"] - gap).abs().max() < 1e-9
    train = pd.read_csv(C.AV_DIR / "train_curve.csv")
    assert train["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert train["loss"].iloc[-1] < train["loss"].iloc[0]
    metrics = json.loads(C.SFT_METRICS["av"].read_text())
    assert metrics["released_step"] == 6 and metrics["val_at_start"]["step"] == 0

    # The released folder is a plain PEFT adapter.
    base, _ = load_base(C.BASE_DIR, device="cpu")
    reloaded = peft.PeftModel.from_pretrained(base, C.AV_DIR)
    state = load_file(C.AV_DIR / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    assert reloaded.peft_config["default"].r == 4


def test_release_step_publishes_that_checkpoint(repo):
    assert run_stage("sft_av", sft_params(av={"release_step": 4})) == 0
    released = load_file(C.AV_DIR / "adapter_model.safetensors")
    step4 = load_file(C.AV_DIR / "checkpoints/step_4/adapter_model.safetensors")
    step6 = load_file(C.AV_DIR / "checkpoints/step_6/adapter_model.safetensors")
    assert all(torch.equal(released[k], step4[k]) for k in step4)
    assert not all(torch.equal(released[k], step6[k]) for k in step6)
    assert yaml.safe_load((C.AV_DIR / "nla_meta.yaml").read_text())["step"] == 4


def test_sft_ar_writes_head_and_content_gap(repo):
    assert run_stage("sft_ar", sft_params()) == 0
    head = load_file(C.AR_DIR / "head.safetensors")
    assert head["weight"].shape == (32, 32)
    assert not torch.equal(head["weight"], torch.eye(32))  # the head trained
    meta = yaml.safe_load((C.AR_DIR / "nla_meta.yaml").read_text())
    assert meta["ar_num_layers"] == 3 and "Summary of the following text" in str(meta["templates"])
    val = pd.read_csv(C.AR_DIR / "val_curve.csv")
    assert {"val_mse", "val_mse_empty", "content_gap"} <= set(val.columns)
    assert val["val_mse"].iloc[-1] < val["val_mse"].iloc[0]


def test_prefix_av_stage_saves_projection_and_prefix(repo):
    assert run_stage("sft_av", sft_params(av={"kind": "prefix", "n_prefix": 3})) == 0
    tensors = load_file(C.AV_DIR / "prefix.safetensors")
    assert tensors["prefix"].shape == (3, 32) and tensors["proj.weight"].shape == (32, 32)
    assert not (C.AV_DIR / "adapter_model.safetensors").exists()
    assert yaml.safe_load((C.AV_DIR / "nla_meta.yaml").read_text())["av"]["kind"] == "prefix"


@pytest.mark.parametrize("kind", ["injection", "prefix"])
def test_released_folders_load_back_and_reproduce_the_last_validation(repo, kind):
    params = sft_params(av={"kind": kind})
    assert run_stage("sft_av", params) == 0 and run_stage("sft_ar", params) == 0
    _, pairs = trainer.stage_run(params, "av", C.AV_DIR, {})
    texts, vectors = pairs["val"]
    av_last = pd.read_csv(C.AV_DIR / "val_curve.csv").iloc[-1]
    ar_last = pd.read_csv(C.AR_DIR / "val_curve.csv").iloc[-1]
    av = load_av(C.AV_DIR, C.BASE_DIR, device="cpu")
    ar = load_ar(C.AR_DIR, C.BASE_DIR, device="cpu")
    assert av.kind == kind and not av.training
    assert av.validation(texts, vectors, 2)["val_loss"] == pytest.approx(av_last["val_loss"], 1e-5)
    assert ar.validation(texts, vectors, 2)["val_mse"] == pytest.approx(ar_last["val_mse"], 1e-5)
    assert len(av.generate(vectors[:2], max_new_tokens=4)) == 2


def test_loading_refuses_a_changed_prompt(repo, monkeypatch):
    assert run_stage("sft_ar", sft_params()) == 0
    meta = yaml.safe_load((C.AR_DIR / "nla_meta.yaml").read_text())
    meta["templates"]["ar"]["sha256"] = "0" * 64
    (C.AR_DIR / "nla_meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(C.ConfigError, match=r"prompt ar\.v1 changed"):
        load_ar(C.AR_DIR, C.BASE_DIR, device="cpu")


@pytest.mark.parametrize(("stage", "out"), [("sft_av", C.AV_DIR), ("sft_ar", C.AR_DIR)])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(repo, stage, out):
    params = sft_params(av={"lora_dropout": 0.1}, ar={"lora_dropout": 0.1})
    assert run_stage(stage, params) == 0
    full, full_metrics = tree_sha256(out), C.SFT_METRICS[stage[4:]].read_bytes()
    shutil.rmtree(out)
    # Crash right after the step-4 checkpoint, as a kill would.
    save = training_run.TrainingRun.save

    def crash_after_4(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 4:
            raise RuntimeError("simulated crash")

    training_run.TrainingRun.save = crash_after_4
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_stage(stage, params)
    finally:
        training_run.TrainingRun.save = save
    assert not list(out.glob("*.safetensors"))
    calls = []
    real = trainer.BatchOrder.__call__
    trainer.BatchOrder.__call__ = lambda self, g: calls.append(g) or real(self, g)
    try:
        assert run_stage(stage, params) == 0
    finally:
        trainer.BatchOrder.__call__ = real
    assert min(calls) == 4 * params.av.grad_accum  # steps 1..4 were not redone
    # Every byte equal: weights, optimizer and RNG state, curves, history, sidecar, metrics.
    # A clock value (tokens/s, wall time) in any of them would break DVC's hashes per rebuild.
    assert tree_sha256(out) == full
    assert C.SFT_METRICS[stage[4:]].read_bytes() == full_metrics
    train = pd.read_csv(out / "train_curve.csv")
    assert train["step"].tolist() == [1, 2, 3, 4, 5, 6]
    times = [json.loads(line) for line in C.STAGE_TIMES.read_text().splitlines()]
    assert [t["stage"] for t in times] == [stage, stage]  # the crashed run recorded nothing
    assert times[-1]["steps_this_run"] == 2 and times[-1]["tokens_per_s_median"] > 0
    assert times[-1]["peak_rss_mb"] > 100  # this process loaded torch and a model


def test_changed_training_code_discards_stale_checkpoints(repo, monkeypatch):
    code = repo / "fake_module.py"
    code.write_text("x = 1\n")
    monkeypatch.setattr(trainer, "code_sha256", lambda stage: {"fake_module.py": sha256_file(code)})
    assert run_stage("sft_ar", sft_params()) == 0
    before = yaml.safe_load((C.AR_DIR / "checkpoints/step_2/nla_meta.yaml").read_text())
    code.write_text("x = 2\n")
    assert run_stage("sft_ar", sft_params()) == 0
    after = yaml.safe_load((C.AR_DIR / "checkpoints/step_2/nla_meta.yaml").read_text())
    assert after["fingerprint"] != before["fingerprint"]
    assert after["code_sha256"] != before["code_sha256"]


def test_changed_params_discard_stale_checkpoints(repo):
    assert run_stage("sft_ar", sft_params()) == 0
    old = (C.AR_DIR / "checkpoints/step_6/nla_meta.yaml").read_text()
    assert run_stage("sft_ar", sft_params(ar={"lr": 5e-3, "max_steps": 4})) == 0
    assert sorted(p.name for p in (C.AR_DIR / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert (C.AR_DIR / "checkpoints/step_4/nla_meta.yaml").read_text() != old


SLOW_SFT = """
import sys, time
from nla_repro.training.run import TrainingRun
save = TrainingRun.save
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(1.0)
TrainingRun.save = slow_save
from nla_repro.__main__ import main
sys.exit(main(["sft_av"]))
"""


@pytest.mark.slow
def test_kill_9_between_checkpoints_then_rerun_equals_uninterrupted(inputs, tmp_path):
    params = sft_params(av={"lora_dropout": 0.1, "max_steps": 8})
    roots = {}
    for name in ("clean", "killed"):
        roots[name] = tmp_path / name
        shutil.copytree(inputs, roots[name])
        (roots[name] / "params.yaml").write_text(C.dump_params(params))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "nla_repro", "sft_av"]
    subprocess.run(cmd, cwd=roots["clean"], env=env, check=True, capture_output=True)

    proc = subprocess.Popen([sys.executable, "-c", SLOW_SFT], cwd=roots["killed"], env=env)
    ckpts = roots["killed"] / C.AV_DIR / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts / "step_4").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in ckpts.glob("step_*"))
    assert "step_4" in done and "step_8" not in done, done
    assert not (roots["killed"] / C.AV_DIR / "adapter_model.safetensors").exists()
    subprocess.run(cmd, cwd=roots["killed"], env=env, check=True, capture_output=True)

    def weights(root):
        return load_file(root / C.AV_DIR / "adapter_model.safetensors")

    clean, resumed = weights(roots["clean"]), weights(roots["killed"])
    assert clean.keys() == resumed.keys()
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


def test_nf4_av_trains_saves_and_reloads_on_cpu(tmp_path):
    save_model_dir(tiny_llama(width=64), tmp_path / "base")
    model, tok = load_base(tmp_path / "base", "nf4", "float32", "cpu")
    cfg = C.AVConfig(lora_r=4, lora_dropout=0.0, unfreeze_norms=True)
    av = ActivationVerbalizer(lora(model, cfg, True), tok, load_template("av.v1"), None, 48)
    assert type(av.model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == (
        "Linear4bit"
    )
    opt = torch.optim.AdamW([p for p in av.parameters() if p.requires_grad], lr=1e-2)
    texts, vecs = ["a flood in town", "bees"], torch.randn(2, 64)
    losses = []
    for _ in range(4):
        loss = av(texts, vecs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    av.eval()
    av.save(tmp_path / "adapter")
    fresh, _ = load_base(tmp_path / "base", "nf4", "float32", "cpu")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, av.model(input_ids=ids).logits, atol=1e-4, rtol=0
        )


def test_nf4_stage_with_checkpointing_and_8bit_adam(tmp_path, monkeypatch):
    build_inputs(tmp_path, width=64)
    monkeypatch.chdir(tmp_path)
    levers = {"gradient_checkpointing": True, "optimizer": "adamw8bit", "max_steps": 2}
    params = sft_params(av=levers, ar=levers, base={"quantization": "nf4"})
    assert run_stage("sft_av", params) == 0
    assert run_stage("sft_ar", params) == 0
    for out in (C.AV_DIR, C.AR_DIR):
        meta = yaml.safe_load((out / "nla_meta.yaml").read_text())
        assert meta["quantization"] == "nf4" and meta["optimizer"] == "adamw8bit"


def test_8bit_adam_falls_back_to_adamw_with_a_note(monkeypatch, caplog):
    import bitsandbytes as bnb

    def unsupported(*args, **kwargs):
        raise RuntimeError("no 8-bit kernels for this device")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", unsupported)
    p = torch.nn.Parameter(torch.zeros(3))
    with caplog.at_level(logging.WARNING):
        opt, name = trainer.make_optimizer([p], C.AVConfig(optimizer="adamw8bit"), p.device)
    assert name == "adamw" and isinstance(opt, torch.optim.AdamW)
    assert "8-bit AdamW unavailable" in caplog.text


def test_lr_schedules():
    cfg = C.ARConfig(lr=1e-4, min_lr=3e-5, lr_schedule="step", warmup_steps=2, max_steps=10)
    lrs = [cfg.lr * trainer.lr_factor(s, cfg) for s in range(10)]
    assert lrs[:2] == pytest.approx([5e-5, 1e-4])
    assert lrs[4] == pytest.approx(1e-4) and lrs[5:] == pytest.approx([3e-5] * 5)
    cos = replace(cfg, lr_schedule="cosine", warmup_steps=0)
    assert trainer.lr_factor(0, cos) == pytest.approx(1.0)
    assert trainer.lr_factor(10, cos) * cos.lr == pytest.approx(3e-5)
    lin = replace(cos, lr_schedule="linear")
    assert trainer.lr_factor(5, lin) * lin.lr == pytest.approx((1e-4 + 3e-5) / 2)


def test_batch_order_is_seeded_and_covers_each_epoch_once():
    order = trainer.BatchOrder(10, 3, seed=1)
    first_epoch = [i for g in range(3) for i in order(g)] + order(3)[:1]
    assert sorted(first_epoch) == list(range(10))
    assert [order(g) for g in range(6)] == [trainer.BatchOrder(10, 3, 1)(g) for g in range(6)]
    assert order(0) != trainer.BatchOrder(10, 3, seed=2)(0)


def test_no_training_rows_is_a_clear_error(repo, capsys):
    labels = pd.read_parquet(C.LABELS_PATH)
    labels["status"] = "rejected"
    labels["explanation"] = ""
    labels.to_parquet(C.LABELS_PATH, index=False)
    assert run_stage("sft_ar", sft_params()) == 2
    assert "no training rows" in capsys.readouterr().err
    assert not C.AR_DIR.exists()


def test_release_step_must_be_a_checkpoint():
    with pytest.raises(C.ConfigError, match=r"av\.release_step=5"):
        C.params_from_dict({"av": {"max_steps": 10, "save_interval": 4, "release_step": 5}})
    with pytest.raises(C.ConfigError, match=r"ar\.num_layers=2"):
        C.params_from_dict({"extract": {"layer": 4}, "ar": {"num_layers": 2}})


class _Stub(torch.nn.Module):
    def __init__(self, result: dict) -> None:
        super().__init__()
        self.result = result

    def validation(self, texts, vectors, batch):
        return dict(self.result)


@pytest.mark.parametrize(
    ("result", "flagged"),
    [
        ({"val_loss": 3.0, "val_loss_shuffled": 3.001, "vector_use_gap": 0.001}, "ignores"),
        ({"val_loss": 2.5, "val_loss_shuffled": 2.9, "vector_use_gap": 0.4}, None),
        ({"val_mse": 0.5, "val_mse_empty": 0.502, "content_gap": 0.002}, "content-blind"),
        ({"val_mse": 0.5, "val_mse_empty": 0.9, "content_gap": 0.4}, None),
    ],
)
def test_validation_flags_a_model_that_ignores_its_input(caplog, result, flagged):
    stub = _Stub(result).train()
    cfg = C.AVConfig()
    with caplog.at_level(logging.WARNING):
        out = trainer._validate(stub, ["x"], torch.zeros(1, 2), cfg, 10, "av")
        trainer._validate(stub, ["x"], torch.zeros(1, 2), cfg, 0, "av")  # step 0: untrained
    assert out == {"step": 10, **result} and stub.training
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == (1 if flagged else 0)
    assert not flagged or (flagged in warnings[0] and "step 10" in warnings[0])


@pytest.mark.slow
def test_two_process_accelerate_launch_trains_on_cpu(inputs, tmp_path):
    """`accelerate launch` (the multi-GPU path) with 2 CPU processes: each trains on its own
    micro-batches, gradients are averaged, only the main process writes."""
    root = tmp_path / "repo"
    shutil.copytree(inputs, root)
    params = sft_params(ar={"max_steps": 2, "save_interval": 2, "eval_interval": 2})
    (root / "params.yaml").write_text(C.dump_params(params))
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "nla_repro", "sft_ar"),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((root / C.SFT_METRICS["ar"]).read_text())
    assert metrics["released_step"] == 2 and metrics["train_rows"] >= 8
    assert (root / C.AR_DIR / "head.safetensors").exists()
    assert sorted(p.name for p in (root / C.AR_DIR / "checkpoints").iterdir()) == ["step_2"]

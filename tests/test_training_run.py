"""The shared training infrastructure (nla_repro.training.run): checkpoints and retention,
resume with RNG state, stale fingerprints, publishing, the step loop."""

from __future__ import annotations

import contextlib

import torch
import yaml
from safetensors.torch import load_file, save_file

from nla_repro.training.run import (
    OPTIMIZER_FILE,
    Retention,
    StepResult,
    TrainingRun,
    new_history,
    run_steps,
)


def tiny_run(root, retention=None, sidecar=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    run = TrainingRun("tiny", root / "out", sidecar or {"model": "tiny"}, retention or Retention())

    def save_weights(folder):
        save_file(
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            str(folder / "weights.safetensors"),
        )

    def step_fn(step):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return StepResult({"loss": loss.item()}, 4)

    return model, opt, sched, run, save_weights, step_fn


def train(root, steps, retention=None, crash_at=None):
    model, opt, sched, run, save_weights, step_fn = tiny_run(root, retention)
    history, start = new_history(), 0
    resumed = run.resume(0)
    if resumed:
        start, history = resumed.step, resumed.history
        model.load_state_dict(load_file(str(resumed.path / "weights.safetensors")))
        resumed.restore(opt, sched)

    def save(step):
        run.save(step, save_weights, history, optimizer=opt, scheduler=sched, meta={"x": 1})
        if step == crash_at:
            raise KeyboardInterrupt

    run_steps(step_fn, start=start, max_steps=steps, history=history, save=save, checkpoint_every=2)
    return model, run, history


def test_resume_with_rng_and_optimizer_ends_with_the_same_weights(tmp_path):
    clean, _, clean_history = train(tmp_path / "a", 6)
    with contextlib.suppress(KeyboardInterrupt):
        train(tmp_path / "b", 6, crash_at=4)
    resumed, run, history = train(tmp_path / "b", 6)
    for a, b in zip(clean.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert history == clean_history and [r["step"] for r in history["train"]] == [1, 2, 3, 4, 5, 6]
    meta = yaml.safe_load((run.checkpoint_dir(6) / "nla_meta.yaml").read_text())
    assert meta["step"] == 6 and meta["x"] == 1 and meta["fingerprint"] == run.fingerprint


def test_retention_keeps_all_with_optimizer_only_on_the_newest(tmp_path):
    _, run, _ = train(tmp_path, 6)
    steps = [s for s, _ in run.checkpoints()]
    assert steps == [2, 4, 6]
    assert [(run.checkpoint_dir(s) / OPTIMIZER_FILE).exists() for s in steps] == [
        False,
        False,
        True,
    ]


def test_retention_keep_last_spares_the_protected_steps(tmp_path):
    _, run, _ = train(tmp_path, 8, Retention(keep_last=1, keep_steps=frozenset({2})))
    assert [s for s, _ in run.checkpoints()] == [2, 8]


def test_checkpoints_of_another_fingerprint_are_removed_not_resumed(tmp_path):
    _, run, _ = train(tmp_path, 4)
    other = TrainingRun("tiny", run.out_dir, {"model": "tiny", "lr": 2})
    assert other.fingerprint != run.fingerprint
    assert other.resume(0) is None and not run.out_dir.exists()


def test_publish_copies_the_model_files_and_sidecar_not_the_resume_state(tmp_path):
    _, run, _ = train(tmp_path, 4)
    run.publish(4)
    top = {p.name for p in run.out_dir.iterdir() if p.is_file()}
    assert top == {"weights.safetensors", "nla_meta.yaml"}

"""The SFT trainer of the AV and the AR, on the shared training infrastructure (`run`).

The model is any module whose `forward(texts, vectors)` returns {"loss", "tokens" (tokens
read)} and that has `validation`, `save`, `load` and `describe` (`nla.verbalizer`,
`nla.reconstructor`). Data order is a pure function of (seed, micro-step), so a run resumed
from a checkpoint (weights, optimizer, scheduler, RNG state) ends with the same weights as an
uninterrupted one. Multi-process runs go through accelerate (`accelerate launch -m nla_repro
sft_av`): micro-batches are split across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.io import sha256_file, write_json
from nla_repro.metrics import MIN_GAPS
from nla_repro.models import read_base_meta
from nla_repro.nla import read_pairs, split_pairs
from nla_repro.pipeline import StageParams, code_sha256
from nla_repro.seeds import derive_seed
from nla_repro.training.run import (
    Resumed,
    Retention,
    StepResult,
    TrainingRun,
    check_finite,
    grad_norm,
    new_history,
    provenance,
    run_steps,
)

log = logging.getLogger(__name__)

NORMALIZATION = "norm(v) = v * sqrt(d) / ||v|| (fp32)"


def lr_factor(step: int, cfg: C.TrainConfig) -> float:
    """Multiplier of cfg.lr for the optimizer step with 0-based index `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "step":
        return 1.0 if step < (cfg.step_at or cfg.max_steps // 2) else floor
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    done = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * done
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


class BatchOrder:
    """Row indices of micro-batch g: a stream of seeded permutations, one per epoch."""

    def __init__(self, n_rows: int, micro_batch: int, seed: int) -> None:
        self.n, self.micro_batch, self.seed = n_rows, micro_batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def __call__(self, g: int) -> list[int]:
        items = range(g * self.micro_batch, (g + 1) * self.micro_batch)
        return [int(self._perm(k // self.n)[k % self.n]) for k in items]


def make_optimizer(params: list, cfg: C.TrainConfig, device: torch.device):
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for and it works on this device."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            probe = torch.nn.Parameter(torch.zeros(64, 64, device=device))
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe], lr=1e-3).step()
            opt = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            return opt, "adamw8bit"
        except Exception as err:
            log.warning("8-bit AdamW unavailable on %s (%s); using AdamW", device, err)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "adamw"


def _validate(model, texts, vectors, cfg: C.TrainConfig, step: int, name: str) -> dict:
    was_training = model.training
    model.eval()
    result = {"step": step, **model.validation(texts, vectors, cfg.micro_batch)}
    model.train(was_training)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")
    tqdm.write(f"{name} step {step}: {shown}")
    for key, (floor, meaning) in MIN_GAPS.items():
        if step > 0 and key in result and result[key] < floor:
            value = result[key]
            log.warning("%s step %d: %s %.4f < %s: %s", name, step, key, value, floor, meaning)
    return result


def train(
    model: torch.nn.Module,
    train_texts: list[str],
    train_vectors: torch.Tensor,
    val_texts: list[str],
    val_vectors: torch.Tensor,
    cfg: C.TrainConfig,
    run: TrainingRun,
    metrics_path: Path,
) -> dict:
    """Train (or resume) to cfg.max_steps, then publish the release checkpoint to run.out_dir
    and the summary to `metrics_path`."""
    if not train_texts:
        raise C.ConfigError(f"{run.name}: no training rows (no accepted labels in train split)")
    device = next(model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    history, start = new_history(), 0
    resumed: Resumed | None = run.resume(cfg.seed)
    if resumed:
        start, history = resumed.step, resumed.history
        model.load(resumed.path)
        resumed.restore(optimizer, scheduler)
    module, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    order = BatchOrder(len(train_texts), cfg.micro_batch, cfg.seed)
    val_texts = val_texts[: cfg.val_rows or None]
    val_vectors = val_vectors[: len(val_texts)]
    if not val_texts:
        log.warning("%s: no validation rows; validation metrics will be missing", run.name)

    def validate(step: int) -> None:
        if val_texts and accelerator.is_main_process:
            history["val"].append(_validate(model, val_texts, val_vectors, cfg, step, run.name))

    def step_fn(step: int) -> StepResult:
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            idx = order((step * cfg.grad_accum + micro) * world + rank)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(module):
                out = module([train_texts[i] for i in idx], train_vectors[idx].to(device))
                accelerator.backward(out["loss"] / cfg.grad_accum)
            loss_sum += out["loss"].item()
            tokens += out["tokens"]
        if cfg.max_grad_norm:
            norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = grad_norm(params, 0.0)
        check_finite(run.name, step, loss=loss_sum, grad_norm=norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        check_finite(run.name, step, params)
        return StepResult({"loss": loss_sum / cfg.grad_accum, "lr": lr}, tokens)

    def save(step: int) -> None:
        if accelerator.is_main_process:
            val = [v for v in history["val"] if v["step"] == step]
            loss = [t["loss"] for t in history["train"] if t["step"] == step]
            run.save(
                step,
                model.save,
                history,
                optimizer=optimizer,
                scheduler=scheduler,
                meta={
                    "train_loss": loss[0] if loss else None,
                    "validation": val[0] if val else None,
                    "optimizer": optimizer_name,
                },
            )

    if start == 0:
        validate(0)
    module.train()
    timing = run_steps(
        step_fn,
        start=start,
        max_steps=cfg.max_steps,
        history=history,
        save=save,
        checkpoint_every=cfg.save_interval,
        validate=validate,
        eval_every=cfg.eval_interval,
        desc=f"sft_{run.name}",
        barrier=accelerator.wait_for_everyone,
    )
    if not accelerator.is_main_process:
        return {}
    run.publish(cfg.released_step)
    run.write_curves(history, validation=True)
    metrics = summary(cfg, history, optimizer_name, len(train_texts), len(val_texts))
    write_json(metrics, metrics_path)
    return metrics | {"timing": timing}


def summary(cfg: C.TrainConfig, history: dict, optimizer: str, n_train: int, n_val: int):
    """metrics/sft_<name>.json: the released step's losses and validation. Nothing here
    depends on the clock, so equal inputs give byte-equal outputs."""
    step = cfg.released_step
    val_at = {v["step"]: v for v in history["val"]}
    return {
        "released_step": step,
        "max_steps": cfg.max_steps,
        "train_rows": n_train,
        "val_rows": n_val,
        "optimizer": optimizer,
        "train_loss_at_release": next(
            (t["loss"] for t in history["train"] if t["step"] == step), None
        ),
        "val_at_release": val_at.get(step),
        "val_at_start": val_at.get(0),
    }


def stage_run(
    params: StageParams, name: str, out_dir: Path, extra: dict
) -> tuple[TrainingRun, dict]:
    """The TrainingRun of an sft stage and its inputs: training pairs by split, and the
    provenance sidecar (the fields are listed in docs/concepts/sidecars.md)."""
    meta = read_base_meta(C.BASE_DIR)
    acts_meta = yaml.safe_load(C.ACTIVATIONS_META.read_text())
    d_model = int(meta["d_model"])
    cfg = getattr(params, name)
    sidecar = provenance(
        f"nla-{name}",
        meta,
        params.base,
        layer=params.extract.layer,
        d_model=d_model,
        position_rule=acts_meta["position_rule"],
        normalization=NORMALIZATION,
        params=dataclasses.asdict(cfg),
        inputs_sha256={str(p): sha256_file(p) for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH)},
        # The training code is part of what the weights depend on: checkpoints made by other
        # code are not resumed (DVC reruns the stage when these change, too).
        code_sha256=code_sha256(f"sft_{name}"),
        label_mode=params.label.mode,
        **extra,
    )
    # Every checkpoint is kept (the release step may be any of them); only the newest keeps
    # its optimizer state.
    run = TrainingRun(name, out_dir, sidecar, Retention(keep_last=None))
    return run, split_inputs(d_model, params.extract.layer)


def split_inputs(d_model: int, layer: int) -> dict[str, tuple[list[str], torch.Tensor]]:
    """(explanations, vectors) of each split: the accepted labels joined with their
    activations (extracted at `layer`), the rows both sft stages and the rl stage train on."""
    _, _, pairs = read_pairs(d_model, layer)
    return {s: split_pairs(pairs, s) for s in ("train", "val", "test")}

"""One training loop for the AV and the AR: accelerate, checkpoints, resume, validation, curves.

The loop is a plain function (nanoGPT style). The model is any module whose
`forward(texts, vectors)` returns {"loss", "tokens" (tokens read)} and that has `validation`,
`save`, `load` and `describe`. Data order is a pure function of (seed, micro-step), so a run
resumed from a checkpoint (weights, optimizer, scheduler, RNG state) ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io as _io
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.io import (
    atomic_path,
    code_commit,
    fingerprint,
    save_torch_state,
    sha256_file,
    write_json,
    write_text,
    write_yaml,
)
from nla_repro.models import read_base_meta
from nla_repro.nla import split_pairs, training_pairs
from nla_repro.schemas import LABELS, activations_schema, read_parquet

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILES = ("optimizer.pt", "trainer_state.pt")
# Validation gaps below these mean a model ignores its input (DESIGN.md "Known failure modes"):
# the AV's vector-use gap in nats (true vs shuffled vectors), the AR's content gap in mse_nrm
# (true explanation vs empty string).
MIN_GAPS = {
    "vector_use_gap": (0.02, "the AV ignores the injected vector (expect template collapse)"),
    "content_gap": (0.01, "the AR is content-blind (it scores an empty string as well)"),
}


@dataclass
class Run:
    """Where a training run writes, and what its sidecar records."""

    name: str
    """av or ar."""
    out_dir: Path
    """models/av or models/ar (a persisted DVC output: checkpoints survive a relaunch)."""
    metrics_path: Path
    """metrics/sft_<name>.json."""
    fingerprint: str
    """Hash of everything the weights depend on; checkpoints of another fingerprint are stale."""
    sidecar: dict = field(default_factory=dict)
    """DESIGN.md sidecar fields (base model, layer, normalization, inputs sha256, ...)."""


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
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
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


def checkpoint_dir(run: Run, step: int) -> Path:
    return run.out_dir / CHECKPOINTS / f"step_{step}"


def complete_checkpoints(run: Run) -> list[tuple[int, Path]]:
    """Finished checkpoints of this fingerprint, by step. Anything else in the output folder
    (another fingerprint's checkpoints and release, half-written temp folders) is removed."""
    root = run.out_dir / CHECKPOINTS
    found = []
    for path in sorted(root.glob("step_*")) if root.exists() else []:
        meta = path / "nla_meta.yaml"
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and meta.exists() and f"fingerprint: {run.fingerprint}" in meta.read_text():
            found.append((int(match.group(1)), path))
    if not found and run.out_dir.exists() and any(run.out_dir.iterdir()):
        log.info("%s: no checkpoint of these inputs and params; starting over", run.out_dir)
        shutil.rmtree(run.out_dir)
    for tmp in root.glob(".*.tmp") if root.exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(found)


def _curves_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


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
    run: Run,
) -> dict:
    """Train (or resume) to cfg.max_steps, then publish the release checkpoint to run.out_dir."""
    if not train_texts:
        raise C.ConfigError(f"{run.name}: no training rows (no accepted labels in train split)")
    device = next(model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    history: dict[str, list] = {"train": [], "val": []}
    start = 0
    checkpoints = complete_checkpoints(run)
    if checkpoints:
        start, latest = checkpoints[-1]
        model.load(latest)
        if start < cfg.max_steps:
            optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        state = torch.load(latest / "trainer_state.pt", weights_only=True)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        history = json.loads((latest / "history.json").read_text())
        log.info("%s: resuming from %s", run.name, latest)
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

    if start == 0:
        validate(0)
    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"sft_{run.name}", unit="step")
    module.train()
    started = time.perf_counter()
    rates: list[float] = []  # tokens/s of this run's steps: timing stays out of the outputs
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
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
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        rates.append(rate)
        loss = loss_sum / cfg.grad_accum
        history["train"].append({"step": done, "loss": loss, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        is_checkpoint = done % cfg.save_interval == 0 or done == cfg.max_steps
        if done % cfg.eval_interval == 0 or is_checkpoint:
            validate(done)
        if is_checkpoint and accelerator.is_main_process:
            save_checkpoint(model, optimizer, scheduler, history, run, done, optimizer_name)
        accelerator.wait_for_everyone()
    bar.close()
    timing = {
        "steps_this_run": len(rates),
        "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "train_wall_s": round(time.perf_counter() - started, 1),
    }
    if not accelerator.is_main_process:
        return {}
    return publish(run, cfg, history, optimizer_name, len(train_texts), len(val_texts)) | {
        "timing": timing
    }


def _meta(run: Run, step: int, history: dict, optimizer_name: str) -> dict:
    val = [v for v in history["val"] if v["step"] == step]
    loss = [t["loss"] for t in history["train"] if t["step"] == step]
    return {
        **run.sidecar,
        "step": step,
        "train_loss": loss[0] if loss else None,
        "validation": val[0] if val else None,
        "optimizer": optimizer_name,
        "code_commit": code_commit(),
        "fingerprint": run.fingerprint,
    }


def save_checkpoint(model, optimizer, scheduler, history, run: Run, step: int, opt_name: str):
    """checkpoints/step_N/: weights (safetensors), optimizer/scheduler/RNG state, history and
    sidecar, written under a temporary name and renamed when complete. Only the newest
    checkpoint keeps the optimizer state (the others are for release and evaluation)."""
    final = checkpoint_dir(run, step)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        model.save(tmp)
        save_torch_state(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        save_torch_state(state, tmp / "trainer_state.pt")
        (tmp / "history.json").write_text(json.dumps(history))
        write_yaml(_meta(run, step, history, opt_name), tmp / "nla_meta.yaml")
    for other in (run.out_dir / CHECKPOINTS).glob("step_*"):
        if other != final:
            (other / "optimizer.pt").unlink(missing_ok=True)


def publish(
    run: Run,
    cfg: C.TrainConfig,
    history: dict,
    optimizer_name: str,
    n_train: int,
    n_val: int,
) -> dict:
    """Copy the release checkpoint's weights and sidecar to the top of run.out_dir, write the
    loss curves for `dvc plots`, and the summary metrics. Nothing here depends on the clock, so
    equal inputs give byte-equal outputs."""
    step = cfg.released_step
    source = checkpoint_dir(run, step)
    for path in source.iterdir():
        if path.name not in (*STATE_FILES, "history.json"):
            with atomic_path(run.out_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
    write_text(_curves_csv(history["train"]), run.out_dir / "train_curve.csv")
    write_text(_curves_csv(history["val"]), run.out_dir / "val_curve.csv")
    val_at = {v["step"]: v for v in history["val"]}
    metrics = {
        "released_step": step,
        "max_steps": cfg.max_steps,
        "train_rows": n_train,
        "val_rows": n_val,
        "optimizer": optimizer_name,
        "train_loss_at_release": next(
            (t["loss"] for t in history["train"] if t["step"] == step), None
        ),
        "val_at_release": val_at.get(step),
        "val_at_start": val_at.get(0),
    }
    write_json(metrics, run.metrics_path)
    return metrics


PACKAGE = Path(__file__).resolve().parent


def code_files(name: str) -> list[Path]:
    """The modules an sft stage's weights depend on (its dvc.yaml code deps)."""
    prompt = {"av": "av.v1.yaml", "ar": "ar.v1.yaml"}[name]
    modules = ("nla.py", "trainer.py", "models.py", "metrics.py", "templates.py", "schemas.py")
    return [
        PACKAGE / f"stages/sft_{name}.py",
        *(PACKAGE / m for m in modules),
        PACKAGE / "prompts" / prompt,
    ]


def stage_run(params: C.Params, name: str, out_dir: Path, extra: dict) -> tuple[Run, dict]:
    """The Run of an sft stage and its inputs: training pairs by split, and the sidecar
    fields shared by AV and AR (DESIGN.md "Sidecar")."""
    meta = read_base_meta(C.BASE_DIR)
    acts_meta = (
        yaml.safe_load(C.ACTIVATIONS_META.read_text()) if C.ACTIVATIONS_META.exists() else {}
    )
    d_model = int(meta["d_model"])
    labels = read_parquet(C.LABELS_PATH, LABELS)
    acts = read_parquet(C.ACTIVATIONS_PATH, activations_schema(d_model))
    pairs = training_pairs(labels, acts, d_model, f"{C.LABELS_PATH} x {C.ACTIVATIONS_PATH}")
    cfg = getattr(params, name)
    inputs = {str(p): sha256_file(p) for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH)}
    sidecar = {
        "model": f"nla-{name}",
        "base_model": meta["source"]["name"],
        "base_source": meta["source"],
        "architecture": meta["architecture"],
        "d_model": d_model,
        "layer": params.extract.layer,
        "hidden_states_index": params.extract.layer + 1,
        "position_rule": acts_meta.get("position_rule", params.extract.positions),
        "normalization": "norm(v) = v * sqrt(d) / ||v|| (fp32)",
        "quantization": params.base.quantization,
        "compute_dtype": params.base.compute_dtype,
        **extra,
        "params": dataclasses.asdict(cfg),
        "label_mode": params.label.mode,
        "inputs_sha256": inputs,
        "base_files_sha256": meta["files"],
        # The training code is part of what the weights depend on: checkpoints made by other
        # code are not resumed (DVC reruns the stage when these change, too).
        "code_sha256": {
            str(path.relative_to(PACKAGE.parent)): sha256_file(path) for path in code_files(name)
        },
    }
    run = Run(
        name=name,
        out_dir=out_dir,
        metrics_path=C.SFT_METRICS[name],
        fingerprint=fingerprint(sidecar)[:32],
        sidecar=sidecar,
    )
    return run, {s: split_pairs(pairs, s) for s in ("train", "val", "test")}

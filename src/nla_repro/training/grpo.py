"""The GRPO trainer of the AV, with the AR trained on the rollouts at the same time, on the
shared training infrastructure (`run`).

One optimizer step:

1. `vectors_per_step` train vectors (a seeded order, a pure function of the step), each
   repeated `group_size` times; the AV samples one explanation per copy (seeded per step).
2. Reward of a rollout: `-mse_nrm(AR(e), v)` (or `-log mse_nrm`); an empty, unparseable or
   truncated rollout scores what an orthogonal reconstruction scores, so cutting an
   explanation short or breaking its format never pays.
3. Advantage: the reward minus its group's mean, divided by the group's std plus eps. A group
   of equal rewards gives every member 0 (no gradient); these groups are counted.
4. Policy loss per token: `-A * exp(logp - sg(logp)) + kl_coef * k3`, with
   `k3 = exp(ref - logp) - (ref - logp) - 1` against the SFT policy; each rollout's tokens are
   averaged, then the rollouts. One update per batch of rollouts (on-policy), so the
   importance ratio is 1 and only carries the gradient.
5. The AR takes one supervised step on the step's valid rollouts (their texts and vectors),
   unless `train_ar` is off: a frozen AR's rewards go stale as the AV moves, and the AV can
   learn what that AR happens to reward.

The reference policy is a second, frozen copy of the SFT LoRA adapter on the same base
(`REFERENCE_ADAPTER`): a disable-adapter forward would give the base model, not the SFT
policy, and a frozen copy of the whole model would double the memory; the adapter copy costs
its LoRA weights only. Dropout stays off in the policy (eval mode), so the KL to the SFT policy
is exactly 0 at step 0 and the sampled and the scored policy are the same function.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.io import write_json
from nla_repro.metrics import RANDOM_MSE_NRM, mse_nrm_rows
from nla_repro.models import batch_slices
from nla_repro.nla import ActivationReconstructor, ActivationVerbalizer
from nla_repro.seeds import derive_seed
from nla_repro.templates import parse_explanation
from nla_repro.training.run import (
    Resumed,
    StepResult,
    TrainingRun,
    check_finite,
    grad_norm,
    new_history,
    run_steps,
)
from nla_repro.training.sft import BatchOrder

REFERENCE_ADAPTER = "reference"
POLICY_ADAPTER = "default"
FAILURES = ("empty", "unparseable", "truncated")


def failed_reward(form: str) -> float:
    """What a failed rollout scores: an orthogonal reconstruction's reward (mse_nrm = 2)."""
    return -RANDOM_MSE_NRM if form == "mse" else -math.log(RANDOM_MSE_NRM)


def rollout_failure(text: str, finished: bool, formatted: bool) -> str | None:
    """Why a rollout earns the failed reward, or None. `formatted`: the labels use the
    tagged explanation format, so a rollout must parse as one; otherwise (source-text
    labels) any text with a letter or digit parses."""
    if not finished:
        return "truncated"
    if not text.strip():
        return "empty"
    if formatted and not parse_explanation(text).ok:
        return "unparseable"
    if not formatted and not re.search(r"\w", text):
        return "unparseable"
    return None


def rewards(mse_N: torch.Tensor, failures: list[str | None], form: str) -> torch.Tensor:
    """Reward of each rollout from its mse_nrm, the failed ones at `failed_reward`."""
    r = -mse_N.double() if form == "mse" else -torch.log(mse_N.double().clamp_min(1e-8))
    failed = torch.tensor([f is not None for f in failures], dtype=torch.bool)
    return torch.where(failed, torch.full_like(r, failed_reward(form)), r)


def group_advantages(
    rewards_N: torch.Tensor, group_size: int, eps: float
) -> tuple[torch.Tensor, int]:
    """(reward - group mean) / (group std + eps), rows grouped in consecutive runs of
    `group_size`; and the number of groups whose rewards are all equal (advantage 0). The std
    is the sample std (n - 1), as TRL's GRPO computes it."""
    r = rewards_N.double().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    flat = (r == r[:, :1]).all(dim=1)
    adv = torch.where(flat[:, None], torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.flatten(), int(flat.sum())


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1, d = ref - logp.
    Zero where the two agree, positive elsewhere, unbiased under samples of the policy."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp_BT: torch.Tensor,
    ref_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    adv_B: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed over rollouts (the caller divides by their count): the GRPO loss and the
    per-rollout mean k3 KL (detached)."""
    mask = mask_BT.to(logp_BT.dtype)
    ratio = torch.exp(logp_BT - logp_BT.detach())
    kl = k3_kl(logp_BT, ref_BT)
    per_token = -ratio * adv_B[:, None].to(logp_BT.dtype) + kl_coef * kl
    n = mask.sum(dim=1).clamp_min(1)
    per_rollout = (per_token * mask).sum(dim=1) / n
    return per_rollout.sum(), ((kl * mask).sum(dim=1) / n).detach()


@dataclass
class Rollouts:
    """One step's samples and what they scored."""

    responses: list[list[int]]
    texts: list[str]
    failures: list[str | None]
    mse: torch.Tensor
    rewards: torch.Tensor


@torch.no_grad()
def roll_out(
    av: ActivationVerbalizer,
    ar: ActivationReconstructor,
    vectors_ND: torch.Tensor,
    cfg: C.RLConfig,
    formatted: bool,
) -> Rollouts:
    """Sample one response per vector and score it with the AR (no gradients)."""
    responses, finished = [], []
    for s in batch_slices(len(vectors_ND), cfg.micro_batch * cfg.group_size):
        got, done = av.sample(vectors_ND[s], cfg.max_new_tokens, cfg.temperature)
        responses, finished = responses + got, finished + done
    texts = av.decode(responses)
    failures = [rollout_failure(t, f, formatted) for t, f in zip(texts, finished, strict=True)]
    was = ar.training
    ar.eval()
    mse = torch.cat(
        [
            mse_nrm_rows(ar.predict(texts[s]), vectors_ND[s].to(ar.head.weight.device)).cpu()
            for s in batch_slices(len(texts), cfg.micro_batch)
        ]
    )
    ar.train(was)
    return Rollouts(responses, texts, failures, mse, rewards(mse, failures, cfg.reward))


def reference_logprobs(av: ActivationVerbalizer, responses, vectors_ND) -> torch.Tensor:
    """Token log-probs of the responses under the frozen SFT adapter."""
    av.model.set_adapter(REFERENCE_ADAPTER)
    try:
        with torch.no_grad():
            return av.response_logprobs(responses, vectors_ND)[0]
    finally:
        av.model.set_adapter(POLICY_ADAPTER)


def lr_factor(step: int, cfg: C.RLConfig) -> float:
    """Linear warmup, then constant."""
    return min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0


class GRPOTrainer:
    """GRPO on an injection AV with a live (or frozen) AR; `train` runs it to max_steps."""

    def __init__(
        self,
        av: ActivationVerbalizer,
        ar: ActivationReconstructor,
        train_vectors_ND: torch.Tensor,
        val_vectors_ND: torch.Tensor,
        cfg: C.RLConfig,
        formatted: bool,
    ) -> None:
        self.av, self.ar, self.cfg, self.formatted = av, ar, cfg, formatted
        self.train_vectors, self.val_vectors = train_vectors_ND, val_vectors_ND
        self.av_params = [p for p in av.parameters() if p.requires_grad]
        self.ar_params = [p for p in ar.parameters() if p.requires_grad] if cfg.train_ar else []
        if not cfg.train_ar:
            ar.requires_grad_(False)
        groups = [{"params": self.av_params, "lr": cfg.av_lr}]
        if self.ar_params:
            groups.append({"params": self.ar_params, "lr": cfg.ar_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg)
        )
        self.order = BatchOrder(len(train_vectors_ND), cfg.vectors_per_step, cfg.seed)
        self.device = next(av.parameters()).device
        self.last_timing: dict = {}

    def step(self, step: int) -> StepResult:
        cfg, av, ar = self.cfg, self.av, self.ar
        vectors = self.train_vectors[self.order(step)].repeat_interleave(cfg.group_size, 0)
        vectors = vectors.to(self.device)
        torch.manual_seed(derive_seed(cfg.seed, step, stream="rollout"))
        av.eval()  # no dropout: the sampled policy is the one scored and trained
        started = time.perf_counter()
        roll = roll_out(av, ar, vectors, cfg, self.formatted)
        rolled = time.perf_counter()
        adv, flat_groups = group_advantages(roll.rewards, cfg.group_size, cfg.adv_eps)
        n, tokens = len(roll.texts), 0
        kl_N = torch.zeros(n)
        # Micro-batches of similar-length rollouts (little padding); the loss is a sum over
        # rollouts, so how they are grouped does not change the gradient.
        by_length = sorted(range(n), key=lambda i: len(roll.responses[i]))
        for s in batch_slices(n, cfg.micro_batch):
            idx = by_length[s]
            responses = [roll.responses[i] for i in idx]
            ref = reference_logprobs(av, responses, vectors[idx])
            logp, mask = av.response_logprobs(responses, vectors[idx])
            tokens += av.read_tokens
            loss, kl = policy_loss(logp, ref, mask, adv[idx].to(logp.device), cfg.kl_coef)
            (loss / n).backward()
            kl_N[idx] = kl.cpu().to(kl_N.dtype)
        policy_norm = grad_norm(self.av_params, cfg.max_grad_norm)
        check_finite("rl", step, policy_loss=loss, grad_norm=policy_norm)
        ar_loss = float("nan")
        valid = [i for i, f in enumerate(roll.failures) if f is None]
        if self.ar_params and valid:
            ar.train()
            total = 0.0
            valid_by_length = sorted(valid, key=lambda i: len(roll.responses[i]))
            for s in batch_slices(len(valid), cfg.micro_batch):
                idx = valid_by_length[s]
                out = ar([roll.texts[i] for i in idx], vectors[idx])
                (out["loss"] * len(idx) / len(valid)).backward()
                total += out["loss"].item() * len(idx)
                tokens += out["tokens"]
            ar_loss = total / len(valid)
            ar_norm = grad_norm(self.ar_params, cfg.max_grad_norm)
            check_finite("rl", step, ar_loss=ar_loss, ar_grad_norm=ar_norm)
            ar.eval()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        check_finite("rl", step, [*self.av_params, *self.ar_params])
        lengths = [len(r) for r in roll.responses]
        # Throughput (the bar and benchmarks/rl.py; never an output: clocks differ per run).
        self.last_timing = {
            "rollout_s": rolled - started,
            "rollout_tokens": sum(lengths),
            "train_s": time.perf_counter() - rolled,
            "train_tokens": tokens,
        }
        row = {
            "reward_mean": roll.rewards.mean().item(),
            "reward_std": roll.rewards.std().item(),
            "mse_nrm": roll.mse.mean().item(),
            "kl": kl_N.mean().item(),
            "length": sum(lengths) / n,
            "failed": sum(f is not None for f in roll.failures) / n,
            "truncated": sum(f == "truncated" for f in roll.failures) / n,
            "flat_groups": flat_groups,
            "ar_loss": ar_loss,
            "lr": lr,
        }
        return StepResult(row, tokens + sum(lengths))

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Greedy round trip on the validation vectors under the live AR, the empty-string
        reconstruction beside it, and the share of distinct outputs."""
        cfg, av, ar = self.cfg, self.av, self.ar
        vectors = self.val_vectors.to(self.device)
        texts: list[str] = []
        for s in batch_slices(len(vectors), cfg.micro_batch * cfg.group_size):
            texts += [t.strip() for t in av.generate(vectors[s], cfg.max_new_tokens, 0.0)]
        was = ar.training
        ar.eval()
        mse = torch.cat(
            [
                mse_nrm_rows(ar.predict(texts[s]), vectors[s].to(ar.head.weight.device)).cpu()
                for s in batch_slices(len(texts), cfg.micro_batch)
            ]
        )
        empty = ar.predict([""]).expand(len(vectors), -1)
        ar.train(was)
        cos = 1 - mse / 2
        empty_cos = 1 - mse_nrm_rows(empty, vectors).cpu() / 2
        result = {
            "step": step,
            "val_cos": cos.mean().item(),
            "val_cos_empty": empty_cos.mean().item(),
            "val_share": (cos - empty_cos).mean().item(),
            "val_unique": len(set(texts)) / max(len(texts), 1),
            "val_length": sum(len(av.tokenizer(t)["input_ids"]) for t in texts) / len(texts),
        }
        tqdm.write(
            f"rl step {step}: val cos {result['val_cos']:.4f} "
            f"(empty {result['val_cos_empty']:.4f}), unique {result['val_unique']:.2f}"
        )
        return result

    def state_dicts(self) -> tuple:
        return self.optimizer, self.scheduler


def train(
    trainer: GRPOTrainer,
    run: TrainingRun,
    save_weights,
    metrics_path: Path,
) -> dict:
    """Train (or resume) to cfg.max_steps, publish the release checkpoint's models and write
    metrics/rl.json (no clock values: equal inputs give equal bytes)."""
    cfg = trainer.cfg
    history, start = new_history(), 0
    resumed: Resumed | None = run.resume(cfg.seed)
    if resumed:
        start, history = resumed.step, resumed.history
        trainer.av.load(resumed.path / "av")
        trainer.ar.load(resumed.path / "ar")
        resumed.restore(trainer.optimizer, trainer.scheduler)

    def validate(step: int) -> None:
        if len(trainer.val_vectors):
            history["val"].append(trainer.validate(step))

    def save(step: int) -> None:
        val = [v for v in history["val"] if v["step"] == step]
        run.save(
            step,
            lambda tmp: save_weights(tmp, step),
            history,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            meta={"validation": val[0] if val else None},
        )

    if start == 0:
        validate(0)
    timing = run_steps(
        trainer.step,
        start=start,
        max_steps=cfg.max_steps,
        history=history,
        save=save,
        checkpoint_every=cfg.save_interval,
        validate=validate,
        eval_every=cfg.eval_interval,
        desc="rl",
    )
    run.publish(cfg.released_step)
    run.write_curves(history, validation=bool(history["val"]))
    metrics = summary(cfg, history, len(trainer.train_vectors), len(trainer.val_vectors))
    write_json(metrics, metrics_path)
    return metrics | {"timing": timing}


def _window(rows: list[dict], key: str, first: bool, width: int) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    values = values[:width] if first else values[-width:]
    return sum(values) / len(values) if values else None


def summary(cfg: C.RLConfig, history: dict, n_train: int, n_val: int) -> dict:
    """metrics/rl.json: the run's size, the first and last steps' means of each curve, the
    flat groups, and the validation at the start and at the released step."""
    train = [t for t in history["train"] if t["step"] <= cfg.released_step]
    width = max(1, min(5, len(train) // 4 or 1))
    keys = ("reward_mean", "reward_std", "mse_nrm", "kl", "length", "failed", "ar_loss")
    val_at = {v["step"]: v for v in history["val"]}
    return {
        "released_step": cfg.released_step,
        "max_steps": cfg.max_steps,
        "train_vectors": n_train,
        "val_vectors": n_val,
        "rollouts_per_step": cfg.vectors_per_step * cfg.group_size,
        "rollouts": cfg.vectors_per_step * cfg.group_size * cfg.released_step,
        "flat_groups": sum(int(t["flat_groups"]) for t in train),
        "groups": cfg.vectors_per_step * cfg.released_step,
        "flat_group_rate": sum(int(t["flat_groups"]) for t in train)
        / max(cfg.vectors_per_step * cfg.released_step, 1),
        "window_steps": width,
        "first_steps": {k: _window(train, k, True, width) for k in keys},
        "last_steps": {k: _window(train, k, False, width) for k in keys},
        "val_at_start": val_at.get(0),
        "val_at_release": val_at.get(cfg.released_step),
        "reference_policy": "frozen copy of the SFT LoRA adapter on the same base",
        "train_ar": cfg.train_ar,
    }

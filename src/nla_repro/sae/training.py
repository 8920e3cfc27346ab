"""Training a TopK SAE, on the shared training infrastructure (`nla_repro.training.run`).

- Decoder rows are kept at unit norm: the gradient component parallel to each row is removed
  before every step and rows are renormalized after it.
- `b_dec` starts at the geometric median of a sample; `W_enc` starts as `W_dec` (tied init).
- AuxK: latents that have not fired for `dead_tokens` tokens reconstruct the residual with
  their own top-`k_aux`, which pulls dead latents back into use.

`train_run` trains from activation shards with checkpoints and resume (the sae stage);
`fit` trains on vectors held in memory (tests, benchmarks). Both drive `Trainer.train_step`
through the same step loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from nla_repro import config as C
from nla_repro.sae.activations import Shards
from nla_repro.sae.files import load_sae, save_sae
from nla_repro.sae.model import TopKSAE, geometric_median, sparse_decode
from nla_repro.seeds import derive_seed
from nla_repro.training.run import (
    Retention,
    StepResult,
    TrainingRun,
    check_finite,
    grad_norm,
    new_history,
    run_steps,
)

RETENTION = Retention(keep_last=1)
"""A resumed SAE run needs only its newest checkpoint; the weights are published at the top."""


def scaled_lr(d_sae: int, base_lr: float = 2e-4) -> float:
    """The TopK recipe's learning rate: base_lr / sqrt(d_sae / 2**14)."""
    return base_lr / math.sqrt(d_sae / 2**14)


class DeadLatents:
    """Tokens since each latent last fired; dead = more than `window` tokens ago."""

    def __init__(self, d_sae: int, window: int) -> None:
        self.window = window
        self.since_fired = torch.zeros(d_sae, dtype=torch.long)

    def update(self, idx_BK: torch.Tensor, acts_BK: torch.Tensor) -> None:
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[idx_BK[acts_BK > 0].cpu()] = True
        self.since_fired += idx_BK.shape[0]
        self.since_fired[fired] = 0

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired > self.window


def training_loss(
    sae: TopKSAE, x_BD: torch.Tensor, dead_mask: torch.Tensor, k_aux: int, aux_coef: float
) -> tuple[torch.Tensor, dict]:
    """FVU of the batch plus the AuxK loss on the dead latents."""
    acts, idx = sae.encode(x_BD)
    x_hat = sae.decode(acts, idx)
    residual = x_BD - x_hat
    total_var = (x_BD - x_BD.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    fvu = residual.pow(2).sum() / total_var
    aux = torch.zeros((), device=x_BD.device)
    dead = dead_mask.nonzero().flatten().to(x_BD.device)
    if len(dead) and k_aux and aux_coef:
        # Only the dead latents' pre-activations: a matmul over the (usually few) dead rows.
        pre_dead = torch.relu((x_BD - sae.b_dec) @ sae.W_enc[dead].T + sae.b_enc[dead])
        aux_acts, aux_pos = pre_dead.topk(min(k_aux, len(dead)), dim=-1, sorted=False)
        target = residual.detach()
        aux_hat = sparse_decode(aux_acts, dead[aux_pos], sae.W_dec)
        aux_var = (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        aux = (target - aux_hat).pow(2).sum() / aux_var
    loss = fvu + aux_coef * aux
    return loss, {"fvu": fvu.item(), "aux": aux.item(), "acts": acts.detach(), "idx": idx}


@dataclass(frozen=True)
class TrainSettings:
    """How an SAE is trained (the stage fills it from params `sae.*`)."""

    batch_size: int
    """Tokens per optimizer step."""
    lr: float
    """Adam learning rate after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    k_aux: int = 0
    """Dead latents used by the AuxK loss (0: off)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many training tokens."""

    @classmethod
    def resolve(
        cls, sae: TopKSAE, *, lr: float | None = None, k_aux: int | None = None, **rest
    ) -> TrainSettings:
        """Settings with the recipe's defaults filled in: lr None is the width-scaled lr,
        k_aux None is d_model // 2."""
        return cls(
            lr=lr if lr is not None else scaled_lr(sae.d_sae),
            k_aux=k_aux if k_aux is not None else sae.d_model // 2,
            **rest,
        )


class Trainer:
    """Optimizer, warmup schedule and dead-latent window of one SAE training run."""

    def __init__(self, sae: TopKSAE, settings: TrainSettings) -> None:
        self.sae, self.settings = sae, settings
        # fused: one kernel for the whole update (CPU and CUDA since torch 2.4), a tenth of a
        # step faster than the per-tensor loop on the 2-core CPU; the same Adam.
        self.opt = torch.optim.Adam(sae.parameters(), lr=settings.lr, eps=6.25e-10, fused=True)
        warm = max(settings.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.dead = DeadLatents(sae.d_sae, settings.dead_tokens)
        self.step = 0

    def train_step(self, x_BD: torch.Tensor) -> dict:
        s, sae = self.settings, self.sae
        loss, info = training_loss(sae, x_BD, self.dead.dead, s.k_aux, s.aux_coef)
        loss.backward()
        sae.remove_parallel_grad()
        norm = grad_norm(list(sae.parameters()), s.max_grad_norm)
        check_finite("sae", self.step, loss=loss, grad_norm=norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        check_finite("sae", self.step, sae.parameters())
        self.dead.update(info["idx"], info["acts"])
        self.step += 1
        return {"fvu": info["fvu"], "aux": info["aux"], "lr": lr}

    def step_result(self, x_BD: torch.Tensor) -> StepResult:
        """One step as the shared loop records it: the training curve's row."""
        info = self.train_step(x_BD)
        row = {
            "tokens": self.step * self.settings.batch_size,
            "fvu": info["fvu"],
            "aux": info["aux"],
            "lr": info["lr"],
            "dead": int(self.dead.dead.sum()),
        }
        return StepResult(row, len(x_BD))

    def save(self, run: TrainingRun, history: dict) -> None:
        """checkpoints/step_N/: weights (SAELens layout), optimizer, schedule, the dead-latent
        counters, the curve so far and the sidecar."""
        run.save(
            self.step,
            lambda folder: save_sae(self.sae, folder, {}),
            history,
            optimizer=self.opt,
            scheduler=self.sched,
            extra_state={"since_fired": self.dead.since_fired.clone()},
            meta={"tokens": self.step * self.settings.batch_size},
        )

    def resume(self, run: TrainingRun, seed: int) -> dict | None:
        """Load the newest checkpoint of `run` into the SAE and this trainer; its history."""
        resumed = run.resume(seed)
        if resumed is None:
            return None
        loaded, _ = load_sae(resumed.path)
        self.sae.load_state_dict(loaded.to(self.sae.W_dec.dtype).state_dict())
        resumed.restore(self.opt, self.sched)
        self.dead.since_fired = resumed.state["since_fired"].clone()
        self.step = int(resumed.state["step"])
        return resumed.history


@torch.no_grad()
def init_b_dec(sae: TopKSAE, sample_ND: torch.Tensor) -> None:
    sae.b_dec.copy_(geometric_median(sample_ND.float()).to(sae.b_dec.dtype))


def shuffled_batches(
    buffers: Callable[[int], Iterable[torch.Tensor]], batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    """Endless stream of batches: epoch e walks `buffers(e)` (tensors of vectors, e.g. a few
    shards concatenated), permutes each with a generator seeded by (seed, e, buffer) and cuts
    it into batches; a remainder is carried into the next buffer. The stream is a pure
    function of (seed, data), so a resumed run can skip to where it stopped."""
    carry = None
    epoch = 0
    while True:
        empty = True
        for b, buf in enumerate(buffers(epoch)):
            if len(buf) == 0:
                continue
            empty = False
            gen = torch.Generator().manual_seed(derive_seed(seed, epoch, b))
            buf = buf[torch.randperm(len(buf), generator=gen)]
            if carry is not None:
                buf = torch.cat([carry, buf])
            stop = len(buf) - len(buf) % batch_size
            for start in range(0, stop, batch_size):
                yield buf[start : start + batch_size]
            carry = buf[stop:] if stop < len(buf) else None
        if empty:
            raise ValueError("no training vectors")
        epoch += 1


def settings_from(sae: TopKSAE, cfg: C.SAEConfig) -> TrainSettings:
    return TrainSettings.resolve(
        sae,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        k_aux=cfg.k_aux,
        aux_coef=cfg.aux_coef,
        dead_tokens=cfg.dead_tokens,
    )


def train_run(
    sae: TopKSAE, train_shards: Shards, cfg: C.SAEConfig, run: TrainingRun, device
) -> tuple[Trainer, dict, dict]:
    """Train (or resume) to ceil(tokens / batch_size) steps from activation shards, with a
    checkpoint every `checkpoint_every` steps. Returns (trainer, history, timing)."""
    trainer = Trainer(sae, settings_from(sae, cfg))
    batches = shuffled_batches(
        lambda e: train_shards.buffers(e, cfg.shuffle_shards, cfg.seed), cfg.batch_size, cfg.seed
    )
    history = trainer.resume(run, cfg.seed)
    if history is not None:
        for _ in range(trainer.step):  # the data order is a pure function: skip what was seen
            next(batches)
    else:
        history = new_history()
        first = next(train_shards.buffers(0, cfg.shuffle_shards, cfg.seed))
        gen = torch.Generator().manual_seed(cfg.seed)
        init_b_dec(sae, first[torch.randperm(len(first), generator=gen)[: cfg.gm_sample]])
    timing = run_steps(
        lambda _step: trainer.step_result(next(batches).to(device)),
        start=trainer.step,
        max_steps=math.ceil(cfg.tokens / cfg.batch_size),
        history=history,
        save=lambda _step: trainer.save(run, history),
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        desc="sae train",
        bar_unit="tok",
        units_per_step=cfg.batch_size,
    )
    return trainer, history, timing


def fit(
    sae: TopKSAE,
    x_ND: torch.Tensor,
    *,
    batch_size: int,
    tokens: int,
    lr: float | None = None,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    k_aux: int | None = None,
    aux_coef: float = 1 / 32,
    dead_tokens: int = 10_000_000,
    seed: int = 0,
    gm_sample: int = 4096,
) -> DeadLatents:
    """Train on vectors held in memory, `tokens` vectors in all (shuffled epochs), without
    checkpoints. Returns the dead-latent tracker. lr None: the width-scaled recipe lr; k_aux
    None: d_model // 2."""
    gen = torch.Generator().manual_seed(seed)
    init_b_dec(sae, x_ND[torch.randperm(len(x_ND), generator=gen)[:gm_sample]])
    settings = TrainSettings.resolve(
        sae,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm,
        k_aux=k_aux,
        aux_coef=aux_coef,
        dead_tokens=dead_tokens,
    )
    trainer = Trainer(sae, settings)
    batches = shuffled_batches(lambda epoch: [x_ND], batch_size, seed)
    steps = max(tokens // batch_size, 1)
    run_steps(
        lambda _step: trainer.step_result(next(batches)),
        start=0,
        max_steps=steps,
        history=new_history(),
        log_every=steps,
        desc="sae fit",
    )
    return trainer.dead

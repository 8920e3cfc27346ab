"""TopK sparse autoencoder (Gao et al. 2024 recipe, as in EleutherAI/sparsify).

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec^T z + b_dec

- Decoder rows (the dictionary directions, "columns" of W_dec in the paper's notation) are kept
  at unit norm: the gradient component parallel to each row is removed before every step and
  rows are renormalized after it.
- `b_dec` starts at the geometric median of a sample; `W_enc` starts as `W_dec` (tied init).
- AuxK: latents that have not fired for `dead_tokens` tokens reconstruct the residual with
  their own top-`k_aux`, which pulls dead latents back into use.
- Only the dense encoder forward pays for all latents: the decoder reads the k active rows per
  token (embedding_bag) and the encoder's backward touches the k selected latents per row.

Saved in SAELens's layout (`cfg.json` + `sae_weights.safetensors`, architecture "topk"), so
`sae_lens.SAE.load_from_disk(folder)` loads it (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nla_repro.errors import SourceError
from nla_repro.io import atomic_path, write_json
from nla_repro.models import adapt, position_ids_from_mask

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
# The SAELens config format the files follow (6.x: architecture + metadata dict).
SAELENS_FORMAT_VERSION = "6.0.0"


@dataclass(frozen=True)
class SAEStats:
    """Reconstruction quality on a set of vectors (DESIGN.md "Metrics", SAE)."""

    explained_variance: float
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (ratio of sums)."""
    fvu: float
    """Fraction of variance unexplained, centred: 1 - explained_variance."""
    fvu_uncentred: float
    """sum ||x - x_hat||^2 / sum ||x||^2: looks far better when x has a large mean."""
    mse: float
    """Mean squared error per element."""
    l0: float
    """Mean number of non-zero latents per vector."""
    n: int
    """Vectors scored."""
    fires: torch.Tensor
    """Per latent: on how many of the n vectors it was non-zero."""

    @property
    def density(self) -> torch.Tensor:
        """Per latent: fraction of the vectors it fires on."""
        return self.fires.double() / max(self.n, 1)


class _SparseTopKEncode(torch.autograd.Function):
    """TopK(ReLU(xc W_enc^T + b_enc)) whose backward touches only the k selected latents per
    row: the encoder's weight gradient costs B*k*d instead of a dense B*d_sae*d matmul."""

    @staticmethod
    def forward(ctx, xc_BD, w_enc_SD, b_enc_S, k: int):
        pre_BS = torch.relu(torch.addmm(b_enc_S, xc_BD, w_enc_SD.T))
        acts_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(xc_BD, w_enc_SD, acts_BK, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return acts_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_acts_BK, _grad_idx):
        xc_BD, w_enc_SD, acts_BK, idx_BK = ctx.saved_tensors
        grad_BK = grad_acts_BK * (acts_BK > 0)  # ReLU
        n_rows, k = idx_BK.shape
        grad_xc = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_xc = sparse_decode(grad_BK, idx_BK, w_enc_SD)
        if ctx.needs_input_grad[1]:
            rows = torch.arange(n_rows, device=idx_BK.device).repeat_interleave(k)
            # (S, B) gradient of the pre-activations, k non-zeros per column.
            sparse_SB = torch.sparse_coo_tensor(
                torch.stack([idx_BK.flatten(), rows]),
                grad_BK.flatten(),
                (w_enc_SD.shape[0], n_rows),
                check_invariants=False,  # built from topk indices: in range by construction
            )
            grad_w = torch.sparse.mm(sparse_SB, xc_BD)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(w_enc_SD[:, 0]).index_add_(
                0, idx_BK.flatten(), grad_BK.flatten()
            )
        return grad_xc, grad_w, grad_b, None


def sparse_decode(acts_BK: torch.Tensor, idx_BK: torch.Tensor, w_SD: torch.Tensor) -> torch.Tensor:
    """sum_j acts[b, j] * W[idx[b, j]]: one fused gather-and-sum per row (embedding_bag),
    forward and backward, without materializing the (B, k, d) gathered rows."""
    return F.embedding_bag(idx_BK, w_SD, per_sample_weights=acts_BK, mode="sum")


class TopKSAE(nn.Module):
    def __init__(self, d_model: int, d_sae: int, k: int, seed: int = 0) -> None:
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_model, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())  # tied init
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu((x_BD - self.b_dec) @ self.W_enc.T + self.b_enc)

    def encode(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k activations and their latent indices: (B, k), (B, k); k-sparse backward."""
        return _SparseTopKEncode.apply(x_BD - self.b_dec, self.W_enc, self.b_enc, self.k)

    def decode(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        return sparse_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x_BD))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so a step moves
        the direction, not its norm."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    def to_dense(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(
            acts_BK.shape[0], self.d_sae, dtype=acts_BK.dtype, device=acts_BK.device
        )
        return dense.scatter_(1, idx_BK, acts_BK)


@torch.no_grad()
def geometric_median(x_ND: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    x = x_ND.double()
    point = x.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (x - point).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (new - point).norm() < eps * max(point.norm().item(), 1.0):
            point = new
            break
        point = new
    return point.to(x_ND.dtype)


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
    """Optimizer, warmup schedule and dead-latent window of one SAE training run. Its
    `state_dict` holds everything a resumed run needs besides the weights."""

    def __init__(self, sae: TopKSAE, settings: TrainSettings) -> None:
        self.sae, self.settings = sae, settings
        self.opt = torch.optim.Adam(sae.parameters(), lr=settings.lr, eps=6.25e-10)
        warm = max(settings.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.dead = DeadLatents(sae.d_sae, settings.dead_tokens)
        self.step = 0

    def train_step(self, x_BD: torch.Tensor) -> dict:
        s, sae = self.settings, self.sae
        loss, info = training_loss(sae, x_BD, self.dead.dead, s.k_aux, s.aux_coef)
        loss.backward()
        sae.remove_parallel_grad()
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), s.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        self.dead.update(info["idx"], info["acts"])
        self.step += 1
        return {"fvu": info["fvu"], "aux": info["aux"], "lr": lr}

    def state_dict(self) -> dict:
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "since_fired": self.dead.since_fired.clone(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.dead.since_fired = state["since_fired"].clone()
        self.step = int(state["step"])


@torch.no_grad()
def init_b_dec(sae: TopKSAE, sample_ND: torch.Tensor) -> None:
    sae.b_dec.copy_(geometric_median(sample_ND.float()).to(sae.b_dec.dtype))


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
    """Train on vectors held in memory, `tokens` vectors in all (shuffled epochs). Returns the
    dead-latent tracker. lr None: the width-scaled recipe lr; k_aux None: d_model // 2."""
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
    for _ in range(max(tokens // batch_size, 1)):
        trainer.train_step(next(batches))
    return trainer.dead


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
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + b)
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


class StatsAccumulator:
    """SAEStats over a stream of batches (float64 sums; the mean comes from the sums, so one
    pass suffices)."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.sum_x = None
        self.sum_sq_x = self.sq_err = self.nonzero = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    @torch.no_grad()
    def update(self, sae: TopKSAE, x_BD: torch.Tensor) -> None:
        acts, idx = sae.encode(x_BD)
        x_hat = sae.decode(acts, idx)
        x64 = x_BD.double()
        self.sum_x = x64.sum(dim=0) if self.sum_x is None else self.sum_x + x64.sum(dim=0)
        self.sum_sq_x += x64.pow(2).sum().item()
        self.sq_err += (x64 - x_hat.double()).pow(2).sum().item()
        fired = acts > 0
        self.nonzero += fired.sum().item()
        self.fires.index_add_(0, idx[fired].cpu(), torch.ones(int(fired.sum()), dtype=torch.long))
        self.n += len(x_BD)

    def result(self) -> SAEStats:
        if not self.n:
            raise ValueError("no vectors scored")
        d = self.sum_x.numel()
        total = self.sum_sq_x - self.sum_x.pow(2).sum().item() / self.n
        ev = 1.0 - self.sq_err / max(total, 1e-12)
        return SAEStats(
            explained_variance=ev,
            fvu=1.0 - ev,
            fvu_uncentred=self.sq_err / max(self.sum_sq_x, 1e-12),
            mse=self.sq_err / (self.n * d),
            l0=self.nonzero / self.n,
            n=self.n,
            fires=self.fires.clone(),
        )


@torch.no_grad()
def evaluate(sae: TopKSAE, x_ND: torch.Tensor | Iterable[torch.Tensor], batch: int = 4096):
    """Explained variance (ratio of sums), FVU, MSE, L0 and firing counts, over a tensor of
    vectors or a stream of tensors (shards)."""
    acc = StatsAccumulator(sae.d_sae)
    for part in [x_ND] if isinstance(x_ND, torch.Tensor) else x_ND:
        for start in range(0, len(part), batch):
            acc.update(sae, part[start : start + batch].to(sae.W_dec.dtype))
    return acc.result()


# --- LM loss with the reconstruction spliced in -------------------------------------------


@contextlib.contextmanager
def splice_layer(
    model: nn.Module, layer: int, replace: Callable[[torch.Tensor], torch.Tensor], mask_BT
) -> Iterator[None]:
    """Inside the context, block `layer`'s output at the positions in `mask_BT` is replaced by
    `replace(output[mask])` (a (N, d) -> (N, d) function); other positions pass unchanged."""
    arch = adapt(model)

    def hook(_module: nn.Module, _args: tuple, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        new[mask_BT] = replace(hidden[mask_BT]).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = arch.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def next_token_loss(model: nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple:
    """Summed next-token cross-entropy over real tokens, and the number of predicted tokens."""
    logits = model(
        input_ids=ids_BT,
        attention_mask=mask_BT,
        position_ids=position_ids_from_mask(mask_BT),
        use_cache=False,
    ).logits.float()
    target = ids_BT[:, 1:]
    valid = (mask_BT[:, 1:] * mask_BT[:, :-1]).bool()
    ce = F.cross_entropy(logits[:, :-1][valid], target[valid], reduction="sum")
    return ce.item(), int(valid.sum())


def loss_recovered(clean: float, spliced: float, zero: float) -> float | None:
    """(zero - spliced) / (zero - clean): 1 when the reconstruction is as good as the real
    activations, 0 when it is as bad as zeroing them. None when zeroing changes nothing."""
    if zero == clean:
        return None
    return (zero - spliced) / (zero - clean)


# --- Files: SAELens layout ---------------------------------------------------------------


def save_sae(sae: TopKSAE, folder: Path | str, metadata: dict, density=None) -> None:
    """`sae_weights.safetensors` (W_enc as (d_in, d_sae), W_dec as (d_sae, d_in), b_enc,
    b_dec) and `cfg.json` as SAELens reads them; `sparsity.safetensors` (log10 feature
    density, SAELens's name) when a density is given. Each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach().T.contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    dtype = str(sae.W_dec.dtype).removeprefix("torch.")
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # Decoder rows are unit norm already: nothing to rescale or fold.
        "rescale_acts_by_decoder_norm": False,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **metadata},
    }
    write_json(cfg, folder / CFG_FILE)
    if density is not None:
        log_density = torch.as_tensor(density, dtype=torch.float32).clamp_min(1e-10).log10()
        with atomic_path(folder / SPARSITY_FILE) as tmp:
            save_file({"sparsity": log_density.contiguous()}, str(tmp))


def load_sae(folder: Path | str) -> tuple[TopKSAE, dict]:
    """An SAE saved by `save_sae` (or by SAELens with architecture topk and no activation
    normalization), and its cfg. Errors name the file and what is wrong."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise SourceError(f"{path}: not found (an SAE folder has {CFG_FILE}, {WEIGHTS_FILE})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architecture") != "topk":
        raise SourceError(f"{cfg_path}: architecture {cfg.get('architecture')!r}, not 'topk'")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get(
        "rescale_acts_by_decoder_norm"
    ):
        raise SourceError(f"{cfg_path}: activation normalization or decoder-norm rescaling")
    d_in, d_sae, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
    tensors = load_file(str(weights_path))
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != shape:
            raise SourceError(f"{weights_path}: {name} has shape {got}, {CFG_FILE} says {shape}")
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"].T)
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.b_dec.copy_(tensors["b_dec"])
    return sae.to(tensors["W_dec"].dtype), cfg

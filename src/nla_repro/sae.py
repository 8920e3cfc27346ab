"""TopK sparse autoencoder (Gao et al. 2024 recipe, as in EleutherAI/sparsify).

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec^T z + b_dec

- Decoder rows (the dictionary directions, "columns" of W_dec in the paper's notation) are kept
  at unit norm: the gradient component parallel to each row is removed before every step and
  rows are renormalized after it.
- `b_dec` starts at the geometric median of a sample; `W_enc` starts as `W_dec` (tied init).
- AuxK: latents that have not fired for `dead_tokens` tokens reconstruct the residual with
  their own top-`k_aux`, which pulls dead latents back into use.
- The decoder reads only the k active rows per token (a gather, not a dense matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SAEStats:
    """Reconstruction quality on a set of vectors (DESIGN.md "Metrics", SAE)."""

    explained_variance: float
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (ratio of sums)."""
    fvu: float
    """Fraction of variance unexplained, centred: 1 - explained_variance."""
    mse: float
    """Mean squared error per element."""
    l0: float
    """Mean number of non-zero latents per vector."""
    n: int
    """Vectors scored."""


class _SparseTopKEncode(torch.autograd.Function):
    """TopK(ReLU(xc W_enc^T + b_enc)) whose backward touches only the k selected latents per
    row: the encoder's weight gradient costs B*k*d instead of a dense B*d_sae*d matmul."""

    @staticmethod
    def forward(ctx, xc_BD, w_enc_SD, b_enc_S, k: int):
        pre_BS = torch.relu(xc_BD @ w_enc_SD.T + b_enc_S)
        acts_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(xc_BD, w_enc_SD, acts_BK, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return acts_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_acts_BK, _grad_idx):
        xc_BD, w_enc_SD, acts_BK, idx_BK = ctx.saved_tensors
        grad_BK = grad_acts_BK * (acts_BK > 0)  # ReLU
        n_rows, k = idx_BK.shape
        rows = torch.arange(n_rows, device=idx_BK.device).repeat_interleave(k)
        # (B, S) gradient of the pre-activations, k non-zeros per row.
        sparse_BS = torch.sparse_coo_tensor(
            torch.stack([rows, idx_BK.flatten()]),
            grad_BK.flatten(),
            (n_rows, w_enc_SD.shape[0]),
            check_invariants=False,  # built from topk indices: in range by construction
        ).coalesce()
        grad_xc = torch.sparse.mm(sparse_BS, w_enc_SD) if ctx.needs_input_grad[0] else None
        grad_w = torch.sparse.mm(sparse_BS.t(), xc_BD) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(w_enc_SD[:, 0]).index_add_(
                0, idx_BK.flatten(), grad_BK.flatten()
            )
        return grad_xc, grad_w, grad_b, None


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
        rows_BKD = self.W_dec[idx_BK]
        return (acts_BK.unsqueeze(-1) * rows_BKD).sum(dim=1) + self.b_dec

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
        aux_hat = (aux_acts.unsqueeze(-1) * sae.W_dec[dead[aux_pos]]).sum(dim=1)
        aux_var = (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        aux = (target - aux_hat).pow(2).sum() / aux_var
    loss = fvu + aux_coef * aux
    return loss, {"fvu": fvu.item(), "aux": aux.item(), "acts": acts.detach(), "idx": idx}


@torch.no_grad()
def evaluate(sae: TopKSAE, x_ND: torch.Tensor, batch: int = 4096) -> SAEStats:
    """Explained variance (ratio of sums over all of x), MSE and L0."""
    mean = x_ND.double().mean(dim=0)
    sq_err = total = nonzero = 0.0
    for start in range(0, len(x_ND), batch):
        x = x_ND[start : start + batch]
        acts, idx = sae.encode(x)
        x_hat = sae.decode(acts, idx)
        sq_err += (x - x_hat).double().pow(2).sum().item()
        total += (x.double() - mean).pow(2).sum().item()
        nonzero += (acts > 0).sum().item()
    ev = 1.0 - sq_err / max(total, 1e-12)
    n = len(x_ND)
    return SAEStats(
        explained_variance=ev,
        fvu=1.0 - ev,
        mse=sq_err / (n * x_ND.shape[1]),
        l0=nonzero / n,
        n=n,
    )


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
    sample = x_ND[torch.randperm(len(x_ND), generator=gen)[:gm_sample]]
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample.float()))
    lr = lr if lr is not None else scaled_lr(sae.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    warm = max(warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    tracker = DeadLatents(sae.d_sae, dead_tokens)
    k_aux = k_aux if k_aux is not None else sae.d_model // 2
    steps = max(tokens // batch_size, 1)
    order = torch.randperm(len(x_ND), generator=gen)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(x_ND), generator=gen), 0
        x = x_ND[order[cursor : cursor + batch_size]]
        cursor += batch_size
        loss, info = training_loss(sae, x, tracker.dead, k_aux, aux_coef)
        loss.backward()
        sae.remove_parallel_grad()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        tracker.update(info["idx"], info["acts"])
    return tracker

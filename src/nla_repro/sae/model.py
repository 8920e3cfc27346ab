"""The TopK sparse autoencoder (Gao et al. 2024 recipe, as in EleutherAI/sparsify).

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec^T z + b_dec

- Decoder rows (the dictionary directions, "columns" of W_dec in the paper's notation) are kept
  at unit norm: the gradient component parallel to each row is removed before every step and
  rows are renormalized after it.
- `b_dec` starts at the geometric median of a sample; `W_enc` starts as `W_dec` (tied init).
- AuxK: latents that have not fired for `dead_tokens` tokens reconstruct the residual with
  their own top-`k_aux`, which pulls dead latents back into use.
- Only the dense encoder forward pays for all latents: the decoder reads the k active rows per
  token (embedding_bag) and the encoder's backward touches the k selected latents per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SparseTopKEncode(torch.autograd.Function):
    """TopK(ReLU((x - b_dec) W_enc^T + b_enc)) whose backward touches only the k selected
    latents per row: the encoder's weight gradient costs B*k*d instead of a dense B*d_sae*d
    matmul, and b_dec's gradient is -grad(b_enc) @ W_enc (the sum over rows of the input
    gradient, an S x d product instead of a B*k*d gather)."""

    @staticmethod
    def forward(ctx, x_BD, b_dec_D, w_enc_SD, b_enc_S, k: int):
        xc_BD = x_BD - b_dec_D
        pre_BS = torch.addmm(b_enc_S, xc_BD, w_enc_SD.T).relu_()
        acts_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(xc_BD, w_enc_SD, acts_BK, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return acts_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_acts_BK, _grad_idx):
        xc_BD, w_enc_SD, acts_BK, idx_BK = ctx.saved_tensors
        grad_BK = grad_acts_BK * (acts_BK > 0)  # ReLU
        n_rows, k = idx_BK.shape
        grad_x = grad_b_dec = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(grad_BK, idx_BK, w_enc_SD)
        if ctx.needs_input_grad[2]:
            rows = torch.arange(n_rows, device=idx_BK.device).repeat_interleave(k)
            # (S, B) gradient of the pre-activations, k non-zeros per column.
            sparse_SB = torch.sparse_coo_tensor(
                torch.stack([idx_BK.flatten(), rows]),
                grad_BK.flatten(),
                (w_enc_SD.shape[0], n_rows),
                check_invariants=False,  # built from topk indices: in range by construction
            )
            grad_w = torch.sparse.mm(sparse_SB, xc_BD)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            # The pre-activation gradient summed per latent: b_enc's gradient.
            grad_S = torch.zeros_like(w_enc_SD[:, 0]).index_add_(
                0, idx_BK.flatten(), grad_BK.flatten()
            )
            grad_b = grad_S if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[1]:
                grad_b_dec = -(grad_S @ w_enc_SD)
        return grad_x, grad_b_dec, grad_w, grad_b, None


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
        return _SparseTopKEncode.apply(x_BD, self.b_dec, self.W_enc, self.b_enc, self.k)

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

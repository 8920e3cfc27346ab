"""Metric functions on vectors (docs/concepts/metrics.md): the one place for normalization.

`norm(v) = v * sqrt(d) / ||v||` in fp32; `mse_nrm(a, b) = mean((norm(a) - norm(b))**2) =
2 * (1 - cos(a, b))`, range [0, 4], 2 for orthogonal vectors (the random baseline).
"""

from __future__ import annotations

import math

import torch

RANDOM_MSE_NRM = 2.0
"""mse_nrm of two orthogonal vectors: what a reconstruction that knows nothing scores."""
MIN_GAPS = {
    "vector_use_gap": (0.02, "the AV ignores the injected vector (expect template collapse)"),
    "content_gap": (0.01, "the AR is content-blind (it scores an empty string as well)"),
}
"""Validation gaps below these mean a model ignores its input (docs/concepts/failure-modes.md):
the AV's vector-use gap in nats (true vs shuffled vectors), the AR's content gap in mse_nrm
(true explanation vs empty string). The trainers warn, the eval's verdicts flag."""


def normalize(v_ND: torch.Tensor) -> torch.Tensor:
    v_ND = v_ND.float()
    return v_ND * math.sqrt(v_ND.shape[-1]) / v_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mse_nrm_rows(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """mse_nrm of each row pair: (N,)."""
    return (normalize(a_ND) - normalize(b_ND)).pow(2).mean(dim=-1)


def mse_nrm(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """Mean mse_nrm over rows (a scalar the AR trains on)."""
    return mse_nrm_rows(a_ND, b_ND).mean()

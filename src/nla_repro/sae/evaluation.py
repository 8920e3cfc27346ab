"""How good an SAE is: explained variance, FVU, MSE, L0 and firing counts over vectors, and
the LM loss recovered when its reconstruction replaces block L's output
(docs/concepts/metrics.md, "SAE")."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nla_repro.models import adapt, pad_batch, position_ids_from_mask
from nla_repro.sae.model import TopKSAE


@dataclass(frozen=True)
class SAEStats:
    """Reconstruction quality on a set of vectors (docs/concepts/metrics.md, "SAE")."""

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


def lm_loss_recovered(
    model, reconstruct, tokens, special, layer, pad_id, max_norm: float, batch_size: int
) -> dict:
    """Next-token loss on held-out documents: clean, with block L's output replaced by
    `reconstruct(h)` (the SAE), and replaced by zeros, at every position the SAE is trained on
    (special tokens and norm outliers keep their clean value, and are counted)."""
    device = next(model.parameters()).device
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    counts = {"predicted": 0, "spliced": 0, "kept": 0}

    def swap(fn, count: bool):
        def replace(h_ND: torch.Tensor) -> torch.Tensor:
            outlier = h_ND.float().norm(dim=1) > max_norm
            if count:
                counts["spliced"] += int((~outlier).sum())
                counts["kept"] -= int((~outlier).sum())
            return torch.where(outlier.unsqueeze(1), h_ND, fn(h_ND).to(h_ND.dtype))

        return replace

    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        ids, mask, _, _ = pad_batch(batch, pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        specials = torch.tensor(sorted(special), dtype=ids.dtype, device=device)
        splice_BT = mask.bool() & ~torch.isin(ids, specials)
        counts["kept"] += int(mask.sum())
        loss, n = next_token_loss(model, ids, mask)
        totals["clean"] += loss
        counts["predicted"] += n
        for name, fn in (("sae", reconstruct), ("zero", torch.zeros_like)):
            with splice_layer(model, layer, swap(fn, count=name == "sae"), splice_BT):
                totals[name] += next_token_loss(model, ids, mask)[0]
    mean = {k: v / max(counts["predicted"], 1) for k, v in totals.items()}
    return {
        "clean": mean["clean"],
        "sae": mean["sae"],
        "zero_ablation": mean["zero"],
        "recovered": loss_recovered(mean["clean"], mean["sae"], mean["zero"]),
        "docs": len(tokens),
        "predicted_tokens": counts["predicted"],
        "spliced_tokens": counts["spliced"],
        "kept_clean_tokens": counts["kept"],
    }

"""TopK SAE: recovery of known sparse directions, decoder norms, dead-latent accounting."""

from __future__ import annotations

import pytest
import torch

from nla_repro.sae import DeadLatents, TopKSAE, evaluate, fit, geometric_median, scaled_lr


def sparse_data(n: int, d: int, n_dirs: int, k: int, seed: int = 0):
    """n vectors, each a positive combination of k of n_dirs known unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_dirs, generator=gen)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=gen) * 2 + 0.5
    x = (coef.unsqueeze(-1) * dirs[idx]).sum(dim=1)
    return x, dirs


def test_recovers_known_sparse_directions():
    x, dirs = sparse_data(n=8000, d=32, n_dirs=48, k=3)
    sae = TopKSAE(d_model=32, d_sae=96, k=3, seed=0)
    fit(sae, x, batch_size=256, tokens=160_000, lr=3e-3, warmup_steps=20, dead_tokens=2000)
    cos = dirs @ sae.W_dec.detach().T  # (true, latent): decoder rows are unit norm
    best = cos.max(dim=1).values
    assert (best > 0.9).all(), best.sort().values[:5]
    stats = evaluate(sae, x)
    assert stats.explained_variance > 0.95 and stats.l0 <= 3
    assert stats.fvu == pytest.approx(1 - stats.explained_variance)


def test_decoder_rows_stay_unit_norm_and_steps_move_only_their_direction():
    x, _ = sparse_data(n=512, d=16, n_dirs=20, k=2)
    sae = TopKSAE(d_model=16, d_sae=40, k=2)
    assert torch.equal(sae.W_enc, sae.W_dec)  # tied init
    fit(sae, x, batch_size=64, tokens=2048, lr=1e-2)
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(40))
    loss = sae(x[:64]).pow(2).sum()
    loss.backward()
    sae.remove_parallel_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-5


def test_dead_latent_accounting_matches_a_hand_count():
    tracker = DeadLatents(d_sae=5, window=4)
    # Batch 1 (2 tokens): latents 0 and 1 fire; 2 is selected with a zero activation.
    tracker.update(torch.tensor([[0, 2], [1, 2]]), torch.tensor([[1.0, 0.0], [0.5, 0.0]]))
    assert tracker.since_fired.tolist() == [0, 0, 2, 2, 2]
    # Batch 2 (3 tokens): latent 3 fires.
    tracker.update(torch.tensor([[3], [3], [0]]), torch.tensor([[1.0], [2.0], [0.0]]))
    assert tracker.since_fired.tolist() == [3, 3, 5, 0, 5]
    assert tracker.dead.tolist() == [False, False, True, False, True]


def test_decode_by_gather_equals_the_dense_product():
    sae = TopKSAE(d_model=8, d_sae=24, k=4, seed=3)
    x = torch.randn(10, 8)
    acts, idx = sae.encode(x)
    dense = sae.to_dense(acts, idx)
    assert ((dense > 0).sum(dim=1) <= 4).all()
    torch.testing.assert_close(sae.decode(acts, idx), dense @ sae.W_dec + sae.b_dec)


def test_geometric_median_resists_outliers_and_lr_scales_with_width():
    x = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 1000.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(dim=0).norm()
    assert scaled_lr(2**14) == pytest.approx(2e-4)
    assert scaled_lr(4 * 2**14) == pytest.approx(1e-4)


def test_sparse_encoder_backward_equals_dense_autograd():
    torch.manual_seed(0)
    sae = TopKSAE(d_model=12, d_sae=40, k=5, seed=1)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.5)
        sae.b_dec.normal_()
    x = torch.randn(9, 12)
    weights = torch.randn(9, 12)

    def dense_forward(x):
        acts, idx = sae.pre_acts(x).topk(sae.k, dim=-1, sorted=False)
        return sae.decode(acts, idx)

    grads = []
    for forward in (sae.forward, dense_forward):
        sae.zero_grad()
        (forward(x) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5)
    assert (grads[0]["W_enc"].abs().sum(dim=1) > 0).sum() <= 9 * 5  # only selected latents

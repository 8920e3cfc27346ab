"""The NLA metric functions (docs/concepts/metrics.md), pure: vectors, texts and per-row numbers
in, plain floats and dicts out. Normalization and mse_nrm are defined once, in
`nla_repro.metrics`.

Two views of every cosine: raw `cos(h, v)`, and centred `fve_cen = 0.5 * (1 + cos(h - mu,
v - mu))` with `mu` the mean of a held-out pool. Activations share a large mean direction, so
raw cosines sit high even for a reconstruction that knows nothing; centred, knowing nothing is
0.5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from nla_repro.metrics import normalize

PREFIX_CHARS = (60, 80, 100)
"""Prefix lengths at which template diversity counts outputs sharing their start."""


ALPHA = 0.05
"""Two-sided 95% intervals; one-sided tests at 5%."""


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _unit(x_ND: np.ndarray) -> np.ndarray:
    return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), 1e-12)


def cosine_rows(a_ND, b_ND) -> np.ndarray:
    """cos(a_i, b_i) per row."""
    return (_unit(_np(a_ND)) * _unit(_np(b_ND))).sum(-1)


def fve_cen_rows(h_ND, v_ND, mu_D) -> np.ndarray:
    """0.5 * (1 + cos(h - mu, v - mu)) per row: 0.5 is a reconstruction that knows nothing."""
    mu = _np(mu_D)
    return 0.5 * (1.0 + cosine_rows(_np(h_ND) - mu, _np(v_ND) - mu))


def mse_nrm_from_cos(cos_N) -> np.ndarray:
    """mse_nrm = 2 * (1 - cos): the normalized-vector mse, 2 for orthogonal vectors."""
    return 2.0 * (1.0 - _np(cos_N))


def normalized(x_ND) -> np.ndarray:
    """norm(v) (`nla_repro.metrics.normalize`, fp32) as a float64 array."""
    return normalize(torch.from_numpy(_np(x_ND))).double().numpy()


def fve_nrm(mse_nrm_N, targets_ND, train_mean_nrm_D) -> float:
    """1 - mean(mse_nrm) / MSE(norm(v), m): m the mean of norm(v) over the train pool, the
    MSE over the evaluated targets (the reference implementation's definition). Predicting
    m itself scores 0, but m is not a unit-norm vector; the best constant normalized
    prediction (the mean direction) scores below 0, so read fve_nrm against the
    mean-direction predictor measured beside it."""
    denom = fve_nrm_denominator(targets_ND, train_mean_nrm_D)
    return 1.0 - float(_np(mse_nrm_N).mean()) / denom


def fve_nrm_denominator(targets_ND, train_mean_nrm_D) -> float:
    """MSE(norm(v), m) over the evaluated targets: the variance fve_nrm explains."""
    return float(((normalized(targets_ND) - _np(train_mean_nrm_D)) ** 2).mean())


def cosine_matrix(a_ND, b_MD, mu_D=None) -> np.ndarray:
    """C[i, j] = cos(a_i, b_j) (centred on mu when given)."""
    a, b = _np(a_ND), _np(b_MD)
    if mu_D is not None:
        a, b = a - _np(mu_D), b - _np(mu_D)
    return _unit(a) @ _unit(b).T


def summary(values) -> dict:
    v = _np(values)
    if len(v) == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": len(v),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def bootstrap_ci(values, seed: int, n_boot: int, stat=np.mean) -> list[float]:
    """Percentile bootstrap 95% interval of `stat` over rows (rows resampled with
    replacement; `values` may be 2-D, rows first, for ratio statistics)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    boots = np.array([stat(v[i]) for i in idx])
    lo, hi = np.quantile(boots, [ALPHA / 2, 1 - ALPHA / 2])
    return [float(lo), float(hi)]


def mean_ci(values, seed: int, n_boot: int) -> dict:
    v = _np(values)
    mean = float(v.mean()) if len(v) else None
    return {"n": len(v), "mean": mean, "ci95": bootstrap_ci(v, seed, n_boot)}


def paired_difference(a_N, b_N, seed: int, n_boot: int) -> dict:
    """mean(a - b) over the same rows with its paired bootstrap 95% interval, and the share
    of rows where a scores higher (`win_rate`, ties count half)."""
    a, b = _np(a_N), _np(b_N)
    d = a - b
    out = mean_ci(d, seed, n_boot)
    out["win_rate"] = float(((d > 0) + 0.5 * (d == 0)).mean()) if len(d) else None
    return out


def ratio_difference(num_a_N, num_b_N, denom_N, seed: int, n_boot: int) -> dict:
    """(sum b - sum a) / sum denom over the same rows, with a paired bootstrap interval that
    resamples rows: the fve_nrm gain of a over b when a and b are per-row errors."""
    m = np.stack([_np(num_a_N), _np(num_b_N), _np(denom_N)], axis=1)

    def stat(x: np.ndarray) -> float:
        return float((x[:, 1].sum() - x[:, 0].sum()) / x[:, 2].sum())

    n = len(m)
    return {
        "n": n,
        "mean": stat(m) if n else None,
        "ci95": bootstrap_ci(m, seed, n_boot, stat=stat),
    }


def stratified_sample(groups_N, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded random sample of n rows, stratified by group (proportional
    allocation, largest remainders, every group at least one row when n allows), in a
    random order; all rows (shuffled) when n is 0 or at least the number of rows."""
    g = np.asarray(groups_N)
    rng = np.random.default_rng(seed)
    if n <= 0 or n >= len(g):
        return rng.permutation(len(g))
    names, counts = np.unique(g, return_counts=True)
    quota = counts * n / len(g)
    floor_k = 1 if n >= len(names) else 0
    take = np.maximum(np.floor(quota).astype(int), floor_k)
    # Hand out what is left by largest remainder (ties: the larger group), or take back
    # from the largest allocations when the one-per-group minimum overshot.
    order = np.lexsort((-counts, -(quota - np.floor(quota))))
    i = 0
    while take.sum() < n:
        j = order[i % len(order)]
        if take[j] < counts[j]:
            take[j] += 1
        i += 1
    while take.sum() > n:
        over = np.where(take > floor_k, take - quota, -np.inf)
        take[np.argmax(over)] -= 1
    picked = [
        rng.choice(np.flatnonzero(g == name), size=k, replace=False)
        for name, k in zip(names, take, strict=True)
    ]
    return rng.permutation(np.concatenate(picked))


def binomial_above_chance(hits: int, n: int, chance: float) -> float:
    """One-sided p-value of `hits` or more successes in n trials at the chance rate."""
    if n == 0:
        return 1.0
    return float(stats.binomtest(hits, n, chance, alternative="greater").pvalue)


def k_values(k_max: int) -> list[int]:
    """1, 2, 4, ... up to k_max (and k_max itself)."""
    ks = [k for k in (2**i for i in range(32)) if k <= k_max]
    return ks + ([k_max] if k_max and ks[-1] != k_max else [])


def best_of_k(scores_NK, logprob_NK) -> list[dict]:
    """Per K: mean over rows of the best of the first K samples by the AR's own score (oracle
    rerank) and of the sample the AV finds likeliest (log-prob rerank)."""
    s, lp = np.asarray(scores_NK, np.float64), np.asarray(logprob_NK, np.float64)
    out = []
    for k in k_values(s.shape[1] if s.ndim == 2 else 0):
        pick = lp[:, :k].argmax(axis=1)
        out.append(
            {
                "k": k,
                "oracle": float(s[:, :k].max(axis=1).mean()),
                "logprob_rerank": float(s[np.arange(len(s)), pick].mean()),
            }
        )
    return out


def spearman_logprob_score(scores_NK, logprob_NK) -> dict:
    """How well the AV's log-prob ranks its samples by AR score: Spearman within each row
    (rows with >= 3 samples and no constant column), averaged, and pooled over all samples."""
    s, lp = np.asarray(scores_NK, np.float64), np.asarray(logprob_NK, np.float64)
    within = []
    if s.ndim == 2 and s.shape[1] >= 3:
        for a, b in zip(s, lp, strict=True):
            if np.ptp(a) > 0 and np.ptp(b) > 0:
                within.append(stats.spearmanr(a, b).statistic)
    pooled = (
        float(stats.spearmanr(s.ravel(), lp.ravel()).statistic)
        if s.size >= 3 and np.ptp(s) > 0 and np.ptp(lp) > 0
        else None
    )
    return {
        "within_row_mean": float(np.mean(within)) if within else None,
        "n_rows": len(within),
        "pooled": pooled,
        "n_samples": int(s.size),
    }


def identity(rec_ND, targets_ND, mu_D=None) -> dict:
    """C[i, j] = cos(AR(AV(v_i)), v_j): does row i's reconstruction point at v_i rather than
    at the other targets? Argmax accuracy vs chance 1/n with a one-sided binomial test."""
    c = cosine_matrix(rec_ND, targets_ND, mu_D)
    n = len(c)
    off = ~np.eye(n, dtype=bool)
    hits = int((c.argmax(axis=1) == np.arange(n)).sum())
    diag = float(np.diag(c).mean())
    offdiag = float(c[off].mean()) if n > 1 else float("nan")
    return {
        "n": n,
        "diag_mean": diag,
        "offdiag_mean": offdiag,
        "margin": diag - offdiag,
        "argmax_hits": hits,
        "argmax_accuracy": hits / n if n else float("nan"),
        "chance": 1.0 / n if n else float("nan"),
        "p_value": binomial_above_chance(hits, n, 1.0 / n) if n else 1.0,
    }


def diversity(texts: list[str]) -> dict:
    """Unique full outputs / n, and for each prefix length the share of outputs whose first
    P characters another output shares (and the largest such group)."""
    n = len(texts)
    out: dict = {
        "n": n,
        "unique_outputs": len(set(texts)),
        "unique_rate": len(set(texts)) / n if n else float("nan"),
        "empty_outputs": sum(1 for t in texts if not t.strip()),
    }
    out["empty_rate"] = out["empty_outputs"] / n if n else float("nan")
    for p in PREFIX_CHARS:
        counts = pd.Series([t[:p] for t in texts]).value_counts()
        shared = int(counts[counts > 1].sum())
        out[f"shared_prefix_{p}"] = shared / n if n else float("nan")
        out[f"largest_prefix_group_{p}"] = int(counts.max()) if n else 0
    return out

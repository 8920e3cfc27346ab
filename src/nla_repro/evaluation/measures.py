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
from scipy import stats

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


def fve_nrm(mse_nrm: float, rawvar: float) -> float:
    """1 - mse_nrm / rawvar: 0 is the predict-the-pool-mean baseline, 1 is perfect."""
    return 1.0 - mse_nrm / rawvar


def cosine_matrix(a_ND, b_MD, mu_D=None) -> np.ndarray:
    """C[i, j] = cos(a_i, b_j) (centred on mu when given)."""
    a, b = _np(a_ND), _np(b_MD)
    if mu_D is not None:
        a, b = a - _np(mu_D), b - _np(mu_D)
    return _unit(a) @ _unit(b).T


def random_floor(targets_ND, mu_D) -> dict:
    """What an unrelated vector of the same pool scores: the mean off-diagonal cosine between
    targets, raw and centred (as fve_cen)."""
    n = len(targets_ND)
    off = ~np.eye(n, dtype=bool)
    raw = cosine_matrix(targets_ND, targets_ND)[off].mean() if n > 1 else float("nan")
    cen = cosine_matrix(targets_ND, targets_ND, mu_D)[off].mean() if n > 1 else float("nan")
    return {"cos": float(raw), "fve_cen": float(0.5 * (1 + cen))}


def nearest_in_pool(targets_ND, pool_MD, mu_D) -> tuple[np.ndarray, np.ndarray]:
    """Per target: the best raw cosine and the best fve_cen of any pool vector (a lookup of a
    training activation, the most a reconstruction could get without reading anything new)."""
    raw = cosine_matrix(targets_ND, pool_MD).max(axis=1)
    cen = 0.5 * (1 + cosine_matrix(targets_ND, pool_MD, mu_D).max(axis=1))
    return raw, cen


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

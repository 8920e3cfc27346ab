"""The NLA metric suite (DESIGN.md "Metrics") and its verdicts, as pure functions.

Inputs are vectors (numpy or torch), texts and per-row numbers; outputs are plain floats and
dicts. `compute_metrics(rows, meta)` turns data/eval/rows.parquet into metrics/eval.json, so
the published numbers recompute exactly from the per-row table. Normalization and mse_nrm are
defined once, in metrics.py; every mean here counts every row (an empty AV output is scored as
the empty string, never dropped).

Two views of every cosine: raw `cos(h, v)`, and centred `fve_cen = 0.5 * (1 + cos(h - mu,
v - mu))` with `mu` the mean of a held-out pool. Activations share a large mean direction, so
raw cosines sit high even for a reconstruction that knows nothing; centred, knowing nothing is
0.5.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from scipy import stats

from nla_repro.metrics import RANDOM_MSE_NRM
from nla_repro.schemas import EVAL_CONDITIONS
from nla_repro.templates import CLOSE_TAG, OPEN_TAG, format_explanation, parse_explanation
from nla_repro.trainer import MIN_GAPS

PREFIX_CHARS = (60, 80, 100)
"""Prefix lengths at which template diversity counts outputs sharing their start."""
ALPHA = 0.05
"""Two-sided 95% intervals; one-sided tests at 5%."""
TEMPLATE_COLLAPSE_UNIQUE = 0.5
"""Fewer unique greedy outputs than this share of rows is template collapse."""
MIN_VECTOR_USE_GAP = MIN_GAPS["vector_use_gap"][0]
"""Nats; below it the AV ignores the vector (the floor the trainer warns at)."""


# ---------------------------------------------------------------------------------------------
# Cosines


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


# ---------------------------------------------------------------------------------------------
# Summaries and intervals


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


# ---------------------------------------------------------------------------------------------
# Best-of-K


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


# ---------------------------------------------------------------------------------------------
# Cross-row identity


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


# ---------------------------------------------------------------------------------------------
# Texts: claims, gibberish, diversity


def claims(explanation: str) -> list[str]:
    """The claims of an explanation: its features when it parses, otherwise its non-empty
    lines (tags and bullets stripped), otherwise its sentences."""
    parsed = parse_explanation(explanation)
    if parsed.ok:
        return list(parsed.features)
    body = explanation.replace(OPEN_TAG, "\n").replace(CLOSE_TAG, "\n")
    lines = [re.sub(r"^\s*[-*•]\s*", "", ln).strip() for ln in body.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) == 1:
        lines = [s.strip() for s in re.split(r"(?<=[.!?])\s+", lines[0]) if s.strip()]
    return lines


def join_claims(parts: list[str]) -> str:
    """An explanation made of these claims, in the canonical format."""
    return format_explanation(parts) if parts else ""


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


# ---------------------------------------------------------------------------------------------
# The whole suite from the per-row table


def _stack(column: pd.Series) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float64) for v in column])


def _ragged_max(column: pd.Series) -> np.ndarray:
    """Per-row max of a list column; rows with an empty list give NaN."""
    return np.array([max(v) if len(v) else np.nan for v in column], dtype=np.float64)


def _fmt_ci(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:.4f} [{lo:.4f}, {hi:.4f}] (n={d['n']})"


def _none_if_nan(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _clean(obj):
    """NaN -> None so metrics/eval.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return _none_if_nan(obj)


def compute_metrics(rows: pd.DataFrame, meta: dict) -> dict:
    """metrics/eval.json from data/eval/rows.parquet and its metadata (`mu`, `rawvar`,
    `n_boot`, `seed`, names of the models and the judge). Nested by metric family."""
    mu, rawvar = np.asarray(meta["mu"], np.float64), float(meta["rawvar"])
    seed, n_boot = int(meta["seed"]), int(meta["n_boot"])
    n = len(rows)
    targets = _stack(rows["target"])
    cos = {c: cosine_rows(_stack(rows[f"rec_{c}"]), targets) for c in EVAL_CONDITIONS}
    cen = {c: fve_cen_rows(_stack(rows[f"rec_{c}"]), targets, mu) for c in EVAL_CONDITIONS}
    empty = rows["explanation"].str.strip() == ""

    # Round trip (greedy AV output through the AR), raw and normalized-mse views.
    mse = mse_nrm_from_cos(cos["greedy"])
    round_trip = {
        "cos": summary(cos["greedy"]) | {"ci95": bootstrap_ci(cos["greedy"], seed, n_boot)},
        "mse_nrm": float(mse.mean()),
        "mse_nrm_random_baseline": RANDOM_MSE_NRM,
        "fve_nrm": fve_nrm(float(mse.mean()), rawvar),
        "fve_nrm_mean_baseline": 0.0,
        "rawvar": rawvar,
        "cos_nonempty_outputs": summary(cos["greedy"][~empty.to_numpy()]),
        "empty_outputs_scored_as_empty_string": int(empty.sum()),
    }

    # Centred view with its anchors.
    floor = random_floor(targets, mu)
    k_max = len(rows["samples"].iloc[0]) if n else 0
    sample_cos = _stack(rows["sample_cos"]) if k_max else np.zeros((n, 0))
    sample_cen = _stack(rows["sample_fve_cen"]) if k_max else np.zeros((n, 0))
    logprob = _stack(rows["sample_logprob"]) if k_max else np.zeros((n, 0))
    para_cos, para_cen = _ragged_max(rows["para_cos"]), _ragged_max(rows["para_fve_cen"])
    has_para = ~np.isnan(para_cen)

    def side_by_side(raw: np.ndarray, centred: np.ndarray) -> dict:
        return {
            "cos": mean_ci(raw, seed, n_boot),
            "fve_cen": mean_ci(centred, seed, n_boot),
        }

    anchors = {
        "greedy": side_by_side(cos["greedy"], cen["greedy"]),
        "replay": side_by_side(cos["replay"], cen["replay"]),
        "nn_in_pool": side_by_side(rows["nn_cos"].to_numpy(), rows["nn_fve_cen"].to_numpy()),
        "paraphrase_ceiling": side_by_side(para_cos[has_para], para_cen[has_para]),
        "random_floor": {"cos": floor["cos"], "fve_cen": floor["fve_cen"]},
    }
    if k_max:
        anchors[f"best_of_{k_max}"] = side_by_side(sample_cos.max(axis=1), sample_cen.max(axis=1))

    curve = {
        "k_max": k_max,
        "cos": best_of_k(sample_cos, logprob) if k_max else [],
        "fve_cen": best_of_k(sample_cen, logprob) if k_max else [],
        "spearman_logprob_vs_cos": spearman_logprob_score(sample_cos, logprob),
        "spearman_logprob_vs_fve_cen": spearman_logprob_score(sample_cen, logprob),
        "sample_empty_rate": float(np.mean([not s.strip() for ss in rows["samples"] for s in ss]))
        if k_max
        else None,
    }

    # Content-blindness ablation: how much of the AR's score is the explanation's content?
    ablation = {c: side_by_side(cos[c], cen[c]) for c in EVAL_CONDITIONS}
    share = {
        "cos": mean_ci(cos["greedy"] - cos["empty"], seed, n_boot),
        "fve_cen": mean_ci(cen["greedy"] - cen["empty"], seed, n_boot),
    }
    ablation["explanation_share"] = share

    ident_raw = identity(_stack(rows["rec_greedy"]), targets)
    ident_cen = identity(_stack(rows["rec_greedy"]), targets, mu)

    # Per-claim: mse without the claim minus mse with all claims, in FVE points.
    deltas = np.array([d for ds in rows["claim_delta_mse"] for d in ds], dtype=np.float64)
    fve_greedy = round_trip["fve_nrm"]
    per_claim = {
        "n_claims": len(deltas),
        "n_rows": int(sum(1 for ds in rows["claim_delta_mse"] if len(ds))),
        "delta_mse": summary(deltas) | {"ci95": bootstrap_ci(deltas, seed, n_boot)},
        "delta_fve": summary(deltas / rawvar),
        "share_of_fve": float(deltas.mean() / rawvar / fve_greedy)
        if len(deltas) and fve_greedy > 0
        else None,
    }

    texts = rows["explanation"].tolist()
    div = diversity(texts)

    nll = rows[["nll_true", "nll_shuffled", "n_label_tokens"]].to_numpy(np.float64)

    def gap(m: np.ndarray) -> float:
        return float((m[:, 1].sum() - m[:, 0].sum()) / m[:, 2].sum())

    vector_use = {
        "n": n,
        "loss_true": float(nll[:, 0].sum() / nll[:, 2].sum()),
        "loss_shuffled": float(nll[:, 1].sum() / nll[:, 2].sum()),
        "gap": gap(nll),
        "ci95": bootstrap_ci(nll, seed, n_boot, stat=gap),
        "min_gap": MIN_VECTOR_USE_GAP,
    }

    judged = rows["judge_validity"].notna()
    pref = rows["judge_preferred"]
    decided = int((pref != "").sum())
    judge = {
        "model": meta.get("judge_model"),
        "backend": meta.get("judge_backend"),
        "n": int(judged.sum()),
        "av_validity": mean_ci(rows.loc[judged, "judge_validity"], seed, n_boot),
        "av_specificity": mean_ci(rows.loc[judged, "judge_specificity"], seed, n_boot),
        "label_validity": mean_ci(rows["label_validity"].dropna(), seed, n_boot),
        "label_specificity": mean_ci(rows["label_specificity"].dropna(), seed, n_boot),
        "pairwise_n": decided,
        "pairwise_av_win_rate": float((pref == "av").sum() / decided) if decided else None,
    }

    verdicts, evidence = _verdicts(
        vector_use, div, share, ident_raw, ident_cen, anchors, floor, k_max
    )
    return _clean(
        {
            "n": n,
            "models": meta.get("models", {}),
            "round_trip": round_trip,
            "centred": anchors,
            "best_of_k": curve,
            "ablation": ablation,
            "identity": {"raw": ident_raw, "centred": ident_cen},
            "per_claim": per_claim,
            "diversity": div,
            "vector_use": vector_use,
            "judge": judge,
            "verdicts": verdicts,
            "verdict_evidence": evidence,
        }
    )


def _verdicts(vector_use, div, share, ident_raw, ident_cen, anchors, floor, k_max):
    """Flags a reader must not miss, each with the numbers that decided it."""
    v: dict[str, bool | None] = {}
    e: dict[str, str] = {}
    v["av_ignores_vector"] = vector_use["gap"] < MIN_VECTOR_USE_GAP
    e["av_ignores_vector"] = (
        f"test loss with shuffled minus true vectors = {vector_use['gap']:.4f} nats "
        f"(95% CI {vector_use['ci95'][0]:.4f}, {vector_use['ci95'][1]:.4f}); "
        f"below {MIN_VECTOR_USE_GAP} means the AV ignores the vector"
    )
    v["template_collapse"] = div["unique_rate"] < TEMPLATE_COLLAPSE_UNIQUE
    e["template_collapse"] = (
        f"{div['unique_outputs']}/{div['n']} unique greedy outputs "
        f"(collapse below {TEMPLATE_COLLAPSE_UNIQUE:.0%}); "
        f"{div['shared_prefix_60']:.0%} share their first 60 characters"
    )
    # Content-blind unless the explanation's share is above zero in both views (a NaN
    # interval, from fewer than 2 rows, counts as not above zero).
    lows = [share["cos"]["ci95"][0], share["fve_cen"]["ci95"][0]]
    v["content_blind"] = not all(lo > 0 for lo in lows)
    e["content_blind"] = (
        f"AR on the AV output minus on the empty string: raw {_fmt_ci(share['cos'])}, "
        f"centred {_fmt_ci(share['fve_cen'])}; blind unless both intervals are above 0"
    )
    v["identity_above_chance"] = ident_raw["p_value"] < ALPHA
    e["identity_above_chance"] = (
        f"argmax accuracy {ident_raw['argmax_hits']}/{ident_raw['n']} raw, "
        f"{ident_cen['argmax_hits']}/{ident_cen['n']} centred, chance 1/{ident_raw['n']}; "
        f"one-sided binomial p = {ident_raw['p_value']:.3g} (raw)"
    )
    greedy_cen = anchors["greedy"]["fve_cen"]
    v["above_random_floor"] = bool(greedy_cen["ci95"][0] > floor["fve_cen"])
    e["above_random_floor"] = (
        f"centred round trip {_fmt_ci(greedy_cen)} vs random floor {floor['fve_cen']:.4f}"
    )
    ceiling = anchors["paraphrase_ceiling"]["fve_cen"]
    best = anchors.get(f"best_of_{k_max}", {}).get("fve_cen") if k_max else None
    if ceiling["n"] and best is not None:
        v["beats_paraphrase_ceiling"] = bool(best["mean"] > ceiling["mean"])
        e["beats_paraphrase_ceiling"] = (
            f"centred best-of-{k_max} {best['mean']:.4f} vs paraphrase ceiling "
            f"{ceiling['mean']:.4f} (n={ceiling['n']}); greedy {greedy_cen['mean']:.4f}"
        )
    else:
        v["beats_paraphrase_ceiling"] = None
        e["beats_paraphrase_ceiling"] = "no samples or no paraphrases were evaluated"
    return v, e

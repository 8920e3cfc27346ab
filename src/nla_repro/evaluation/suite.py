"""The eval suite: metrics/eval.json from data/eval/rows.parquet, and its verdicts.

`compute_metrics(rows, meta)` turns the per-row table into the published numbers, so every
number recomputes exactly from rows.parquet; every mean counts every row (an empty AV output
is scored as the empty string, never dropped). The verdicts flag the failure modes of
docs/concepts/failure-modes.md, each with the numbers that decided it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from nla_repro.evaluation import registry
from nla_repro.evaluation.measures import (
    ALPHA,
    best_of_k,
    bootstrap_ci,
    cosine_rows,
    diversity,
    fve_cen_rows,
    fve_nrm,
    fve_nrm_denominator,
    identity,
    mean_ci,
    mse_nrm_from_cos,
    normalized,
    paired_difference,
    ratio_difference,
    spearman_logprob_score,
    summary,
)
from nla_repro.metrics import MIN_GAPS, RANDOM_MSE_NRM
from nla_repro.schemas import BASELINE_PREDICTORS, EVAL_CONDITIONS

TEMPLATE_COLLAPSE_UNIQUE = 0.5
"""Fewer unique greedy outputs than this share of rows is template collapse."""


MIN_VECTOR_USE_GAP = MIN_GAPS["vector_use_gap"][0]
"""Nats; below it the AV ignores the vector (the floor the trainer warns at)."""


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


def clean_json(obj):
    """NaN -> None so metrics/eval.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return _none_if_nan(obj)


# Predictors scored on the same rows as the round trip (docs/concepts/metrics.md), each with
# its per-row raw and centred scores. The AR's input conditions and the text-free vectors are
# read from their `rec_*` columns; the rest from per-row score columns.
VECTOR_PREDICTORS = tuple(c for c in EVAL_CONDITIONS if c != "greedy") + BASELINE_PREDICTORS
SCORE_PREDICTORS = (
    "random_floor",
    "paraphrase",
    "paraphrase_ceiling",
    "best_of_k",
    "logprob_rerank",
)
FAMILY_BASELINES = ("mean_direction", "centroid")
"""The baselines the per-family table compares the round trip with."""


def _predictor_scores(rows: pd.DataFrame, targets: np.ndarray, mu: np.ndarray) -> dict:
    """name -> (row mask, raw cos, fve_cen) of every predictor on the rows it scored."""
    n = len(rows)
    everywhere = np.ones(n, dtype=bool)
    out = {}
    for name in VECTOR_PREDICTORS:
        rec = _stack(rows[f"rec_{name}"])
        out[name] = (everywhere, cosine_rows(rec, targets), fve_cen_rows(rec, targets, mu))
    out["random_floor"] = (
        everywhere,
        rows["floor_cos"].to_numpy(),
        rows["floor_fve_cen"].to_numpy(),
    )
    # Paraphrases of the label: one paraphrase's expected score (mean over the N), and the
    # best of N by the AR's own score (the reference's ceiling; an oracle when N > 1).
    has_para = rows["para_cos"].map(len).to_numpy() > 0
    out["paraphrase"] = (
        has_para,
        np.array([np.mean(v) for v in rows["para_cos"][has_para]]),
        np.array([np.mean(v) for v in rows["para_fve_cen"][has_para]]),
    )
    out["paraphrase_ceiling"] = (
        has_para,
        _ragged_max(rows["para_cos"][has_para]),
        _ragged_max(rows["para_fve_cen"][has_para]),
    )
    k_max = len(rows["samples"].iloc[0]) if n else 0
    if k_max:
        s_cos, s_cen = _stack(rows["sample_cos"]), _stack(rows["sample_fve_cen"])
        pick = _stack(rows["sample_logprob"]).argmax(axis=1)  # the AV's likeliest sample
        out["best_of_k"] = (everywhere, s_cos.max(axis=1), s_cen.max(axis=1))
        out["logprob_rerank"] = (everywhere, s_cos[np.arange(n), pick], s_cen[np.arange(n), pick])
    return out


def _versus(rt: tuple, other: tuple, mask, var_N, targets, m_nrm, seed, n_boot) -> dict:
    """A predictor's scores, and the round trip minus it on the same rows (paired)."""
    _, cos_o, cen_o = other
    cos_rt, cen_rt = rt[1][mask], rt[2][mask]
    mse_o, mse_rt = mse_nrm_from_cos(cos_o), mse_nrm_from_cos(cos_rt)
    return {
        "cos": mean_ci(cos_o, seed, n_boot),
        "fve_cen": mean_ci(cen_o, seed, n_boot),
        "fve_nrm": fve_nrm(mse_o, targets[mask], m_nrm) if mask.any() else None,
        "round_trip_minus": {
            "cos": paired_difference(cos_rt, cos_o, seed, n_boot),
            "fve_cen": paired_difference(cen_rt, cen_o, seed, n_boot),
            "fve_nrm": ratio_difference(mse_rt, mse_o, var_N[mask], seed, n_boot),
        },
    }


def compute_metrics(rows: pd.DataFrame, meta: dict) -> dict:
    """metrics/eval.json from data/eval/rows.parquet and its metadata (`mu`,
    `train_mean_nrm`, `n_boot`, `seed`, the baselines, names of the models and the judge).
    Nested by metric family."""
    mu, m_nrm = np.asarray(meta["mu"], np.float64), np.asarray(meta["train_mean_nrm"], np.float64)
    seed, n_boot = int(meta["seed"]), int(meta["n_boot"])
    n = len(rows)
    targets = _stack(rows["target"])
    rec_greedy = _stack(rows["rec_greedy"])
    cos_rt, cen_rt = cosine_rows(rec_greedy, targets), fve_cen_rows(rec_greedy, targets, mu)
    mse_rt = mse_nrm_from_cos(cos_rt)
    # Per row, the variance fve_nrm explains: mean((norm(v) - m)^2) with m the train mean.
    var_N = ((normalized(targets) - m_nrm) ** 2).mean(axis=1)
    empty = rows["explanation"].str.strip() == ""

    # Round trip (greedy AV output through the AR): raw, centred, normalized-mse views.
    round_trip = {
        "cos": summary(cos_rt) | {"ci95": bootstrap_ci(cos_rt, seed, n_boot)},
        "fve_cen": mean_ci(cen_rt, seed, n_boot),
        "mse_nrm": float(mse_rt.mean()),
        "mse_nrm_random_baseline": RANDOM_MSE_NRM,
        "fve_nrm": fve_nrm(mse_rt, targets, m_nrm),
        "fve_nrm_denominator": fve_nrm_denominator(targets, m_nrm),
        # How far the reconstructions and the targets lean towards the train mean direction:
        # reconstructions leaning further than the targets favour the constant predictor.
        "cos_to_mean_direction": {
            "reconstruction": float(
                cosine_rows(rec_greedy, _stack(rows["rec_mean_direction"])).mean()
            ),
            "target": float(cosine_rows(targets, _stack(rows["rec_mean_direction"])).mean()),
        },
        "cos_nonempty_outputs": summary(cos_rt[~empty.to_numpy()]),
        "empty_outputs_scored_as_empty_string": int(empty.sum()),
    }

    # Every predictor on the same rows, with the round trip's paired lead over it.
    rt = (np.ones(n, dtype=bool), cos_rt, cen_rt)
    scores = _predictor_scores(rows, targets, mu)
    predictors = {
        name: _versus(rt, sc, sc[0], var_N, targets, m_nrm, seed, n_boot)
        for name, sc in scores.items()
    }

    # Oracle against oracle: the best of K samples minus the best paraphrase, paired over the
    # rows that have both (the reference's headline comparison).
    oracle_vs_ceiling = None
    if "best_of_k" in scores and scores["paraphrase_ceiling"][0].any():
        mask, _, cen_ceiling = scores["paraphrase_ceiling"]
        oracle_vs_ceiling = paired_difference(
            scores["best_of_k"][2][mask], cen_ceiling, seed, n_boot
        )

    k_max = len(rows["samples"].iloc[0]) if n else 0
    sample_cos = _stack(rows["sample_cos"]) if k_max else np.zeros((n, 0))
    sample_cen = _stack(rows["sample_fve_cen"]) if k_max else np.zeros((n, 0))
    logprob = _stack(rows["sample_logprob"]) if k_max else np.zeros((n, 0))
    curve = {
        "k_max": k_max,
        "cos": best_of_k(sample_cos, logprob) if k_max else [],
        "fve_cen": best_of_k(sample_cen, logprob) if k_max else [],
        "spearman_logprob_vs_cos": spearman_logprob_score(sample_cos, logprob),
        "spearman_logprob_vs_fve_cen": spearman_logprob_score(sample_cen, logprob),
        "oracle_minus_paraphrase_ceiling_fve_cen": oracle_vs_ceiling,
        "sample_empty_rate": float(np.mean([not s.strip() for ss in rows["samples"] for s in ss]))
        if k_max
        else None,
    }

    # The sample estimates the split; per family, the round trip and its lead over the
    # text-free baselines.
    per_family = {}
    for family in sorted(rows["source_family"].unique()):
        mask = (rows["source_family"] == family).to_numpy()
        lead = {}
        for name in FAMILY_BASELINES:
            _, cos_b, cen_b = scores[name]
            lead[name] = {
                "cos": paired_difference(cos_rt[mask], cos_b[mask], seed, n_boot),
                "fve_cen": paired_difference(cen_rt[mask], cen_b[mask], seed, n_boot),
            }
        per_family[family] = {
            "n": int(mask.sum()),
            "cos": mean_ci(cos_rt[mask], seed, n_boot),
            "fve_cen": mean_ci(cen_rt[mask], seed, n_boot),
            "round_trip_minus": lead,
        }
    sample = {
        "n": n,
        "split_rows": int(meta.get("split_rows", n)),
        "rule": meta.get("sample", "all rows"),  # or "a random sample (...)"
        "families": {f: v["n"] for f, v in per_family.items()},
    }

    ident_raw = identity(rec_greedy, targets)
    ident_cen = identity(rec_greedy, targets, mu)

    # Per-claim: mse without the claim minus mse with all claims, in fve_nrm points; the
    # interval resamples rows (a row's claims move together).
    deltas_R = [np.asarray(ds, np.float64) for ds in rows["claim_delta_mse"]]
    deltas = np.concatenate(deltas_R) if deltas_R else np.zeros(0)
    denom = round_trip["fve_nrm_denominator"]
    by_row = np.array([[d.sum(), len(d)] for d in deltas_R if len(d)]).reshape(-1, 2)
    per_claim = {
        "n_claims": len(deltas),
        "n_rows": len(by_row),
        "delta_mse": summary(deltas) | {"ci95": bootstrap_ci(deltas, seed, n_boot)},
        "delta_fve": summary(deltas / denom)
        | {
            "ci95": bootstrap_ci(
                by_row, seed, n_boot, stat=lambda x: float(x[:, 0].sum() / x[:, 1].sum() / denom)
            ),
            "interval_resamples": "rows",
        },
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

    baselines_meta = meta.get("baselines", {})
    out = {
        "n": n,
        "models": meta.get("models", {}),
        "sample": sample,
        "round_trip": round_trip,
        "predictors": predictors,
        "baselines": {
            "centroid_k": baselines_meta.get("centroid_k"),
            "centroid_families": baselines_meta.get("centroid_families"),
            "train_pool_n": baselines_meta.get("train_pool_n"),
            "floor_pool_n": baselines_meta.get("floor_pool_n"),
        },
        "best_of_k": curve,
        "per_family": per_family,
        "identity": {"raw": ident_raw, "centred": ident_cen},
        "per_claim": per_claim,
        "diversity": div,
        "vector_use": vector_use,
        "judge": judge,
    }
    out["verdicts"], out["verdict_evidence"] = _verdicts(out)
    for metric in registry.METRICS:  # metrics declared with their own computation
        if metric.source == "eval" and metric.compute is not None:
            _place(out, metric.path, metric.compute(rows, meta), metric.key)
    return clean_json(out)


def _place(out: dict, path: str, value, key: str) -> None:
    """Put a registry-computed value at its dotted path; a path the suite already fills is a
    declaration error (one number, one definition)."""
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"metric {key}: {path} runs through a number of the suite")
    if last in node:
        raise ValueError(f"metric {key}: {path} is already computed by the eval suite")
    node[last] = value


def _lead(m: dict, name: str, view: str) -> dict:
    return m["predictors"][name]["round_trip_minus"][view]


def _above_zero(*diffs: dict) -> bool:
    """Every paired interval lies above 0 (a NaN interval, from < 2 rows, does not)."""
    return all(d["ci95"][0] is not None and d["ci95"][0] > 0 for d in diffs)


def _verdicts(m: dict) -> tuple[dict, dict]:
    """Flags a reader must not miss, each with the numbers that decided it (the rule of each:
    docs/concepts/failure-modes.md)."""
    vector_use, div, k_max = m["vector_use"], m["diversity"], m["best_of_k"]["k_max"]
    ident_raw, ident_cen = m["identity"]["raw"], m["identity"]["centred"]
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
    share = [_lead(m, "empty", view) for view in ("cos", "fve_cen")]
    v["content_blind"] = not _above_zero(*share)
    e["content_blind"] = (
        f"AR on the AV output minus on the empty string: raw {_fmt_ci(share[0])}, "
        f"centred {_fmt_ci(share[1])}; blind unless both intervals are above 0"
    )
    v["identity_above_chance"] = ident_cen["p_value"] < ALPHA
    e["identity_above_chance"] = (
        f"centred argmax accuracy {ident_cen['argmax_hits']}/{ident_cen['n']} vs chance "
        f"1/{ident_cen['n']}, one-sided binomial p = {ident_cen['p_value']:.2g} "
        f"(raw: {ident_raw['argmax_hits']}/{ident_raw['n']}, p = {ident_raw['p_value']:.2g}); "
        f"above chance when p < {ALPHA}"
    )
    for verdict, name, what in (
        ("above_random_floor", "random_floor", "the random floor (a held-out pool vector)"),
        ("beats_mean_direction", "mean_direction", "the train pool's mean vector"),
        ("beats_text_free_centroid", "centroid", "the nearest family centroid"),
    ):
        leads = [_lead(m, name, view) for view in ("cos", "fve_cen")]
        v[verdict] = _above_zero(*leads)
        e[verdict] = (
            f"round trip minus {what}, paired over the same rows: raw {_fmt_ci(leads[0])}, "
            f"centred {_fmt_ci(leads[1])}; true when both intervals are above 0 "
            f"(the round trip wins on {leads[0]['win_rate']:.0%} of rows, raw)"
        )
    para = m["predictors"]["paraphrase"]
    if para["cos"]["n"]:
        lead = _lead(m, "paraphrase", "fve_cen")
        v["beats_paraphrase_ceiling"] = _above_zero(lead)
        e["beats_paraphrase_ceiling"] = (
            f"centred round trip minus one paraphrase of the label through the AR (the mean "
            f"over its paraphrases), paired: {_fmt_ci(lead)}; one text against one text, "
            "true when the interval is above 0"
        )
    else:
        v["beats_paraphrase_ceiling"] = None
        e["beats_paraphrase_ceiling"] = "no paraphrases were evaluated"
    if para["cos"]["n"] and k_max:
        best = m["predictors"]["best_of_k"]["fve_cen"]
        ceiling = m["predictors"]["paraphrase_ceiling"]["fve_cen"]
        diff = m["best_of_k"]["oracle_minus_paraphrase_ceiling_fve_cen"]
        v["oracle_best_of_k_beats_paraphrase_ceiling"] = _above_zero(diff)
        e["oracle_best_of_k_beats_paraphrase_ceiling"] = (
            f"an oracle: the best of {k_max} samples chosen by their score against the target, "
            f"centred {_fmt_ci(best)}, minus the best paraphrase, {_fmt_ci(ceiling)}: paired "
            f"{_fmt_ci(diff)}; true when the interval is above 0. Selecting on the target "
            "inflates it"
        )
    else:
        v["oracle_best_of_k_beats_paraphrase_ceiling"] = None
        e["oracle_best_of_k_beats_paraphrase_ceiling"] = "no samples or no paraphrases"
    return v, e

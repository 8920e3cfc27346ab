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
    identity,
    mean_ci,
    mse_nrm_from_cos,
    random_floor,
    spearman_logprob_score,
    summary,
)
from nla_repro.metrics import MIN_GAPS, RANDOM_MSE_NRM
from nla_repro.schemas import EVAL_CONDITIONS

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
    out = {
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
    for metric in registry.METRICS:  # metrics declared with their own computation
        if metric.source == "eval" and metric.compute is not None:
            _place(out, metric.path, metric.compute(rows, meta), metric.key)
    return _clean(out)


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

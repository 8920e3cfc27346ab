"""Two evaluations of the same rows side by side: every headline number of each, their
difference with a paired 95% interval, and the AR-collusion verdict.

The eval stage evaluates the published pair (after RL), the SFT pair, and the RL AV's outputs
read by the SFT AR (the held-out AR, which never saw a rollout), all on the same rows in the
same order. Each compared metric is written here as a per-row quantity whose mean (or ratio
of sums) is exactly the metric the suite reports, so the difference is a paired bootstrap over
rows: row i of one table against row i of the other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from nla_repro.evaluation.measures import (
    ALPHA,
    bootstrap_ci,
    cosine_matrix,
    cosine_rows,
    fve_cen_rows,
    mse_nrm_from_cos,
    normalized,
    paired_difference,
)
from nla_repro.evaluation.registry import BY_KEY, Results, bar_rows, lead_key, num, pct


def _stack(column: pd.Series) -> np.ndarray:
    return np.stack(column.to_list()).astype(np.float64)


def _identity_hits(rec: np.ndarray, targets: np.ndarray, mu: np.ndarray) -> np.ndarray:
    c = cosine_matrix(rec, targets, mu)
    return (c.argmax(axis=1) == np.arange(len(c))).astype(np.float64)


def per_row(rows: pd.DataFrame, meta: dict) -> dict[str, np.ndarray]:
    """Registry metric key -> per-row values whose mean over rows is that metric (2-D for a
    ratio metric: its numerator and denominator terms, see RATIOS)."""
    mu = np.asarray(meta["mu"], np.float64)
    m_nrm = np.asarray(meta["train_mean_nrm"], np.float64)
    targets = _stack(rows["target"])

    def scores(column: str) -> tuple[np.ndarray, np.ndarray]:
        rec = _stack(rows[column])
        return cosine_rows(rec, targets), fve_cen_rows(rec, targets, mu)

    cos, cen = scores("rec_greedy")
    texts = rows["explanation"].tolist()
    counts = pd.Series(texts).map(pd.Series(texts).value_counts()).to_numpy(np.float64)
    var_N = ((normalized(targets) - m_nrm) ** 2).mean(axis=1)
    out = {
        "round_trip_cos": cos,
        "round_trip_fve_cen": cen,
        # fve_nrm = 1 - sum(mse) / sum(var): a ratio over rows.
        "fve_nrm": np.stack([mse_nrm_from_cos(cos), var_N], axis=1),
        "identity_argmax_accuracy": _identity_hits(_stack(rows["rec_greedy"]), targets, mu),
        # Summed over rows, 1 / (rows sharing my output) counts the distinct outputs.
        "unique_output_rate": 1.0 / counts,
        "empty_output_rate": np.array([not t.strip() for t in texts], np.float64),
        "vector_use_gap": rows[["nll_true", "nll_shuffled", "n_label_tokens"]].to_numpy(np.float64),
        "explanation_length_words": np.array([len(t.split()) for t in texts], np.float64),
    }
    for name in ("empty", "mean_direction", "centroid"):
        other = scores(f"rec_{name}")
        out[lead_key(name, "cos")] = cos - other[0]
        out[lead_key(name, "fve_cen")] = cen - other[1]
    out[lead_key("random_floor", "cos")] = cos - rows["floor_cos"].to_numpy(np.float64)
    out[lead_key("random_floor", "fve_cen")] = cen - rows["floor_fve_cen"].to_numpy(np.float64)
    return out


def _fve_nrm(m: np.ndarray) -> float:
    return float(1 - m[:, 0].sum() / m[:, 1].sum())


def _gap(m: np.ndarray) -> float:
    return float((m[:, 1].sum() - m[:, 0].sum()) / m[:, 2].sum())


RATIOS: dict[str, Callable[[np.ndarray], float]] = {"fve_nrm": _fve_nrm, "vector_use_gap": _gap}
"""Metrics that are a ratio of sums over rows, with the function of their per-row terms."""

COMPARED: tuple[str, ...] = (
    "round_trip_cos",
    "round_trip_fve_cen",
    "fve_nrm",
    "explanation_share_cos",
    "explanation_share_fve_cen",
    "identity_argmax_accuracy",
    "unique_output_rate",
    "empty_output_rate",
    "vector_use_gap",
    *(
        lead_key(b, v)
        for b in ("random_floor", "mean_direction", "centroid")
        for v in ("cos", "fve_cen")
    ),
    "explanation_length_words",
)
"""The numbers compared between two evaluations (registry keys, and the greedy output's
length in words: the length drift)."""

COLLUSION_KEYS = ("round_trip_fve_cen", "explanation_share_fve_cen", "identity_argmax_accuracy")
"""What the AR-collusion verdict compares under the live and the held-out AR."""


def _value(key: str, v: np.ndarray) -> float:
    return RATIOS[key](v) if key in RATIOS else float(v.mean())


def difference(a: np.ndarray, b: np.ndarray, key: str, seed: int, n_boot: int) -> dict:
    """a's metric minus b's over the same rows, with a paired bootstrap interval."""
    if key not in RATIOS:
        return paired_difference(a, b, seed, n_boot)
    both = np.concatenate([a, b], axis=1)
    k = a.shape[1]

    def stat(x: np.ndarray) -> float:
        return RATIOS[key](x[:, :k]) - RATIOS[key](x[:, k:])

    return {"n": len(a), "mean": stat(both), "ci95": bootstrap_ci(both, seed, n_boot, stat=stat)}


def compare(a_rows: pd.DataFrame, b_rows: pd.DataFrame, meta: dict) -> dict:
    """key -> {a, b, difference (a - b, paired)} for every COMPARED key; the two tables must
    hold the same rows in the same order."""
    if a_rows["doc_id"].tolist() != b_rows["doc_id"].tolist():
        raise ValueError("compare: the two evaluations hold different rows (or another order)")
    seed, n_boot = int(meta["seed"]), int(meta["n_boot"])
    a, b = per_row(a_rows, meta), per_row(b_rows, meta)
    return {
        key: {
            "a": _value(key, a[key]),
            "b": _value(key, b[key]),
            "difference": difference(a[key], b[key], key, seed, n_boot),
        }
        for key in COMPARED
    }


def _judge(a_rows: pd.DataFrame, b_rows: pd.DataFrame, seed: int, n_boot: int) -> dict:
    """The judge's grades of both outputs on the rows it judged in both, paired."""
    both = a_rows["judge_validity"].notna().to_numpy() & b_rows["judge_validity"].notna()
    out = {"n": int(both.sum())}
    for column in ("judge_validity", "judge_specificity"):
        out[column] = paired_difference(
            a_rows.loc[both, column].to_numpy(np.float64),
            b_rows.loc[both, column].to_numpy(np.float64),
            seed,
            n_boot,
        )
    return out


def _improves(d: dict) -> bool:
    ci = d["difference"]["ci95"]
    return ci[0] is not None and np.isfinite(ci[0]) and ci[0] > 0


def _fmt(d: dict) -> str:
    diff, ci = d["difference"], d["difference"]["ci95"]
    return f"{diff['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def rl_comparison(rl: pd.DataFrame, sft: pd.DataFrame, heldout: pd.DataFrame, meta: dict) -> dict:
    """The RL pair against the SFT pair under the live AR and under the held-out (SFT) AR,
    the judge's view of both, and the `ar_collusion` verdict with its evidence: true when a
    number improves under the live AR (interval above 0) and not under the held-out AR."""
    seed, n_boot = int(meta["seed"]), int(meta["n_boot"])
    live, held = compare(rl, sft, meta), compare(heldout, sft, meta)
    colluding = [k for k in COLLUSION_KEYS if _improves(live[k]) and not _improves(held[k])]
    evidence = "; ".join(
        f"{k}: live AR {_fmt(live[k])}, held-out AR {_fmt(held[k])}" for k in COLLUSION_KEYS
    )
    return {
        "rl_minus_sft": live,
        "rl_heldout_ar_minus_sft": held,
        "judge_rl_minus_sft": _judge(rl, sft, seed, n_boot),
        "ar_collusion": bool(colluding),
        "ar_collusion_keys": colluding,
        "ar_collusion_evidence": (
            f"RL minus SFT on the same rows, paired 95% intervals ({evidence}); collusion when "
            "a number's interval is above 0 under the live AR and not under the held-out AR"
        ),
        "alpha": ALPHA,
    }


# --- Tables for the cards and the calibration record ------------------------------------------

LENGTH_NAME = "greedy output length (words)"


def _shown(key: str, value) -> str:
    """A compared value in its metric's own format."""
    m = BY_KEY.get(key)
    if m is not None and m.fmt in ("pct", "fraction"):
        return pct(value)
    return num(value, 3 if key != "explanation_length_words" else 1)


def _diff_text(key: str, d: dict) -> str:
    m = BY_KEY.get(key)
    scale, unit = (100, " pp") if m is not None and m.fmt in ("pct", "fraction") else (1, "")
    mean, ci = d.get("mean"), d.get("ci95") or [None, None]
    if mean is None:
        return "not measured"
    text = f"{mean * scale:+.3f}{unit}"
    if ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0] * scale:+.3f}, {ci[1] * scale:+.3f}]"
    return text


def comparison_rows(metrics: dict[str, dict]) -> list[dict]:
    """SFT -> RL for every compared number: the SFT pair, the RL pair (live AR) and the RL AV
    read by the held-out SFT AR, each difference with its paired 95% interval. Empty when
    the eval evaluated one pair only."""
    comparison = metrics.get("eval", {}).get("comparison")
    if not comparison:
        return []
    results = Results(metrics)
    live, held = comparison["rl_minus_sft"], comparison["rl_heldout_ar_minus_sft"]
    rows = []
    for key in COMPARED:
        rows.append(
            {
                "key": key,
                "name": results.name(key) if key in BY_KEY else LENGTH_NAME,
                "sft": _shown(key, live[key]["b"]),
                "rl": _shown(key, live[key]["a"]),
                "rl_minus_sft": _diff_text(key, live[key]["difference"]),
                "heldout": _shown(key, held[key]["a"]),
                "heldout_minus_sft": _diff_text(key, held[key]["difference"]),
                "n": str(live[key]["difference"].get("n", "")),
            }
        )
    return rows


def pair_metrics(metrics: dict[str, dict], pair: str) -> dict[str, dict]:
    """The metrics files with the eval's numbers of another evaluated pair (`sft`,
    `rl_heldout_ar`) in place of the published pair's."""
    return {**metrics, "eval": metrics["eval"]["comparison"]["pairs"][pair]}


def bars_under_each_pair(metrics: dict[str, dict]) -> list[dict]:
    """The quality bars of the published pair, each with whether the SFT pair met it and
    whether the RL AV met it under the held-out AR (absent without a comparison)."""
    rows = bar_rows(metrics)
    if not metrics.get("eval", {}).get("comparison"):
        return rows
    for pair, column in (("sft", "met_sft"), ("rl_heldout_ar", "met_heldout")):
        other = bar_rows(pair_metrics(metrics, pair))
        for row, o in zip(rows, other, strict=True):
            row[column] = o["met"]
            row[f"value_{column[4:]}"] = o["value"]
    return rows

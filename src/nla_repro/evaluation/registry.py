"""Every published metric, declared once, and the quality bars.

A `Metric` says where a number lives (metrics file and dotted path), how it is shown, its
interval, n and baseline, what it means, the published number it is compared with, and where
it appears (`shown`: the console report, a card's model-index or evaluation table, the
calibration record). The console report, the cards' model-index and tables, the quality bars,
the calibration record and the templates all go through `Results` and iterate over this
registry; none of them names a dotted path.

A declared path missing from a computed result is an error (`MetricMissing`), never "n/a":
a renamed key or a typo fails the card stage instead of publishing a blank. A metric whose
`when` path is falsy (a feature switched off: no samples, no judge, no validation rows) does
not apply and is left out; a value that is null because nothing was measured (a paraphrase
ceiling with no paraphrases) shows as "not measured".

Why one module of this size: most of it is the table `METRICS`, one declaration per published
number; having them all in one place is the point of the registry.

Adding a metric computed from the eval rows: the function (in `evaluation.measures`), one
`Metric` entry here with `compute=` calling it, a test (docs/how-to/add-a-metric.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from nla_repro import config as C
from nla_repro.errors import NlaError
from nla_repro.metrics import RANDOM_MSE_NRM

SOURCES: dict[str, Path] = {
    "eval": C.EVAL_METRICS,
    "sae": C.SAE_METRICS,
    "sft_av": C.SFT_METRICS["av"],
    "sft_ar": C.SFT_METRICS["ar"],
    "label": C.LABEL_METRICS_PATH,
    "rl": C.RL_METRICS,
}
"""The metrics files a metric can live in, by source name."""
PATH_ARGS = {"k": ("eval", "best_of_k.k_max")}
"""Placeholders a metric's path and name may hold, and where their value is read."""


class MetricMissing(NlaError):
    """A declared metric's path is not in the metrics file it should be in."""


@dataclass(frozen=True)
class Reference:
    """A published number a metric is calibrated against (docs/concepts/reference-numbers.md)."""

    value: str
    """The number as published."""
    model: str
    """Whose number it is."""
    caveat: str = ""
    """How the published quantity differs from ours, when it does (shown beside it)."""


GEMMA_PAIR = "Gemma-4-E2B L23 NLA pair (published card)"
PREFIX_AV = "Gemma-2-2B L19 prefix AV (published card)"
GEMMA_SAES = (
    "TopK SAEs on Gemma-4 (published cards): E4B L21 k=128, 32,768 latents; "
    "E2B L25 k=16, 6,144 latents"
)


@dataclass(frozen=True)
class Metric:
    """One published number."""

    key: str
    """Stable identifier; the model-index `metric_type` of the cards that publish it."""
    name: str
    """Human-readable name ({k} is the best-of-K sample count)."""
    source: str
    """Metrics file it lives in (a key of SOURCES)."""
    path: str
    """Dotted path of the value in that file ({k} as in `name`)."""
    fmt: Literal["num", "pct", "int", "fraction", "p"] = "num"
    """num: fixed digits; pct: a rate in percent; int: a count; fraction: `count/n (pct)`;
    p: a p-value (two significant digits)."""
    digits: int | None = None
    """Digits of num (default 3) and pct (default 1)."""
    ci: str | None = None
    """Dotted path of its 95% interval (two numbers)."""
    n: str | None = None
    """Dotted path of the n it is measured on."""
    n_unit: str = ""
    """What n counts, when not rows (tokens, docs, claims)."""
    count: str | None = None
    """fraction: dotted path of the numerator."""
    spread: str | None = None
    """Dotted path of a standard deviation shown as `± s` in the calibration record."""
    baseline: str = ""
    """The baseline or null to read it against; {key} renders another metric's value."""
    when: str | None = None
    """Dotted path (same file) that is falsy when the metric was not computed at all."""
    definition: str = ""
    """One line: what it measures."""
    reference: Reference | None = None
    """The published number it is compared with in RELEASE_CALIBRATION.md."""
    shown: tuple[str, ...] = ()
    """Where it appears: report, report:sae (console), index:av|ar|sae (model-index),
    card:av|ar|sae (a card's evaluation table), calibration, calibration:vector."""
    compute: Callable[[pd.DataFrame, dict], Any] | None = None
    """For an eval metric the suite does not compute itself: a function of the per-row
    table (data/eval/rows.parquet) and its metadata whose result compute_metrics stores at
    `path` (docs/how-to/add-a-metric.md)."""


@dataclass(frozen=True)
class Predictor:
    """Something scored on the same rows as the round trip (a baseline, a control, an
    anchor): metrics.predictors.<name> holds its scores and the round trip's paired lead."""

    name: str
    """Key under `predictors` in metrics/eval.json."""
    label: str
    """How the tables name it ({k} is the best-of-K sample count)."""
    sees: str
    """What it reads of v or of text: why beating it means something."""
    kind: Literal["baseline", "control", "anchor", "oracle"]
    """baseline: a predictor without the explanation the round trip must beat; control: an
    AR input without content; anchor: a real text of the label; oracle: it selects with the
    target itself, an upper reference, not a bar."""
    when: str | None = None
    """Dotted path that is falsy when it was not computed (no samples, no paraphrases)."""


PREDICTORS: tuple[Predictor, ...] = (
    Predictor(
        "mean_direction",
        "Mean direction (a constant)",
        "nothing: always the train pool's mean vector",
        "baseline",
    ),
    Predictor(
        "centroid",
        "Nearest family centroid (text-free)",
        "v only through which train-family centroid is nearest (one per source family)",
        "baseline",
    ),
    Predictor(
        "random_floor",
        "Random floor",
        "nothing: the mean score of every held-out pool vector",
        "baseline",
    ),
    Predictor("empty", "Empty string", "the AR on the empty string", "control"),
    Predictor("unrelated", "Unrelated real text", "the AR on another row's document", "control"),
    Predictor("gibberish", "Gibberish", "the AR on random vocabulary tokens", "control"),
    Predictor(
        "paraphrase",
        "One paraphrase of the label",
        "the AR on a paraphrase of the source label (mean over the paraphrases)",
        "anchor",
        "predictors.paraphrase.cos.n",
    ),
    Predictor(
        "paraphrase_ceiling",
        "Paraphrase ceiling (best paraphrase)",
        "the AR on the paraphrase that scores best against v (an oracle choice among several)",
        "anchor",
        "predictors.paraphrase_ceiling.cos.n",
    ),
    Predictor(
        "replay",
        "Replay of the source label (the ceiling)",
        "the AR on the label the AV was trained to write",
        "anchor",
    ),
    Predictor(
        "logprob_rerank",
        "AV's likeliest of {k} samples",
        "K sampled explanations, the one the AV finds likeliest",
        "anchor",
        "best_of_k.k_max",
    ),
    Predictor(
        "best_of_k",
        "Best of {k} samples (oracle)",
        "K sampled explanations, the best chosen by its score against v",
        "oracle",
        "best_of_k.k_max",
    ),
    Predictor(
        "nearest_train",
        "Nearest train vector (oracle)",
        "v itself: the train vector nearest the target (centred)",
        "oracle",
    ),
)
BY_PREDICTOR: dict[str, Predictor] = {p.name: p for p in PREDICTORS}
VIEWS = ("cos", "fve_cen", "fve_nrm")
"""The three scores of every predictor: raw cosine, centred cosine score, fve_nrm."""


def predictor_key(name: str, view: str) -> str:
    """Key of a predictor's score in one view (the empty string's raw cosine keeps the
    model-index name the cards published it under)."""
    return "empty_string_cos" if (name, view) == ("empty", "cos") else f"{name}_{view}"


def lead_key(name: str, view: str) -> str:
    """Key of the round trip minus a predictor, paired over the same rows (minus the empty
    string is the explanation's share, the content-blindness test)."""
    return f"explanation_share_{view}" if name == "empty" else f"round_trip_minus_{name}_{view}"


VIEW_NAMES = {"cos": "raw cos", "fve_cen": "fve_cen", "fve_nrm": "fve_nrm"}
PREDICTOR_REFERENCES: dict[str, Reference] = {
    "random_floor_fve_cen": Reference("0.498", PREFIX_AV),
    "paraphrase_ceiling_fve_cen": Reference("0.598", PREFIX_AV),
    "best_of_k_fve_cen": Reference("0.631 (best of 64)", PREFIX_AV),
    "empty_string_cos": Reference("0.405", GEMMA_PAIR),
    "unrelated_cos": Reference("0.405", GEMMA_PAIR),
    "gibberish_cos": Reference("0.414", GEMMA_PAIR),
}
"""Published numbers of the same predictors (docs/concepts/reference-numbers.md)."""


def _predictor_metrics(p: Predictor) -> tuple[Metric, ...]:
    """A predictor's score and the round trip's lead over it, in each view."""
    base = f"predictors.{p.name}"
    index = {
        ("empty", "cos"): ("index:ar",),
        ("replay", "cos"): ("index:ar",),
        ("replay", "fve_cen"): ("index:ar", "report", "card:av"),
    }
    out = []
    for view in VIEWS:
        has_ci = view != "fve_nrm"
        key = predictor_key(p.name, view)
        reference = PREDICTOR_REFERENCES.get(key)
        out.append(
            Metric(
                key,
                f"{p.label}: {VIEW_NAMES[view]}",
                "eval",
                f"{base}.{view}.mean" if has_ci else f"{base}.{view}",
                ci=f"{base}.{view}.ci95" if has_ci else None,
                n=f"{base}.{view}.n" if has_ci else None,
                when=p.when,
                baseline="random floor {random_floor_fve_cen}"
                if p.kind == "control" and view == "fve_cen"
                else "",
                definition=f"{p.sees}, scored like the round trip",
                reference=reference,
                shown=("card:ar",) * (p.kind == "control" or p.name == "replay") * has_ci
                + index.get((p.name, view), ())
                + ("calibration",) * (reference is not None),
            )
        )
        lead = f"{base}.round_trip_minus.{view}"
        out.append(
            Metric(
                lead_key(p.name, view),
                f"Explanation share (round trip minus empty string), {VIEW_NAMES[view]}"
                if p.name == "empty"
                else f"Round trip minus {p.label[0].lower() + p.label[1:]}, {VIEW_NAMES[view]}",
                "eval",
                f"{lead}.mean",
                ci=f"{lead}.ci95",
                n=f"{lead}.n",
                when=p.when,
                baseline="0 (no better than it)",
                definition=f"paired over the same rows: the round trip's lead over {p.sees}",
                shown=("report",) * (p.kind == "baseline" and view != "fve_nrm")
                + (("report", "index:ar", "card:ar") if p.name == "empty" and has_ci else ()),
            )
        )
    out.append(
        Metric(
            f"round_trip_wins_over_{p.name}",
            f"rows where the round trip beats {p.label[0].lower() + p.label[1:]} (raw cos)",
            "eval",
            f"{base}.round_trip_minus.cos.win_rate",
            "pct",
            n=f"{base}.round_trip_minus.cos.n",
            when=p.when,
            baseline="50% (a coin flip)",
        )
    )
    return tuple(out)


def _sft(
    kind: str, key: str, name: str, path: str, shown=(), when="val_at_release", **kw
) -> Metric:
    return Metric(f"sft_{kind}_{key}", name, f"sft_{kind}", path, when=when, shown=shown, **kw)


def _sae(key: str, name: str, path: str, **kw) -> Metric:
    """An SAE metric measured on the held-out tokens (their count is its n)."""
    return Metric(key, name, "sae", path, **({"n": "n_tokens", "n_unit": "tokens"} | kw))


METRICS: tuple[Metric, ...] = (
    # --- eval: the round trip and its anchors -----------------------------------------------
    Metric(
        "eval_n",
        "held-out rows evaluated (n)",
        "eval",
        "n",
        fmt="int",
        definition="rows of the evaluated split; every mean counts every row",
        shown=("report",),
    ),
    Metric(
        "eval_split_rows",
        "labeled rows of the split",
        "eval",
        "sample.split_rows",
        fmt="int",
        definition="the evaluated rows are all of them or a random sample stratified by family",
    ),
    Metric(
        "round_trip_cos",
        "Round trip cos(v, AR(AV(v))), raw",
        "eval",
        "round_trip.cos.mean",
        ci="round_trip.cos.ci95",
        n="round_trip.cos.n",
        spread="round_trip.cos.std",
        baseline="mean direction {mean_direction_cos}; random floor {random_floor_cos}",
        definition="cosine of the AR's reconstruction from the AV's greedy output with v",
        reference=Reference("0.438 ± 0.054 (n=42 of 50; 8 empty outputs excluded)", GEMMA_PAIR),
        shown=("report", "index:av", "card:av", "calibration"),
    ),
    Metric(
        "round_trip_fve_cen",
        "Round trip, centred cosine score fve_cen",
        "eval",
        "round_trip.fve_cen.mean",
        ci="round_trip.fve_cen.ci95",
        n="round_trip.fve_cen.n",
        baseline="random floor {random_floor_fve_cen}; text-free centroid {centroid_fve_cen}",
        definition="0.5 (1 + cos(h - mu, v - mu)), mu a held-out pool mean: a rescaled centred "
        "cosine (0.5 knows nothing), not a fraction of variance",
        reference=Reference("0.528", PREFIX_AV),
        shown=("report", "index:av", "card:av", "calibration"),
    ),
    Metric(
        "mse_nrm",
        "mse_nrm",
        "eval",
        "round_trip.mse_nrm",
        n="n",
        baseline=f"{RANDOM_MSE_NRM} (orthogonal)",
        definition="mean((norm(h) - norm(v))^2) = 2 (1 - cos)",
        shown=("report", "card:av"),
    ),
    Metric(
        "fve_nrm",
        "Round trip fve_nrm (fraction of variance explained)",
        "eval",
        "round_trip.fve_nrm",
        n="n",
        baseline="mean direction {mean_direction_fve_nrm} (0: the unnormalized train mean)",
        definition="1 - mse_nrm / MSE(norm(v), m), m the train pool's mean of norm(v), the MSE "
        "over the evaluated targets",
        shown=("report", "card:av"),
    ),
    Metric(
        "round_trip_cos_to_mean_direction",
        "Reconstructions' cosine with the train mean direction",
        "eval",
        "round_trip.cos_to_mean_direction.reconstruction",
        n="n",
        baseline="the targets' {target_cos_to_mean_direction}",
        definition="mean cos(h, m): above the targets' own, the AR leans to the constant",
        shown=("card:av",),
    ),
    Metric(
        "target_cos_to_mean_direction",
        "targets' cosine with the train mean direction",
        "eval",
        "round_trip.cos_to_mean_direction.target",
        n="n",
    ),
    *(m for p in PREDICTORS for m in _predictor_metrics(p)),
    # --- eval: identity, the AV, diversity, claims ------------------------------------------
    Metric(
        "identity_argmax_accuracy",
        "Cross-row identity argmax (centred)",
        "eval",
        "identity.centred.argmax_accuracy",
        fmt="fraction",
        count="identity.centred.argmax_hits",
        n="identity.centred.n",
        baseline="chance {identity_chance}, p = {identity_p_value}",
        definition="share of rows whose reconstruction is nearest its own target (centred)",
        reference=Reference("2–4% at n=50", GEMMA_PAIR),
        shown=("report", "index:av", "card:av", "calibration"),
    ),
    Metric("identity_chance", "identity chance (1/n)", "eval", "identity.centred.chance", "pct"),
    Metric(
        "identity_p_value",
        "identity p-value (one-sided binomial)",
        "eval",
        "identity.centred.p_value",
        "p",
    ),
    Metric(
        "identity_margin_raw",
        "identity margin, raw",
        "eval",
        "identity.raw.margin",
        digits=4,
        definition="mean diagonal minus mean off-diagonal cosine of C[i, j]",
    ),
    Metric(
        "identity_margin_centred",
        "identity margin, centred",
        "eval",
        "identity.centred.margin",
        digits=4,
    ),
    Metric(
        "vector_use_gap",
        "AV vector-use gap (nats)",
        "eval",
        "vector_use.gap",
        ci="vector_use.ci95",
        n="vector_use.n",
        baseline=">= {vector_use_min_gap} (else the vector is ignored)",
        definition="AV loss on the labels with shuffled minus true vectors, per token",
        shown=("report", "index:av", "card:av", "calibration:vector"),
    ),
    Metric("vector_use_min_gap", "vector-use floor", "eval", "vector_use.min_gap", digits=2),
    Metric(
        "vector_use_loss_true",
        "test loss, true vectors",
        "eval",
        "vector_use.loss_true",
        n="vector_use.n",
        shown=("calibration:vector",),
    ),
    Metric(
        "vector_use_loss_shuffled",
        "test loss, shuffled vectors",
        "eval",
        "vector_use.loss_shuffled",
        n="vector_use.n",
        shown=("calibration:vector",),
    ),
    Metric(
        "unique_output_rate",
        "Unique greedy outputs",
        "eval",
        "diversity.unique_rate",
        fmt="fraction",
        count="diversity.unique_outputs",
        n="diversity.n",
        baseline="collapse below 50%",
        definition="distinct greedy explanations / n",
        shown=("report", "index:av", "card:av", "calibration:vector"),
    ),
    Metric(
        "empty_output_rate",
        "Empty outputs (scored, in every denominator)",
        "eval",
        "diversity.empty_rate",
        fmt="fraction",
        count="diversity.empty_outputs",
        n="diversity.n",
        baseline="0%",
        definition="empty greedy outputs / n (scored as the empty string, never dropped)",
        shown=("report", "index:av", "card:av"),
    ),
    Metric(
        "shared_prefix_60",
        "outputs sharing their first 60 characters",
        "eval",
        "diversity.shared_prefix_60",
        "pct",
        n="diversity.n",
        baseline="largest group {largest_prefix_group_60}",
        shown=("calibration:vector",),
    ),
    Metric(
        "largest_prefix_group_60",
        "largest 60-character group",
        "eval",
        "diversity.largest_prefix_group_60",
        "int",
    ),
    Metric(
        "per_claim_delta_fve",
        "Per-claim ΔFVE",
        "eval",
        "per_claim.delta_fve.mean",
        fmt="pct",
        digits=2,
        ci="per_claim.delta_fve.ci95",
        n="per_claim.n_claims",
        n_unit="claims",
        baseline="0 (the claim adds nothing)",
        definition="mse_nrm without a claim minus with all claims, over fve_nrm's denominator; "
        "the interval resamples rows",
        reference=Reference(
            "+1.8% to +7.3% FVE",
            GEMMA_PAIR,
            caveat="not the same quantity: measured on a 30-row probe with 138–140 claims a row "
            "across four ARs; ours is the mean over this eval's claims",
        ),
        shown=("card:av", "calibration"),
    ),
    # --- eval: the LLM judge ----------------------------------------------------------------
    *(
        Metric(
            f"judge_{who}_{scale}",
            f"judge {scale}, {'AV output' if who == 'av' else 'training label'} (1–5)",
            "eval",
            f"judge.{who}_{scale}.mean",
            digits=2,
            ci=f"judge.{who}_{scale}.ci95",
            n=f"judge.{who}_{scale}.n",
            when="judge.n",
            reference=Reference("1.0 (vs 3.1 for a 27B NLA)", GEMMA_PAIR)
            if (who, scale) == ("av", "validity")
            else None,
            shown=("report",) * (scale == "validity")
            + ("calibration",) * ((who, scale) == ("av", "validity")),
        )
        for who in ("av", "label")
        for scale in ("validity", "specificity")
    ),
    Metric(
        "judge_pairwise_av_win_rate",
        "judge prefers the AV output over the label",
        "eval",
        "judge.pairwise_av_win_rate",
        "pct",
        n="judge.pairwise_n",
        when="judge.n",
    ),
    # --- training ---------------------------------------------------------------------------
    _sft("av", "val_loss", "AV validation loss at release", "val_at_release.val_loss"),
    _sft(
        "av",
        "val_loss_shuffled",
        "AV validation loss, shuffled vectors",
        "val_at_release.val_loss_shuffled",
    ),
    _sft(
        "av",
        "val_gap",
        "validation vector-use gap at release",
        "val_at_release.vector_use_gap",
        shown=("calibration:vector",),
        baseline="{sft_av_val_gap_start} at step 0",
        n="val_rows",
    ),
    _sft("av", "val_gap_start", "vector-use gap at step 0", "val_at_start.vector_use_gap"),
    _sft("ar", "val_mse", "AR validation mse_nrm at release", "val_at_release.val_mse"),
    _sft("ar", "val_mse_empty", "AR mse_nrm on empty strings", "val_at_release.val_mse_empty"),
    _sft("ar", "content_gap", "AR content gap at release", "val_at_release.content_gap"),
    _sft("ar", "content_gap_start", "AR content gap at step 0", "val_at_start.content_gap"),
    *(
        _sft(kind, key, f"{kind.upper()} {key.replace('_', ' ')}", key, fmt="int", when=None)
        for kind in ("av", "ar")
        for key in ("released_step", "max_steps", "train_rows", "val_rows")
    ),
    # --- RL ---------------------------------------------------------------------------------
    Metric("rl_released_step", "RL steps (released)", "rl", "released_step", "int"),
    Metric("rl_rollouts", "RL rollouts sampled", "rl", "rollouts", "int"),
    Metric(
        "rl_flat_group_rate",
        "RL groups with equal rewards (no gradient)",
        "rl",
        "flat_group_rate",
        "fraction",
        count="flat_groups",
        n="groups",
        n_unit="groups",
    ),
    *(
        Metric(
            f"rl_{key}_{end}",
            f"RL {what}, {end} steps",
            "rl",
            f"{end}_steps.{key}",
            n="window_steps",
            n_unit="steps",
        )
        for key, what in (
            ("reward_mean", "rollout reward"),
            ("kl", "k3 KL to the SFT policy"),
            ("length", "rollout length (tokens)"),
            ("failed", "failed rollouts (empty, unparseable, truncated)"),
            ("ar_loss", "live AR loss (mse_nrm)"),
        )
        for end in ("first", "last")
    ),
    *(
        Metric(
            f"rl_val_{key}_{at}",
            f"RL validation {what} at {at.replace('_', ' ')}",
            "rl",
            f"val_at_{at}.val_{key}",
            n="val_vectors",
            when=f"val_at_{at}",
        )
        for key, what in (("cos", "greedy round trip cos (live AR)"), ("share", "share"))
        for at in ("start", "release")
    ),
    # --- labels -----------------------------------------------------------------------------
    *(
        Metric(f"label_{key}", f"labels {key}", "label", key, "int")
        for key in ("n_rows", "accepted", "corrected", "rejected")
    ),
    # --- SAE ----------------------------------------------------------------------------------
    _sae(
        "explained_variance",
        "Explained variance",
        "explained_variance",
        baseline="0 (predict the mean)",
        definition="1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 on held-out tokens",
        reference=Reference("0.939 (E4B L21), 0.995 (E2B L25)", GEMMA_SAES),
        shown=("report:sae", "index:sae", "card:sae", "calibration"),
    ),
    _sae(
        "fvu",
        "FVU, centred",
        "fvu",
        baseline="1",
        shown=("report:sae", "card:sae"),
    ),
    _sae(
        "fvu_uncentred",
        "FVU, uncentred",
        "fvu_uncentred",
        baseline="1 (looks better than it is when x has a large mean)",
        shown=("report:sae", "card:sae"),
    ),
    Metric(
        "mse", "MSE", "sae", "mse", n="n_tokens", n_unit="tokens", shown=("index:sae", "card:sae")
    ),
    _sae(
        "l0",
        "L0",
        "l0",
        digits=2,
        baseline="k = {sae_k}",
        reference=Reference("16 (E2B L25, k=16)", GEMMA_SAES),
        shown=("report:sae", "index:sae", "card:sae", "calibration"),
    ),
    Metric(
        "dead_latents",
        "Dead latents (training window)",
        "sae",
        "latents.dead_training_window",
        "int",
        n="latents.dead_window_tokens",
        n_unit="tokens",
        baseline="0 of {sae_d_sae}",
        reference=Reference("0 (E4B L21)", GEMMA_SAES),
        shown=("report:sae", "index:sae", "card:sae", "calibration"),
    ),
    _sae(
        "never_fired_held_out",
        "Never fired (held out)",
        "latents.never_fired_held_out",
        fmt="int",
        baseline="0",
        shown=("report:sae", "card:sae"),
    ),
    *(
        Metric(
            f"lm_loss_{key}",
            f"LM loss, {label}",
            "sae",
            f"loss_recovered.{key}",
            n="loss_recovered.predicted_tokens",
            n_unit="tokens",
            when="loss_recovered",
            shown=("report:sae", "card:sae"),
        )
        for key, label in (
            ("clean", "clean"),
            ("sae", "SAE spliced in"),
            ("zero_ablation", "zero ablation"),
        )
    ),
    Metric(
        "loss_recovered",
        "LM loss recovered",
        "sae",
        "loss_recovered.recovered",
        n="loss_recovered.docs",
        n_unit="docs",
        baseline="0 (zero ablation), 1 (clean)",
        when="loss_recovered",
        definition="(CE_zero - CE_sae) / (CE_zero - CE_clean) on held-out documents",
        shown=("report:sae", "index:sae", "card:sae"),
    ),
    Metric(
        "explained_variance_train",
        "Explained variance, train split",
        "sae",
        "train_split.explained_variance",
        n="train_split.n_tokens",
        n_unit="tokens",
        shown=("card:sae",),
    ),
    Metric("sae_k", "k", "sae", "latents.k", "int"),
    Metric("sae_d_sae", "latents", "sae", "latents.d_sae", "int"),
    Metric("sae_tokens_trained", "tokens trained", "sae", "tokens.trained", "int"),
    Metric("sae_train_tokens", "distinct train tokens", "sae", "tokens.train_available", "int"),
    Metric("sae_epochs", "passes over the train tokens", "sae", "tokens.epochs", digits=1),
    Metric("sae_outlier_max_norm", "outlier norm cut", "sae", "tokens.outlier_max_norm", digits=1),
    Metric("sae_steps", "optimizer steps", "sae", "training.steps", "int"),
)
BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}


# --- Formatting -------------------------------------------------------------------------------


def num(value: Any, digits: int = 3) -> str:
    """A measured number as the cards print it; 'not measured' for a null value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def pct(value: float | None, digits: int = 1) -> str:
    return "not measured" if value is None else f"{100 * value:.{digits}f}%"


def interval(pair: list | None, digits: int = 3) -> str:
    if not pair or any(v is None for v in pair):
        return ""
    return f"[{num(pair[0], digits)}, {num(pair[1], digits)}]"


def lookup(data: dict, path: str, where: str) -> Any:
    """The value at a dotted path; MetricMissing (naming `where`) when any part is missing."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise MetricMissing(f"{where}: no {path!r} (missing {part!r})")
        node = node[part]
    return node


def _truthy_at(data: dict, path: str) -> bool:
    """Whether a dotted path is there and holds a truthy value."""
    try:
        return bool(lookup(data, path, ""))
    except MetricMissing:
        return False


def _digits(m: Metric) -> int:
    return m.digits if m.digits is not None else (1 if m.fmt == "pct" else 3)


# --- Results: the registry applied to computed metrics ----------------------------------------


class Results:
    """Computed metrics files (by source name) read through the registry."""

    def __init__(self, metrics: dict[str, dict]) -> None:
        self.metrics = metrics
        # Placeholder values of paths and names ({k}), read once.
        self._args = {
            name: lookup(self.metrics[source], path, str(SOURCES[source]))
            if _truthy_at(self.metrics.get(source, {}), path)
            else 0
            for name, (source, path) in PATH_ARGS.items()
        }

    def _file(self, m: Metric) -> dict:
        if m.source not in self.metrics:
            raise MetricMissing(f"metric {m.key}: no {SOURCES[m.source]} among the inputs")
        return self.metrics[m.source]

    def _path(self, m: Metric, path: str) -> Any:
        where = f"{SOURCES[m.source]} (metric {m.key})"
        return lookup(self._file(m), path.format(**self._args), where)

    def applies(self, key: str) -> bool:
        m = BY_KEY[key]
        return m.when is None or _truthy_at(self._file(m), m.when)

    def value(self, key: str) -> Any:
        """The metric's value (a MetricMissing error if its path is missing)."""
        return self._path(BY_KEY[key], BY_KEY[key].path)

    def name(self, key: str) -> str:
        return self.fill(BY_KEY[key].name)

    def fill(self, text: str) -> str:
        """A name or label with its placeholders ({k}) filled from these metrics."""
        return text.format(**self._args)

    def text(self, key: str, digits: int | None = None) -> str:
        """The value as shown (fraction: `count/n (pct)`)."""
        m = BY_KEY[key]
        value, d = self.value(key), _digits(m) if digits is None else digits
        if m.fmt == "pct":
            return pct(value, d)
        if m.fmt == "fraction":
            count, n = self._path(m, m.count), self._path(m, m.n)
            return f"{num(count)}/{num(n)} ({pct(value)})"
        if m.fmt == "p":
            return "not measured" if value is None else f"{value:.2g}"
        if m.fmt == "int":
            return num(None if value is None else int(value))
        return num(value, d)

    def count(self, key: str) -> Any:
        """A fraction's numerator (hits, unique outputs)."""
        m = BY_KEY[key]
        return self._path(m, m.count)

    def n_value(self, key: str) -> Any:
        m = BY_KEY[key]
        return self._path(m, m.n)

    def ci(self, key: str) -> list | None:
        m = BY_KEY[key]
        return self._path(m, m.ci) if m.ci else None

    def ci_text(self, key: str) -> str:
        """The 95% interval as shown, in the value's own format (a rate in percent)."""
        m, ci = BY_KEY[key], self.ci(key)
        if m.fmt == "pct" and ci and all(v is not None for v in ci):
            return f"[{pct(ci[0], _digits(m))}, {pct(ci[1], _digits(m))}]"
        return interval(ci, _digits(m) if m.fmt == "num" else 3)

    def n_text(self, key: str) -> str:
        m = BY_KEY[key]
        if not m.n:
            return ""
        n = self._path(m, m.n)
        return f"{num(n)} {m.n_unit}".strip()

    def baseline(self, key: str) -> str:
        text = BY_KEY[key].baseline
        refs = {k: self.text(k) for k in BY_KEY if "{" + k + "}" in text}
        return text.format(**refs) if refs else text

    def spread_text(self, key: str) -> str:
        m = BY_KEY[key]
        return f" ± {num(self._path(m, m.spread), _digits(m))}" if m.spread else ""

    def row(self, key: str) -> dict:
        """name, value, ci, n, baseline: a table row of the cards and the report."""
        return {
            "key": key,
            "name": self.name(key),
            "value": self.text(key),
            "ci": self.ci_text(key),
            "n": self.n_text(key),
            "baseline": self.baseline(key),
        }

    def rows(self, place: str) -> list[dict]:
        """Rows of every applicable metric shown at `place`, in registry order."""
        return [self.row(m.key) for m in METRICS if place in m.shown and self.applies(m.key)]

    def keys(self, place: str) -> list[str]:
        return [m.key for m in METRICS if place in m.shown and self.applies(m.key)]

    def check(self, sources: tuple[str, ...] | None = None) -> None:
        """Resolve every applicable metric of these sources (all present ones by default):
        MetricMissing on the first declared path that is not there."""
        for m in METRICS:
            if m.source in (sources or tuple(self.metrics)) and self.applies(m.key):
                self.row(m.key)
                if m.spread:
                    self.spread_text(m.key)


def report_rows(place: str, metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """(what, value) lines of a console report: value, interval, n and baseline."""
    results = Results(metrics)
    out = []
    for r in results.rows(place):
        extra = [x for x in (r["ci"], f"n={r['n']}" if r["n"] else "") if x]
        value = r["value"] + (f" {' '.join(extra)}" if extra else "")
        out.append((r["name"], value + (f"; {r['baseline']}" if r["baseline"] else "")))
    return out


# --- Quality bars -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """A quality bar an NLA pair is held to; cards report each as met or missed with the
    measured value, never hide a miss."""

    metric: str
    """Key of the metric it tests."""
    op: Literal[">=", "<=", ">"]
    """Against `threshold`; ">" against the metric `threshold_metric`, with the whole
    interval above it."""
    threshold: float | None = None
    threshold_metric: str | None = None
    """A baseline measured in the same eval (the random floor) instead of a constant."""
    ci_above_zero: bool = False
    """Its 95% interval must lie above 0 too."""

    def met(self, value: Any, ci: list | None, limit: Any) -> bool | None:
        """Whether `value` (with its interval) meets the bar; None when not measured."""
        if not (isinstance(value, int | float) and isinstance(limit, int | float)):
            return None
        ok = {">=": value >= limit, "<=": value <= limit, ">": value > limit}[self.op]
        if self.op == ">" and ci:
            ok = ci[0] is not None and ci[0] > limit  # above the floor: its whole interval
        if self.ci_above_zero:
            ok = ok and bool(ci) and ci[0] is not None and ci[0] > 0
        return bool(ok)


QUALITY_BARS: tuple[Bar, ...] = (
    Bar("eval_n", ">=", 50),
    Bar("vector_use_gap", ">=", 0.3),
    Bar("explanation_share_cos", ">=", 0.10, ci_above_zero=True),
    Bar("explanation_share_fve_cen", ">=", 0.10, ci_above_zero=True),
    Bar("identity_argmax_accuracy", ">=", 0.20),
    Bar("unique_output_rate", ">=", 0.90),
    Bar("empty_output_rate", "<=", 0.02),
    # The round trip beats what reads no explanation, on the same rows, in both views.
    *(
        Bar(lead_key(name, view), ">", 0.0)
        for name in ("random_floor", "mean_direction", "centroid")
        for view in ("cos", "fve_cen")
    ),
)


def bar_rows(metrics: dict[str, dict]) -> list[dict]:
    """Each quality bar with the measured value, its interval, the bar and whether it is
    met (None where the value was not measured)."""
    results = Results(metrics)
    rows = []
    for bar in QUALITY_BARS:
        m = BY_KEY[bar.metric]
        value, ci = results.value(bar.metric), results.ci(bar.metric)
        limit = results.value(bar.threshold_metric) if bar.threshold_metric else bar.threshold
        met = bar.met(value, ci, limit)
        show = (lambda v: pct(v)) if m.fmt in ("pct", "fraction") else (lambda v: num(v))
        rows.append(
            {
                "key": bar.metric,
                "name": m.name,
                "value": show(value),
                "ci": interval(ci),
                "target": f"{bar.op} {show(limit)}" + (", CI > 0" if bar.ci_above_zero else ""),
                "met": {True: "yes", False: "NO", None: "not measured"}[met],
            }
        )
    return rows


# --- Tables over the predictors and the families -----------------------------------------------


def predictor_rows(metrics: dict[str, dict]) -> list[dict]:
    """One row per predictor scored beside the round trip (in PREDICTORS order, those that
    were computed): its three scores and the round trip's paired lead over it."""
    results = Results(metrics)
    rows = []
    for p in PREDICTORS:
        if not results.applies(predictor_key(p.name, "cos")):
            continue
        row = {"name": results.fill(p.label), "kind": p.kind, "sees": p.sees}
        for view in VIEWS:
            key, lead = predictor_key(p.name, view), lead_key(p.name, view)
            row[view] = results.text(key)
            row[f"lead_{view}"] = f"{results.text(lead)} {results.ci_text(lead)}".strip()
        row["wins"] = results.text(f"round_trip_wins_over_{p.name}")
        row["n"] = results.n_text(lead_key(p.name, "cos"))
        rows.append(row)
    return rows


def family_rows(metrics: dict[str, dict]) -> list[dict]:
    """One row per source family of the evaluated rows: n, the round trip and its paired
    lead over the text-free baselines, each with its 95% interval (blank below 2 rows)."""
    families = lookup(metrics["eval"], "per_family", str(SOURCES["eval"]))

    def with_ci(d: dict) -> str:
        return f"{num(d['mean'])} {interval(d['ci95'])}".strip()

    return [
        {
            "family": family,
            "n": num(f["n"]),
            "cos": with_ci(f["cos"]),
            "fve_cen": with_ci(f["fve_cen"]),
            "lead_mean_direction_cos": with_ci(f["round_trip_minus"]["mean_direction"]["cos"]),
            "lead_centroid_fve_cen": with_ci(f["round_trip_minus"]["centroid"]["fve_cen"]),
        }
        for family, f in families.items()
    ]

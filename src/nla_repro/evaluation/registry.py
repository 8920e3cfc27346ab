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


def ablation_key(condition: str, view: str) -> str:
    """Key of the ablation metric of one AR input condition, view cos or fve_cen (the empty
    string's raw cosine keeps the model-index name the cards published it under)."""
    if (condition, view) == ("empty", "cos"):
        return "empty_string_cos"
    return f"ablation_{condition}_{view}"


def _ablation(cond: str, label: str, ref: str | None = None, index: bool = False):
    """The AR-on-condition pair of rows of the content-blindness ablation."""
    share = cond == "explanation_share"
    return (
        Metric(
            ablation_key(cond, "cos"),
            f"{label}: cos",
            "eval",
            f"ablation.{cond}.cos.mean",
            ci=f"ablation.{cond}.cos.ci95",
            n=f"ablation.{cond}.cos.n",
            baseline="0 (content-blind)" if share else "",
            definition=f"raw cosine of the AR's reconstruction from {label.lower()} with v",
            reference=Reference(ref, GEMMA_PAIR) if ref else None,
            shown=(
                "card:ar",
                *(("calibration",) if ref else ()),
                *(("index:ar",) if index else ()),
            ),
        ),
        Metric(
            ablation_key(cond, "fve_cen"),
            f"{label}: fve_cen",
            "eval",
            f"ablation.{cond}.fve_cen.mean",
            ci=f"ablation.{cond}.fve_cen.ci95",
            n=f"ablation.{cond}.fve_cen.n",
            baseline="0 (content-blind)" if share else "random floor {random_floor_fve_cen}",
            definition=f"centred score of the AR's reconstruction from {label.lower()}",
            shown=("card:ar",),
        ),
    )


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
        "round_trip_cos",
        "Round trip cos(v, AR(AV(v))), raw",
        "eval",
        "round_trip.cos.mean",
        ci="round_trip.cos.ci95",
        n="round_trip.cos.n",
        spread="round_trip.cos.std",
        baseline="random floor (mean pool cosine) {random_floor_cos}",
        definition="cosine of the AR's reconstruction from the AV's greedy output with v",
        reference=Reference("0.438 ± 0.054 (n=42 of 50; 8 empty outputs excluded)", GEMMA_PAIR),
        shown=("report", "index:av", "card:av", "calibration"),
    ),
    Metric(
        "round_trip_fve_cen",
        "Round trip, centred fve_cen",
        "eval",
        "centred.greedy.fve_cen.mean",
        ci="centred.greedy.fve_cen.ci95",
        n="centred.greedy.fve_cen.n",
        baseline="random floor {random_floor_fve_cen}",
        definition="0.5 (1 + cos(h - mu, v - mu)), mu a held-out pool mean: 0.5 knows nothing",
        reference=Reference("0.528", PREFIX_AV),
        shown=("report", "index:av", "card:av", "calibration"),
    ),
    Metric(
        "random_floor_cos",
        "random floor, raw cos",
        "eval",
        "centred.random_floor.cos",
        definition="mean off-diagonal cosine between the evaluated targets",
    ),
    Metric(
        "random_floor_fve_cen",
        "random floor, fve_cen",
        "eval",
        "centred.random_floor.fve_cen",
        definition="what an unrelated vector of the same pool scores, centred",
        reference=Reference("0.498", PREFIX_AV),
        shown=("calibration",),
    ),
    Metric(
        "replay_cos",
        "Replay cosine (AR on the label)",
        "eval",
        "centred.replay.cos.mean",
        ci="centred.replay.cos.ci95",
        n="centred.replay.cos.n",
        definition="the AR reading the source label itself: what the labels reach",
        shown=("index:ar",),
    ),
    Metric(
        "replay_fve_cen",
        "Replay (AR on the label), centred",
        "eval",
        "centred.replay.fve_cen.mean",
        ci="centred.replay.fve_cen.ci95",
        n="centred.replay.fve_cen.n",
        baseline="anchor: what the labels reach",
        definition="the AR reading the source label itself, centred",
        shown=("report", "index:ar", "card:av"),
    ),
    Metric(
        "paraphrase_ceiling_fve_cen",
        "Paraphrase ceiling, centred",
        "eval",
        "centred.paraphrase_ceiling.fve_cen.mean",
        ci="centred.paraphrase_ceiling.fve_cen.ci95",
        n="centred.paraphrase_ceiling.fve_cen.n",
        definition="best of N paraphrases of the label through the AR, centred",
        reference=Reference("0.598", PREFIX_AV),
        shown=("report", "calibration"),
    ),
    Metric(
        "best_of_k_fve_cen",
        "Best of {k} (oracle), centred",
        "eval",
        "centred.best_of_{k}.fve_cen.mean",
        ci="centred.best_of_{k}.fve_cen.ci95",
        n="centred.best_of_{k}.fve_cen.n",
        baseline="paraphrase ceiling {paraphrase_ceiling_fve_cen}",
        when="best_of_k.k_max",
        definition="the best of K sampled explanations by the AR's own score, centred",
        reference=Reference("0.631 (best of 64)", PREFIX_AV),
        shown=("report", "card:av", "calibration"),
    ),
    Metric(
        "nn_in_pool_fve_cen",
        "Nearest train vector, centred",
        "eval",
        "centred.nn_in_pool.fve_cen.mean",
        ci="centred.nn_in_pool.fve_cen.ci95",
        n="centred.nn_in_pool.fve_cen.n",
        definition="the best training activation for each target: a lookup, reading nothing",
        shown=("report",),
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
        "fve_nrm",
        "eval",
        "round_trip.fve_nrm",
        n="n",
        baseline="0 (predict the train mean)",
        definition="1 - mse_nrm / rawvar, rawvar the per-element variance of norm(v) in train",
        shown=("report", "card:av"),
    ),
    # --- eval: what the AR reads (content-blindness ablation) -------------------------------
    *_ablation("greedy", "AV output", ref="0.429"),
    *_ablation("replay", "Source label (replay)"),
    *_ablation("empty", "Empty string", ref="0.405", index=True),
    *_ablation("unrelated", "Unrelated real text", ref="0.405"),
    *_ablation("gibberish", "Gibberish", ref="0.414"),
    Metric(
        "explanation_share_cos",
        "AR on AV output minus empty string, raw cos",
        "eval",
        "ablation.explanation_share.cos.mean",
        ci="ablation.explanation_share.cos.ci95",
        n="ablation.explanation_share.cos.n",
        baseline="0 (content-blind)",
        definition="AR score on the AV output minus on the empty string: the text's share",
        shown=("report", "index:ar", "card:ar"),
    ),
    Metric(
        "explanation_share_fve_cen",
        "AR on AV output minus empty string, centred fve_cen",
        "eval",
        "ablation.explanation_share.fve_cen.mean",
        ci="ablation.explanation_share.fve_cen.ci95",
        n="ablation.explanation_share.fve_cen.n",
        baseline="0 (content-blind)",
        definition="the same difference, centred",
        shown=("report", "index:ar", "card:ar"),
    ),
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
        n="per_claim.n_claims",
        n_unit="claims",
        baseline="0 (the claim adds nothing)",
        definition="mse without a claim minus with all claims, over rawvar",
        reference=Reference("+1.8% to +7.3% FVE", GEMMA_PAIR),
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
        return BY_KEY[key].name.format(**self._args)

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
        m = BY_KEY[key]
        return interval(self.ci(key), _digits(m) if m.fmt == "num" else 3)

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


QUALITY_BARS: tuple[Bar, ...] = (
    Bar("eval_n", ">=", 50),
    Bar("vector_use_gap", ">=", 0.3),
    Bar("explanation_share_cos", ">=", 0.10, ci_above_zero=True),
    Bar("explanation_share_fve_cen", ">=", 0.10, ci_above_zero=True),
    Bar("identity_argmax_accuracy", ">=", 0.20),
    Bar("unique_output_rate", ">=", 0.90),
    Bar("empty_output_rate", "<=", 0.02),
    Bar("round_trip_fve_cen", ">", threshold_metric="random_floor_fve_cen"),
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
        met = None
        if isinstance(value, int | float) and isinstance(limit, int | float):
            met = {">=": value >= limit, "<=": value <= limit, ">": value > limit}[bar.op]
            if bar.op == ">" and ci:
                met = ci[0] is not None and ci[0] > limit  # above the floor: its whole interval
            if bar.ci_above_zero:
                met = met and bool(ci) and ci[0] is not None and ci[0] > 0
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

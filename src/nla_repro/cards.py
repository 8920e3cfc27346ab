"""Model cards for the AV, the AR and the SAE, and RELEASE_CALIBRATION.md.

Everything a card says about results is read from `metrics/*.json` and the models' sidecars
(`nla_meta.yaml`); the templates in `card_templates/` only lay it out. The one set of numbers
typed here is `REFERENCE`: the published numbers DESIGN.md measures against, each with its
source. `HEADLINES` names the numbers that go into each card's `model-index` (the Hub's
machine-readable results) by their path in a metrics file, so a test can check them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from nla_repro import config as C
from nla_repro.errors import NlaError
from nla_repro.io import atomic_path

KINDS = ("av", "ar", "sae")
METRIC_FILES = {
    "eval": C.EVAL_METRICS,
    "sae": C.SAE_METRICS,
    "sft_av": C.SFT_METRICS["av"],
    "sft_ar": C.SFT_METRICS["ar"],
    "label": C.LABEL_METRICS_PATH,
}
MODEL_DIRS = {"av": C.AV_DIR, "ar": C.AR_DIR, "sae": C.SAE_DIR}
# Plots each card shows (copied next to its README.md under plots/).
CARD_PLOTS = {
    "av": [C.EVAL_PLOTS / f"{n}.png" for n in ("round_trip", "k_curve", "identity", "cos_hist")],
    "ar": [C.EVAL_PLOTS / f"{n}.png" for n in ("ablation", "identity", "round_trip")],
    "sae": [C.SAE_PLOTS / f"{n}.png" for n in ("density", "train_curve")],
}
VERSION_TAG = re.compile(r"^v\d+\.\d+\.(\d+|dd)$")


@dataclass(frozen=True)
class Headline:
    """One number of a card's model-index: where it is measured and what it means."""

    key: str
    """metric_type in the model-index."""
    name: str
    """Human-readable metric name."""
    source: str
    """Metrics file it comes from (a key of METRIC_FILES)."""
    path: str
    """Dotted path of the value in that file."""


HEADLINES: dict[str, tuple[Headline, ...]] = {
    "av": (
        Headline("round_trip_cos", "Round-trip cosine (raw)", "eval", "round_trip.cos.mean"),
        Headline(
            "round_trip_fve_cen", "Round trip, centred", "eval", "centred.greedy.fve_cen.mean"
        ),
        Headline("vector_use_gap", "Vector-use gap (nats)", "eval", "vector_use.gap"),
        Headline("unique_output_rate", "Unique outputs", "eval", "diversity.unique_rate"),
        Headline("empty_output_rate", "Empty outputs", "eval", "diversity.empty_rate"),
        Headline(
            "identity_argmax_accuracy",
            "Cross-row identity argmax (centred)",
            "eval",
            "identity.centred.argmax_accuracy",
        ),
    ),
    "ar": (
        Headline(
            "replay_cos", "Replay cosine (AR on the label)", "eval", "centred.replay.cos.mean"
        ),
        Headline("replay_fve_cen", "Replay, centred", "eval", "centred.replay.fve_cen.mean"),
        Headline(
            "explanation_share_cos",
            "AV output minus empty string (raw)",
            "eval",
            "ablation.explanation_share.cos.mean",
        ),
        Headline(
            "explanation_share_fve_cen",
            "AV output minus empty string (centred)",
            "eval",
            "ablation.explanation_share.fve_cen.mean",
        ),
        Headline(
            "empty_string_cos", "Cosine on the empty string", "eval", "ablation.empty.cos.mean"
        ),
    ),
    "sae": (
        Headline("explained_variance", "Explained variance", "sae", "explained_variance"),
        Headline("l0", "L0", "sae", "l0"),
        Headline("dead_latents", "Dead latents", "sae", "latents.dead_training_window"),
        Headline("loss_recovered", "LM loss recovered", "sae", "loss_recovered.recovered"),
        Headline("mse", "MSE", "sae", "mse"),
    ),
}

# Published numbers (DESIGN.md "Reference numbers"): what a release is calibrated against.
REFERENCE = {
    "gemma_pair": "Gemma-4-E2B L23 NLA pair (published card)",
    "round_trip_cos": "0.438 ± 0.054 (n=42 of 50; 8 empty outputs excluded)",
    "ablation": {"greedy": "0.429", "empty": "0.405", "unrelated": "0.405", "gibberish": "0.414"},
    "identity": "2–4% at n=50",
    "per_claim": "+1.8% to +7.3% FVE",
    "judge_validity": "1.0 (vs 3.1 for a 27B NLA)",
    "prefix_av": "Gemma-2-2B L19 prefix AV (published card)",
    "centred": {
        "greedy": "0.528",
        "best_of_k": "0.631 (best of 64)",
        "paraphrase_ceiling": "0.598",
        "random_floor": "0.498",
    },
    "sae": "TopK SAEs on Gemma-4: E4B L21 k=128, 32,768 latents: EV 0.939, 0 dead; "
    "E2B L25 k=16, 6,144 latents: EV 0.995, L0 16",
}


@dataclass(frozen=True)
class Target:
    """A quality bar the embedded default's NLA is held to (issue 9); the card reports each
    as met or missed with the measured value, never hides a miss."""

    name: str
    """What is measured, as the summary table prints it."""
    path: str
    """Dotted path of the value in metrics/eval.json."""
    op: str
    """">=" or "<=" against `threshold`; ">" compares with the value at `threshold_path`."""
    threshold: float | None = None
    threshold_path: str | None = None
    """A baseline measured in the same eval (e.g. the random floor) instead of a constant."""
    ci_path: str | None = None
    """Its 95% interval, which must lie above 0 where `ci_above_zero`."""
    ci_above_zero: bool = False
    percent: bool = False
    """Shown as a percentage (rates)."""


QUALITY_TARGETS: tuple[Target, ...] = (
    Target("held-out rows evaluated (n)", "n", ">=", 50),
    Target("AV vector-use gap (nats)", "vector_use.gap", ">=", 0.3, ci_path="vector_use.ci95"),
    Target(
        "AR on AV output minus empty string, raw cos",
        "ablation.explanation_share.cos.mean",
        ">=",
        0.10,
        ci_path="ablation.explanation_share.cos.ci95",
        ci_above_zero=True,
    ),
    Target(
        "AR on AV output minus empty string, centred fve_cen",
        "ablation.explanation_share.fve_cen.mean",
        ">=",
        0.10,
        ci_path="ablation.explanation_share.fve_cen.ci95",
        ci_above_zero=True,
    ),
    Target(
        "cross-row identity argmax accuracy (centred)",
        "identity.centred.argmax_accuracy",
        ">=",
        0.20,
        percent=True,
    ),
    Target("unique greedy outputs", "diversity.unique_rate", ">=", 0.90, percent=True),
    Target(
        "empty outputs (scored, in every denominator)",
        "diversity.empty_rate",
        "<=",
        0.02,
        percent=True,
    ),
    Target(
        "centred round trip fve_cen vs random floor",
        "centred.greedy.fve_cen.mean",
        ">",
        threshold_path="centred.random_floor.fve_cen",
        ci_path="centred.greedy.fve_cen.ci95",
    ),
)


def target_rows(ev: dict) -> list[dict]:
    """Each quality target with the measured value, its interval, the bar and whether it is met
    (None where the eval did not measure it)."""
    rows = []
    for t in QUALITY_TARGETS:
        value = lookup(ev, t.path)
        bar = lookup(ev, t.threshold_path) if t.threshold_path else t.threshold
        ci = lookup(ev, t.ci_path) if t.ci_path else None
        met = None
        if isinstance(value, int | float) and isinstance(bar, int | float):
            met = {">=": value >= bar, "<=": value <= bar, ">": value > bar}[t.op]
            if t.op == ">" and ci:
                met = ci[0] > bar  # above the floor means its whole interval is
            if t.ci_above_zero:
                met = met and bool(ci) and ci[0] > 0
        show = pct if t.percent else num
        rows.append(
            {
                "name": t.name,
                "value": show(value),
                "ci": interval(ci),
                "target": f"{t.op} {show(bar)}" + (", CI > 0" if t.ci_above_zero else ""),
                "met": {True: "yes", False: "NO", None: "n/a"}[met],
            }
        )
    return rows


class CardError(NlaError):
    """A card input (metrics file, sidecar, plot) is missing or unreadable."""


def lookup(data: dict, path: str) -> Any:
    """The value at a dotted path, or None where any part is missing."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def num(value: Any, digits: int = 3) -> str:
    """A measured number as the cards print it; 'n/a' when it was not measured."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _or_null(value: Any, null: str) -> str:
    return null if value is None else str(value)


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def interval(pair: list | None, digits: int = 3) -> str:
    return "" if not pair else f"[{num(pair[0], digits)}, {num(pair[1], digits)}]"


# --- Inputs ---------------------------------------------------------------------------------


@dataclass
class CardInputs:
    """What the cards are made of: params, every metrics file, the three sidecars."""

    params: C.Params
    metrics: dict[str, dict]
    sidecars: dict[str, dict]
    root: Path
    levers: dict | None = None
    """benchmarks/levers.json when it exists (the lever sweep RELEASE_CALIBRATION.md shows)."""


def read_inputs(params: C.Params, root: Path | str = ".") -> CardInputs:
    """Read metrics/*.json and models/{av,ar,sae}/nla_meta.yaml; errors name the file."""
    root = Path(root)
    metrics, sidecars = {}, {}
    for name, path in METRIC_FILES.items():
        file = root / path
        if not file.exists():
            raise CardError(f"{file}: not found (run `dvc repro` up to the stage that writes it)")
        try:
            metrics[name] = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise CardError(f"{file}: not valid JSON ({err})") from None
    for kind, folder in MODEL_DIRS.items():
        file = root / folder / "nla_meta.yaml"
        if not file.exists():
            raise CardError(f"{file}: not found (run `dvc repro` or `dvc pull`)")
        sidecars[kind] = yaml.safe_load(file.read_text())
    levers_file = root / C.LEVERS_PATH
    levers = json.loads(levers_file.read_text()) if levers_file.exists() else None
    return CardInputs(params, metrics, sidecars, root, levers)


def repo_names(params: C.Params, base_model: str) -> dict[str, str]:
    """Hub repo names (without the org) of the three released models."""
    prefix = params.card.repo_prefix
    if prefix is None:
        short = re.sub(r"[^a-z0-9.]+", "-", base_model.split("/")[-1].lower()).strip("-")
        prefix = f"nla-{short}-l{params.extract.layer}"
    return {kind: f"{prefix}-{kind}" for kind in KINDS}


def headline_values(kind: str, metrics: dict[str, dict]) -> dict[str, Any]:
    return {h.key: lookup(metrics[h.source], h.path) for h in HEADLINES[kind]}


# --- Cards ----------------------------------------------------------------------------------


def _render(name: str, **context: Any) -> str:
    """Render a template of `card_templates/`; an undefined name is an error, not a blank."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nla_repro", "card_templates"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template(name).render(**context)


def _eval_results(kind: str, inputs: CardInputs) -> list[EvalResult]:
    sidecar = inputs.sidecars[kind]
    split = inputs.params.sae.eval_split if kind == "sae" else inputs.params.eval.split
    task = {
        "av": ("activation-verbalization", "Activation verbalization (round trip through the AR)"),
        "ar": ("activation-reconstruction", "Activation reconstruction from text"),
        "sae": ("sparse-autoencoding", f"Sparse autoencoding of layer {sidecar['layer']}"),
    }[kind]
    results = []
    for h in HEADLINES[kind]:
        value = lookup(inputs.metrics[h.source], h.path)
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type=task[0],
                task_name=task[1],
                dataset_type="nla-repro-corpus",
                dataset_name=f"nla-repro corpus ({split} split), {sidecar['base_model']} "
                f"layer {sidecar['layer']}",
                dataset_split=split,
                metric_type=h.key,
                metric_name=h.name,
                metric_value=value,
                # Where the number was measured: metrics file and key.
                metric_config=f"{Path(METRIC_FILES[h.source]).as_posix()}:{h.path}",
            )
        )
    return results


def warnings_for(kind: str, ev: dict) -> list[str]:
    """Failure modes (DESIGN.md) the eval detected, said at the top of the card."""
    verdicts, evidence = ev.get("verdicts", {}), ev.get("verdict_evidence", {})
    found = []
    if kind in ("av", "ar") and verdicts.get("content_blind"):
        found.append(
            "**This AR is content-blind**: it scores the AV's explanation no better than an "
            f"empty string ({evidence.get('content_blind', '')}). Round-trip numbers through "
            "it do not show that the explanations carry the activation's content."
        )
    if kind == "av" and verdicts.get("av_ignores_vector"):
        found.append(
            "**This AV ignores the vector**: its loss with shuffled vectors is no worse than "
            f"with the true ones ({evidence.get('av_ignores_vector', '')})."
        )
    if kind == "av" and verdicts.get("template_collapse"):
        found.append(
            "**Template collapse**: most explanations are the same text "
            f"({evidence.get('template_collapse', '')})."
        )
    return found


def _row(name: str, stat: dict | None, baseline: str, digits: int = 3) -> dict:
    stat = stat or {}
    return {
        "name": name,
        "value": num(stat.get("mean"), digits),
        "ci": interval(stat.get("ci95"), digits),
        "n": num(stat.get("n")),
        "baseline": baseline,
    }


def eval_table(kind: str, ev: dict) -> list[dict]:
    """The evaluation rows a card shows: value, 95% CI, n, and the baseline to beat."""
    floor = ev.get("centred", {}).get("random_floor", {})
    k = lookup(ev, "best_of_k.k_max")
    if kind == "av":
        rt = ev.get("round_trip", {})
        div = ev.get("diversity", {})
        ident = lookup(ev, "identity.centred") or {}
        n = ev.get("n")
        return [
            _row(
                "Round trip cos(v, AR(AV(v))), raw",
                rt.get("cos"),
                f"random floor (mean pool cosine) {num(floor.get('cos'))}",
            ),
            _row(
                "Round trip, centred fve_cen",
                lookup(ev, "centred.greedy.fve_cen"),
                f"random floor {num(floor.get('fve_cen'))}",
            ),
            {
                "name": "mse_nrm",
                "value": num(rt.get("mse_nrm")),
                "ci": "",
                "n": num(n),
                "baseline": f"{num(rt.get('mse_nrm_random_baseline'))} (orthogonal)",
            },
            {
                "name": "fve_nrm",
                "value": num(rt.get("fve_nrm")),
                "ci": "",
                "n": num(n),
                "baseline": "0 (predict the train mean)",
            },
            _row(
                f"Best of {k} (oracle), centred",
                lookup(ev, f"centred.best_of_{k}.fve_cen"),
                f"paraphrase ceiling {num(lookup(ev, 'centred.paraphrase_ceiling.fve_cen.mean'))}",
            ),
            _row(
                "Replay (AR on the label), centred",
                lookup(ev, "centred.replay.fve_cen"),
                "anchor: what the labels reach",
            ),
            _row(
                "Vector-use gap (nats)",
                {**ev.get("vector_use", {}), "mean": lookup(ev, "vector_use.gap")},
                f">= {num(lookup(ev, 'vector_use.min_gap'), 2)} (else the vector is ignored)",
            ),
            {
                "name": "Unique outputs",
                "value": pct(div.get("unique_rate")),
                "ci": "",
                "n": num(n),
                "baseline": "collapse below 50%",
            },
            {
                "name": "Empty outputs (scored as the empty string)",
                "value": pct(div.get("empty_rate")),
                "ci": "",
                "n": num(n),
                "baseline": "0%",
            },
            {
                "name": "Cross-row identity argmax, centred",
                "value": f"{num(ident.get('argmax_hits'))}/{num(ident.get('n'))} "
                f"({pct(ident.get('argmax_accuracy'))})",
                "ci": f"p = {num(ident.get('p_value'))}",
                "n": num(ident.get("n")),
                "baseline": f"chance {pct(ident.get('chance'))}",
            },
            _row("Per-claim ΔFVE", lookup(ev, "per_claim.delta_fve"), "0 (claim adds nothing)", 4),
        ]
    if kind == "ar":
        rows = []
        for cond, label in (
            ("greedy", "AV output"),
            ("replay", "source label (replay)"),
            ("empty", "empty string"),
            ("unrelated", "unrelated real text"),
            ("gibberish", "gibberish"),
            ("explanation_share", "AV output minus empty string"),
        ):
            rows.append(
                _row(
                    f"{label}: cos",
                    lookup(ev, f"ablation.{cond}.cos"),
                    "0 (content-blind)" if cond == "explanation_share" else "",
                )
            )
            rows.append(
                _row(
                    f"{label}: fve_cen",
                    lookup(ev, f"ablation.{cond}.fve_cen"),
                    "0 (content-blind)"
                    if cond == "explanation_share"
                    else f"random floor {num(floor.get('fve_cen'))}",
                )
            )
        return rows
    raise ValueError(kind)


def _verdicts(ev: dict) -> list[dict]:
    return [
        {
            "name": name,
            "value": num(value),
            "evidence": ev.get("verdict_evidence", {}).get(name, ""),
        }
        for name, value in ev.get("verdicts", {}).items()
    ]


def training_rows(kind: str, inputs: CardInputs) -> list[tuple[str, str]]:
    """The training setup as recorded in the sidecar (what ran, not what params say now)."""
    meta = inputs.sidecars[kind]
    p = meta.get("params", {})
    src = meta.get("base_source", {})
    rows = [
        (
            "base model",
            f"{meta.get('base_model')} ({src.get('kind', src.get('source', ''))} "
            f"{src.get('wheel') or src.get('revision') or src.get('path') or ''})".strip(),
        ),
        ("architecture", str(meta.get("architecture"))),
        ("layer", f"{meta.get('layer')} (HF hidden_states[{meta.get('hidden_states_index')}])"),
        ("d_model", num(meta.get("d_model"))),
        ("quantization / compute", f"{meta.get('quantization')} / {meta.get('compute_dtype')}"),
        ("normalization", str(meta.get("normalization"))),
    ]
    if kind in ("av", "ar"):
        sft = inputs.metrics[f"sft_{kind}"]
        rows += [
            ("position rule", str(meta.get("position_rule"))),
            (
                "labels",
                f"{meta.get('label_mode')} ({inputs.metrics['label'].get('backend')} "
                f"labeler {inputs.metrics['label'].get('labeler_model')})",
            ),
            (
                "LoRA",
                f"r={p.get('lora_r')}, alpha={p.get('lora_alpha')}, "
                f"dropout={p.get('lora_dropout')}, unfrozen norms: {p.get('unfreeze_norms')}",
            ),
            ("LoRA targets", f"`{p.get('target_modules')}`"),
            (
                "optimizer",
                f"{sft.get('optimizer')}, lr {p.get('lr')} ({p.get('lr_schedule')}, "
                f"min {p.get('min_lr')}, warmup {p.get('warmup_steps')})",
            ),
            (
                "batch",
                f"{p.get('micro_batch')} x grad-accum {p.get('grad_accum')}, "
                f"max length {p.get('max_length')} tokens",
            ),
            ("steps", f"{sft.get('released_step')} released of {sft.get('max_steps')}"),
            ("rows", f"{num(sft.get('train_rows'))} train, {num(sft.get('val_rows'))} val"),
        ]
        if kind == "av":
            rows += [
                ("AV kind", str(lookup(meta, "av.kind"))),
                (
                    "injection scale",
                    f"{num(meta.get('injection_scale_resolved'))} "
                    f"(param: {_or_null(p.get('injection_scale'), 'null, the raw vector')})",
                ),
                ("marker token id", str(lookup(meta, "av.marker_token_id"))),
            ]
        else:
            rows.append(("AR decoder blocks kept", str(meta.get("ar_num_layers"))))
    else:
        sae = inputs.metrics["sae"]
        rows += [
            (
                "latents",
                f"{num(meta.get('d_sae'))} (expansion {p.get('expansion')}), TopK k={p.get('k')}",
            ),
            (
                "tokens",
                f"{num(lookup(sae, 'tokens.trained'))} trained "
                f"({num(lookup(sae, 'tokens.epochs'), 1)} epochs over "
                f"{num(lookup(sae, 'tokens.train_available'))} train tokens)",
            ),
            (
                "optimizer",
                f"Adam lr {lookup(sae, 'training.lr')}, batch {p.get('batch_size')}, "
                f"{num(lookup(sae, 'training.steps'))} steps, aux-k coef {p.get('aux_coef')}",
            ),
            ("dead-latent window", f"{num(p.get('dead_tokens'))} tokens"),
            (
                "outliers",
                f"tokens with norm > {p.get('outlier_norm')} x median dropped "
                f"({num(lookup(sae, 'tokens.train_outliers_dropped'))} train)",
            ),
        ]
    return rows


def sae_table(sae: dict) -> list[dict]:
    loss = sae.get("loss_recovered") or {}
    lat = sae.get("latents", {})
    n = f"{num(sae.get('n_tokens'))} tokens"
    return [
        {
            "name": "Explained variance",
            "value": num(sae.get("explained_variance")),
            "n": n,
            "baseline": "0 (predict the mean)",
        },
        {
            "name": "FVU (centred / uncentred)",
            "value": f"{num(sae.get('fvu'))} / {num(sae.get('fvu_uncentred'))}",
            "n": n,
            "baseline": "1",
        },
        {"name": "MSE", "value": num(sae.get("mse")), "n": n, "baseline": ""},
        {"name": "L0", "value": num(sae.get("l0"), 2), "n": n, "baseline": f"k = {lat.get('k')}"},
        {
            "name": "Dead latents (training window)",
            "value": f"{num(lat.get('dead_training_window'))} of {num(lat.get('d_sae'))}",
            "n": f"{num(lat.get('dead_window_tokens'))} tokens",
            "baseline": "0",
        },
        {
            "name": "Never fired (held out)",
            "value": num(lat.get("never_fired_held_out")),
            "n": n,
            "baseline": "0",
        },
        {
            "name": "LM loss: clean / SAE / zero-ablation",
            "value": f"{num(loss.get('clean'))} / {num(loss.get('sae'))} / "
            f"{num(loss.get('zero_ablation'))}",
            "n": f"{num(loss.get('predicted_tokens'))} tokens, {num(loss.get('docs'))} docs",
            "baseline": "",
        },
        {
            "name": "LM loss recovered",
            "value": num(loss.get("recovered")),
            "n": f"{num(loss.get('docs'))} docs",
            "baseline": "0 (zero ablation), 1 (clean)",
        },
        {
            "name": "Explained variance, train split",
            "value": num(lookup(sae, "train_split.explained_variance")),
            "n": f"{num(lookup(sae, 'train_split.n_tokens'))} tokens",
            "baseline": "",
        },
    ]


def card_context(kind: str, inputs: CardInputs, repo_id: str, version: str | None) -> dict:
    ev, meta = inputs.metrics["eval"], inputs.sidecars[kind]
    training = training_rows(kind, inputs)
    names = repo_names(inputs.params, meta["base_model"])
    org = repo_id.split("/")[0]
    return {
        "kind": kind,
        "repo_id": repo_id,
        "pair_ids": {k: f"{org}/{v}" for k, v in names.items()},
        "version": version,
        "base_model": meta["base_model"],
        "base_source": meta.get("base_source", {}),
        "layer": meta["layer"],
        "d_model": meta["d_model"],
        "profile": inputs.params.profile,
        "warnings": warnings_for(kind, ev),
        "training": training,
        "training_dict": dict(training),
        "eval_rows": eval_table(kind, ev) if kind != "sae" else sae_table(inputs.metrics["sae"]),
        "eval_n": ev.get("n"),
        "eval_split": inputs.params.eval.split,
        "verdicts": _verdicts(ev),
        "targets": target_rows(ev),
        "judge": ev.get("judge"),
        "plots": [p.name for p in CARD_PLOTS[kind]],
        "sft": inputs.metrics.get(f"sft_{kind}", {}),
        "sae": inputs.metrics["sae"],
        "label": inputs.metrics["label"],
        "ev": ev,
        "num": num,
        "pct": pct,
        "interval": interval,
        "lookup": lookup,
        "sae_names": {k: meta.get(k) for k in ("hook_name", "hook_layer")},
    }


def render_card(kind: str, inputs: CardInputs, org: str, version: str | None = None) -> ModelCard:
    """The model card (README.md with YAML front matter) of one released model."""
    meta = inputs.sidecars[kind]
    name = repo_names(inputs.params, meta["base_model"])[kind]
    tags = ["nla-repro", "interpretability", *inputs.params.card.tags]
    tags += (
        ["sparse-autoencoder", "saelens"]
        if kind == "sae"
        else ["natural-language-autoencoder", "lora", f"nla-{kind}"]
    )
    datasets = [inputs.params.corpus.hf_dataset] if inputs.params.corpus.hf_dataset else None
    data = ModelCardData(
        model_name=name,
        base_model=meta["base_model"],
        license=inputs.params.card.license,
        library_name="saelens" if kind == "sae" else "peft",
        pipeline_tag={"av": "text-generation", "ar": "feature-extraction"}.get(kind),
        tags=tags,
        datasets=datasets,
        eval_results=_eval_results(kind, inputs),
    )
    context = card_context(kind, inputs, f"{org}/{name}", version)
    return ModelCard(_render(f"{kind}.md.j2", card_data=data.to_yaml(), **context))


def write_cards(
    inputs: CardInputs, out_dir: Path | str, org: str, version: str | None = None
) -> None:
    """cards/{av,ar,sae}/README.md and plots/, written under a temporary name and renamed."""
    for plots in CARD_PLOTS.values():
        for plot in plots:
            if not (inputs.root / plot).exists():
                raise CardError(f"{inputs.root / plot}: not found (run `dvc repro eval sae`)")
    with atomic_path(out_dir) as tmp:
        for kind in KINDS:
            folder = tmp / kind / "plots"
            folder.mkdir(parents=True)
            for plot in CARD_PLOTS[kind]:
                shutil.copyfile(inputs.root / plot, folder / plot.name)
            card = render_card(kind, inputs, org, version)
            (tmp / kind / "README.md").write_text(str(card), encoding="utf-8", newline="\n")


# --- RELEASE_CALIBRATION.md -----------------------------------------------------------------


def previous_release(root: Path | str = ".") -> tuple[str | None, dict[str, dict]]:
    """The newest version tag reachable from HEAD but not at HEAD, and its metrics files as
    committed then (empty when there is no earlier release)."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    head = (git("rev-parse", "HEAD") or "").strip()
    tags = (git("tag", "--merged", "HEAD", "--sort=-v:refname") or "").split()
    for tag in tags:
        if not VERSION_TAG.match(tag):
            continue
        if (git("rev-list", "-n", "1", tag) or "").strip() == head:
            continue
        found = {}
        for name, path in METRIC_FILES.items():
            text = git("show", f"{tag}:{Path(path).as_posix()}")
            if text:
                found[name] = json.loads(text)
        return tag, found
    return None, {}


def changes_since(previous: dict[str, dict], current: dict[str, dict]) -> list[dict]:
    rows = []
    for kind in KINDS:
        for h in HEADLINES[kind]:
            old = lookup(previous.get(h.source, {}), h.path)
            new = lookup(current[h.source], h.path)
            delta = (
                new - old if isinstance(old, int | float) and isinstance(new, int | float) else None
            )
            rows.append(
                {
                    "model": kind.upper(),
                    "name": h.name,
                    "old": num(old),
                    "new": num(new),
                    "delta": "n/a" if delta is None else f"{delta:+.3f}",
                }
            )
    return rows


def render_calibration(inputs: CardInputs, previous_tag: str | None, previous: dict) -> str:
    """RELEASE_CALIBRATION.md: this build's numbers against the reference numbers."""
    ev = inputs.metrics["eval"]
    k = lookup(ev, "best_of_k.k_max")
    context = card_context("av", inputs, f"{inputs.params.card.org}/x", None) | {
        "ref": REFERENCE,
        "k": k,
        "best_of_k": lookup(ev, f"centred.best_of_{k}.fve_cen.mean"),
        "label": inputs.metrics["label"],
        "sft_av": inputs.metrics["sft_av"],
        "sft_ar": inputs.metrics["sft_ar"],
        "previous_tag": previous_tag,
        "changes": changes_since(previous, inputs.metrics) if previous_tag else [],
        "names": repo_names(inputs.params, inputs.sidecars["av"]["base_model"]),
        "ar_warnings": warnings_for("ar", ev),
        "av_warnings": warnings_for("av", ev),
        "pipeline_commit": inputs.sidecars["av"].get("code_commit"),
        "ar_rows": eval_table("ar", ev),
        "levers": lever_rows(inputs.levers),
        "levers_meta": inputs.levers,
        # Whether the sweep trained on this build's labels and activations (by sha256).
        "levers_same_inputs": (inputs.levers or {}).get("inputs_sha256")
        == inputs.sidecars["av"].get("inputs_sha256"),
        "levers_path": C.LEVERS_PATH.as_posix(),
    }
    return _render("calibration.md.j2", **context)


def lever_rows(levers: dict | None) -> list[dict]:
    """One row per lever run: the validation gap it reached at each validation step."""
    rows = []
    for run in (levers or {}).get("levers", []):
        key = "vector_use_gap" if run["model"] == "av" else "content_gap"
        curve = ", ".join(f"{v['step']}: {v[key]:+.3f}" for v in run["val"])
        last = run["val"][-1] if run["val"] else {}
        loss = last.get("val_loss" if run["model"] == "av" else "val_mse")
        rows.append(
            {
                "name": run["name"],
                "what": run["what"],
                "gap_name": key,
                "curve": curve,
                "loss": num(loss),
                "rows": run["train_rows"],
                "wall_s": num(run["wall_s"], 0),
            }
        )
    return rows

"""Model cards for the AV, the AR and the SAE.

Everything a card says about results is read from `metrics/*.json` and the models' sidecars
(`nla_meta.yaml`) through the metric registry (`evaluation.registry`); the templates in
`card_templates/` only lay it out. Each card's `model-index` (the Hub's machine-readable
results) lists the registry's metrics shown at `index:<kind>`, each with the metrics file and
path it was measured at.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from nla_repro import config as C
from nla_repro.errors import NlaError
from nla_repro.evaluation.compare import bars_under_each_pair, comparison_rows
from nla_repro.evaluation.registry import (
    BY_KEY,
    SOURCES,
    Results,
    family_rows,
    num,
    predictor_rows,
)
from nla_repro.io import atomic_path

KINDS = ("av", "ar", "sae")
# The published pair is the rl stage's (the SFT pair is evaluated beside it).
MODEL_DIRS = {"av": C.RL_AV_DIR, "ar": C.RL_AR_DIR, "sae": C.SAE_DIR}
# Plots each card shows (copied next to its README.md under plots/).
CARD_PLOTS = {
    "av": [
        C.EVAL_PLOTS / f"{n}.png"
        for n in ("baselines", "round_trip", "k_curve", "identity", "cos_hist")
    ],
    "ar": [C.EVAL_PLOTS / f"{n}.png" for n in ("ablation", "identity", "round_trip")],
    "sae": [C.SAE_PLOTS / f"{n}.png" for n in ("density", "train_curve")],
}
# Drawn only when the eval compared the pair with the SFT pair (the rl stage's pipeline).
OPTIONAL_PLOTS = {"av": [C.EVAL_PLOTS / "rl_vs_sft.png"], "ar": [], "sae": []}


def card_plots(kind: str, root: Path) -> list[Path]:
    """The plots a card shows: its own, and the optional ones this build drew."""
    return CARD_PLOTS[kind] + [p for p in OPTIONAL_PLOTS[kind] if (root / p).exists()]


VERSION_TAG = re.compile(r"v\d+\.\d+\.(\d+|dd)")
"""A release version; match it with `fullmatch` (a `$` would accept a trailing newline)."""


class CardError(NlaError):
    """A card input (metrics file, sidecar, plot) is missing or unreadable."""


@dataclass
class CardInputs:
    """What the cards are made of: params, every metrics file, the three sidecars."""

    params: C.Params
    metrics: dict[str, dict]
    sidecars: dict[str, dict]
    root: Path
    levers: dict | None = None
    """benchmarks/levers.json when it exists (the lever sweep RELEASE_CALIBRATION.md shows)."""
    rl_levers: dict | None = None
    """benchmarks/rl_levers.json when it exists (the RL lever sweep)."""


def read_inputs(params: C.Params, root: Path | str = ".") -> CardInputs:
    """Read metrics/*.json and models/{av,ar,sae}/nla_meta.yaml; errors name the file."""
    root = Path(root)
    metrics, sidecars = {}, {}
    for name, path in SOURCES.items():
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
    sweeps = [
        json.loads((root / path).read_text()) if (root / path).exists() else None
        for path in (C.LEVERS_PATH, C.RL_LEVERS_PATH)
    ]
    return CardInputs(params, metrics, sidecars, root, *sweeps)


def repo_names(params: C.Params, base_model: str) -> dict[str, str]:
    """Hub repo names (without the org) of the three released models."""
    prefix = params.card.repo_prefix
    if prefix is None:
        short = re.sub(r"[^a-z0-9.]+", "-", base_model.split("/")[-1].lower()).strip("-")
        prefix = f"nla-{short}-l{params.extract.layer}"
    return {kind: f"{prefix}-{kind}" for kind in KINDS}


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


def headline_values(kind: str, metrics: dict[str, dict]) -> dict[str, Any]:
    """The model-index numbers of one card, by metric key (what a release sidecar records)."""
    results = Results(metrics)
    return {key: results.value(key) for key in results.keys(f"index:{kind}")}


def _eval_results(kind: str, inputs: CardInputs) -> list[EvalResult]:
    sidecar = inputs.sidecars[kind]
    split = inputs.params.sae.eval_split if kind == "sae" else inputs.params.eval.split
    task = {
        "av": ("activation-verbalization", "Activation verbalization (round trip through the AR)"),
        "ar": ("activation-reconstruction", "Activation reconstruction from text"),
        "sae": ("sparse-autoencoding", f"Sparse autoencoding of layer {sidecar['layer']}"),
    }[kind]
    results = Results(inputs.metrics)
    out = []
    for key in results.keys(f"index:{kind}"):
        value = results.value(key)
        if value is None:  # not measured in this build: the model-index holds numbers only
            continue
        metric = BY_KEY[key]
        out.append(
            EvalResult(
                task_type=task[0],
                task_name=task[1],
                dataset_type="nla-repro-corpus",
                dataset_name=f"nla-repro corpus ({split} split), {sidecar['base_model']} "
                f"layer {sidecar['layer']}",
                dataset_split=split,
                metric_type=key,
                metric_name=results.name(key),
                metric_value=value,
                # Where the number was measured: metrics file and key.
                metric_config=f"{SOURCES[metric.source].as_posix()}:{metric.path}",
            )
        )
    return out


def warnings_for(kind: str, ev: dict) -> list[str]:
    """Failure modes (docs/concepts/failure-modes.md) the eval detected, said at the top of
    the card."""
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
    if kind == "av":
        for verdict, what in (
            ("beats_mean_direction", "a constant (the train pool's mean vector)"),
            ("beats_text_free_centroid", "a text-free predictor (the nearest family centroid)"),
        ):
            if verdicts.get(verdict) is False:
                found.append(
                    f"**The round trip does not beat {what}** on the same rows "
                    f"({evidence.get(verdict, '')}). Until it does, the explanations are not "
                    "shown to carry more of the activation than no explanation at all."
                )
    if kind in ("av", "ar") and verdicts.get("ar_collusion"):
        found.append(
            "**The live AR and the AV may share a private code**: RL improved a number under "
            "the AR trained on the rollouts but not under the held-out SFT AR "
            f"({evidence.get('ar_collusion', '')}). Read the held-out AR's column of the "
            "SFT → RL table."
        )
    if kind == "av" and verdicts.get("template_collapse"):
        found.append(
            "**Template collapse**: most explanations are the same text "
            f"({evidence.get('template_collapse', '')})."
        )
    return found


def verdict_rows(ev: dict) -> list[dict]:
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
    m = Results(inputs.metrics)
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
        label = inputs.metrics["label"]
        rows += [
            ("position rule", str(meta.get("position_rule"))),
            (
                "labels",
                f"{meta.get('label_mode')} ({label.get('backend')} "
                f"labeler {label.get('labeler_model')})",
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
            (
                "steps",
                f"{m.text(f'sft_{kind}_released_step')} released of "
                f"{m.text(f'sft_{kind}_max_steps')}",
            ),
            (
                "rows",
                f"{m.text(f'sft_{kind}_train_rows')} train, {m.text(f'sft_{kind}_val_rows')} val",
            ),
        ]
        rl = meta.get("rl_params")
        if rl:
            rows.append(
                (
                    "RL (GRPO, after SFT)",
                    f"{m.text('rl_released_step')} steps x {rl['vectors_per_step']} vectors x "
                    f"group {rl['group_size']} ({m.text('rl_rollouts')} rollouts), reward "
                    f"{rl['reward']}, k3 KL {rl['kl_coef']} to the SFT policy, AV lr "
                    f"{rl['av_lr']}, AR lr {rl['ar_lr']}, AR trained on the rollouts: "
                    f"{rl['train_ar']}, temperature {rl['temperature']}, cap "
                    f"{rl['max_new_tokens']} tokens",
                )
            )
        if kind == "av":
            av = meta.get("av", {})
            rows += [
                ("AV kind", str(av.get("kind"))),
                (
                    "injection scale",
                    f"{num(meta.get('injection_scale_resolved'))} "
                    f"(param: {_or_null(p.get('injection_scale'), 'null, the raw vector')})",
                ),
                ("marker token id", str(av.get("marker_token_id"))),
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
                f"{m.text('sae_tokens_trained')} trained ({m.text('sae_epochs')} epochs over "
                f"{m.text('sae_train_tokens')} train tokens)",
            ),
            (
                "optimizer",
                f"Adam lr {sae['training']['lr']}, batch {p.get('batch_size')}, "
                f"{m.text('sae_steps')} steps, aux-k coef {p.get('aux_coef')}",
            ),
            ("dead-latent window", f"{num(p.get('dead_tokens'))} tokens"),
            (
                "outliers",
                f"tokens with norm > {p.get('outlier_norm')} x median dropped "
                f"({num(sae['tokens']['train_outliers_dropped'])} train)",
            ),
        ]
    return rows


def _or_null(value: Any, null: str) -> str:
    return null if value is None else str(value)


def card_context(kind: str, inputs: CardInputs, repo_id: str, version: str | None) -> dict:
    """What a card template is rendered with: `m` (the registry over this build's metrics:
    `m.text(key)`, `m.row(key)`, `m.rows(place)`), the tables, and the sidecar facts."""
    ev, meta = inputs.metrics["eval"], inputs.sidecars[kind]
    training = training_rows(kind, inputs)
    names = repo_names(inputs.params, meta["base_model"])
    org = repo_id.split("/")[0]
    results = Results(inputs.metrics)
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
        "eval_rows": results.rows(f"card:{kind}"),
        "eval_split": inputs.params.eval.split,
        "sae_split": inputs.metrics["sae"]["split"],
        "verdicts": verdict_rows(ev),
        "verdict": ev.get("verdicts", {}),
        "targets": bars_under_each_pair(inputs.metrics),
        "comparison": comparison_rows(inputs.metrics),
        "compare": ev.get("comparison", {}),
        "predictors": predictor_rows(inputs.metrics),
        "families": family_rows(inputs.metrics),
        "sample": ev["sample"],
        "baselines": ev["baselines"],
        "judge": ev["judge"],
        "plots": [p.name for p in card_plots(kind, inputs.root)],
        "label": inputs.metrics["label"],
        "m": results,
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
    """cards/{av,ar,sae}/README.md and plots/, written under a temporary name and renamed.
    Every input is checked first: the plots, then every declared metric of this build."""
    for plots in CARD_PLOTS.values():
        for plot in plots:
            if not (inputs.root / plot).exists():
                raise CardError(f"{inputs.root / plot}: not found (run `dvc repro eval sae`)")
    Results(inputs.metrics).check()
    with atomic_path(out_dir) as tmp:
        for kind in KINDS:
            folder = tmp / kind / "plots"
            folder.mkdir(parents=True)
            for plot in card_plots(kind, inputs.root):
                shutil.copyfile(inputs.root / plot, folder / plot.name)
            card = render_card(kind, inputs, org, version)
            (tmp / kind / "README.md").write_text(str(card), encoding="utf-8", newline="\n")

"""card stage: model cards for the AV, the AR and the SAE, and RELEASE_CALIBRATION.md.

Reads `metrics/*.json`, the models' sidecars and the eval and SAE plots; writes
`cards/{av,ar,sae}/` (README.md with YAML front matter and model-index, plus the plots it
shows) and `RELEASE_CALIBRATION.md` at the repo root. Nothing here measures anything: the
cards lay out what the other stages measured, through the metric registry (a declared metric
missing from the metrics files stops the stage). The "changes since the previous release"
section reads the newest earlier version tag's committed metrics from git.
"""

from __future__ import annotations

import logging

from nla_repro import config as C
from nla_repro.evaluation.compare import bars_under_each_pair, comparison_rows
from nla_repro.evaluation.registry import Results, predictor_rows
from nla_repro.io import write_text
from nla_repro.pipeline import stage_view
from nla_repro.platform import format_table
from nla_repro.release import calibration, cards

log = logging.getLogger(__name__)


def run(params: C.Params) -> None:
    params = stage_view(params, "card")
    inputs = cards.read_inputs(params)
    cards.write_cards(inputs, C.CARDS_DIR, params.card.org)
    tag, previous = calibration.previous_release()
    write_text(calibration.render_calibration(inputs, tag, previous), C.CALIBRATION_PATH)
    ev = inputs.metrics["eval"]
    # The content-blind warning heads both NLA cards; log it once.
    warnings = dict.fromkeys(w for kind in ("av", "ar") for w in cards.warnings_for(kind, ev))
    for warning in warnings:
        log.warning("card: %s", warning.replace("**", ""))
    names = cards.repo_names(params, inputs.sidecars["av"]["base_model"])
    print(summary(inputs, names))
    print(f"{C.CALIBRATION_PATH}: previous release {tag or 'none'}")


def summary(inputs: cards.CardInputs, names: dict[str, str]) -> str:
    """The closing table of a `dvc repro`: every card's model-index numbers, the round trip's
    paired lead over every baseline, control, anchor and oracle, then the quality bars of
    the NLA with the measured value and whether each is met."""
    results = Results(inputs.metrics)
    rows = [("card", "metric", "value")]
    for kind in cards.KINDS:
        card = f"{C.CARDS_DIR / kind / 'README.md'} ({names[kind]})"
        for key in results.keys(f"index:{kind}"):
            rows.append((card, results.name(key), results.text(key)))
            card = ""
    leads = [("round trip minus", "kind", "raw cos [95% CI]", "fve_cen [95% CI]", "wins")] + [
        (r["name"], r["kind"], r["lead_cos"], r["lead_fve_cen"], r["wins"])
        for r in predictor_rows(inputs.metrics)
    ]
    bar_list = bars_under_each_pair(inputs.metrics)
    compared = "met_heldout" in (bar_list[0] if bar_list else {})
    header = ("quality bar", "value", "95% CI", "bar", "met")
    bars = [header + (("held-out SFT AR", "SFT pair") if compared else ())] + [
        (r["name"], r["value"], r["ci"], r["target"], r["met"])
        + ((r["met_heldout"], r["met_sft"]) if compared else ())
        for r in bar_list
    ]
    parts = [
        "Headline numbers",
        format_table(rows),
        "Baselines (paired over the same rows; an oracle selects with the target)",
        format_table(leads),
    ]
    changes = comparison_rows(inputs.metrics)
    if changes:
        table = [("SFT -> RL", "SFT", "RL", "RL - SFT [95% CI]", "RL AV, held-out AR")] + [
            (r["name"], r["sft"], r["rl"], r["rl_minus_sft"], r["heldout"]) for r in changes
        ]
        collusion = inputs.metrics["eval"]["comparison"]["ar_collusion"]
        parts += [f"SFT -> RL, same rows (AR collusion: {collusion})", format_table(table)]
    return "\n\n".join([*parts, "NLA quality bars (the published pair)", format_table(bars)])

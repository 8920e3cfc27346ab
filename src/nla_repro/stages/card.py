"""card stage: model cards for the AV, the AR and the SAE, and RELEASE_CALIBRATION.md.

Reads `metrics/*.json`, the models' sidecars and the eval and SAE plots; writes
`cards/{av,ar,sae}/` (README.md with YAML front matter and model-index, plus the plots it
shows) and `RELEASE_CALIBRATION.md` at the repo root. Nothing here measures anything:
`nla_repro.cards` lays out what the other stages measured. The "changes since the previous
release" section reads the newest earlier version tag's committed metrics from git.
"""

from __future__ import annotations

import logging

from nla_repro import cards
from nla_repro import config as C
from nla_repro.io import write_text
from nla_repro.platform import format_table

log = logging.getLogger(__name__)

CODE = (
    "stages/card.py",
    "cards.py",
    "card_templates/_common.md.j2",
    "card_templates/av.md.j2",
    "card_templates/ar.md.j2",
    "card_templates/sae.md.j2",
    "card_templates/calibration.md.j2",
)


def run(params: C.Params) -> None:
    inputs = cards.read_inputs(params)
    cards.write_cards(inputs, C.CARDS_DIR, params.card.org)
    tag, previous = cards.previous_release()
    write_text(cards.render_calibration(inputs, tag, previous), C.CALIBRATION_PATH)
    ev = inputs.metrics["eval"]
    # The content-blind warning heads both NLA cards; log it once.
    warnings = dict.fromkeys(w for kind in ("av", "ar") for w in cards.warnings_for(kind, ev))
    for warning in warnings:
        log.warning("card: %s", warning.replace("**", ""))
    names = cards.repo_names(params, inputs.sidecars["av"]["base_model"])
    print(summary(inputs, names))
    print(f"{C.CALIBRATION_PATH}: previous release {tag or 'none'}")


def summary(inputs: cards.CardInputs, names: dict[str, str]) -> str:
    """The closing table of a `dvc repro`: every card's headline numbers, then the quality
    targets of the NLA with the measured value and whether it is met."""
    rows = [("card", "metric", "value")]
    for kind in cards.KINDS:
        card = f"{C.CARDS_DIR / kind / 'README.md'} ({names[kind]})"
        for h in cards.HEADLINES[kind]:
            rows.append((card, h.name, cards.num(cards.lookup(inputs.metrics[h.source], h.path))))
            card = ""
    targets = [("quality target", "value", "95% CI", "target", "met")] + [
        (r["name"], r["value"], r["ci"], r["target"], r["met"])
        for r in cards.target_rows(inputs.metrics["eval"])
    ]
    return "\n\n".join(
        ["Headline numbers", format_table(rows), "NLA quality targets", format_table(targets)]
    )

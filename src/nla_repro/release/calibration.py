"""RELEASE_CALIBRATION.md: this build's numbers against the published reference numbers
(each registry metric with a `reference`), the quality bars, the lever sweep, and the changes
since the previous release tag."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from nla_repro import config as C
from nla_repro.evaluation.registry import BY_KEY, SOURCES, MetricMissing, Results, num, pct
from nla_repro.release.cards import (
    KINDS,
    VERSION_TAG,
    CardInputs,
    _render,
    card_context,
    repo_names,
    warnings_for,
)


def previous_release(root: Path | str = ".") -> tuple[str | None, dict[str, dict]]:
    """The newest version tag reachable from HEAD but not at HEAD, and its metrics files as
    committed then (empty when there is no earlier release)."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    head = (git("rev-parse", "HEAD") or "").strip()
    tags = (git("tag", "--merged", "HEAD", "--sort=-v:refname") or "").split()
    for tag in tags:
        if not VERSION_TAG.fullmatch(tag):
            continue
        if (git("rev-list", "-n", "1", tag) or "").strip() == head:
            continue
        found = {}
        for name, path in SOURCES.items():
            text = git("show", f"{tag}:{Path(path).as_posix()}")
            if text:
                found[name] = json.loads(text)
        return tag, found
    return None, {}


def changes_since(previous: dict[str, dict], current: dict[str, dict]) -> list[dict]:
    """Each card's model-index metric in the previous release and in this build."""
    now, then = Results(current), Results(previous)
    rows = []
    for kind in KINDS:
        for key in now.keys(f"index:{kind}"):
            new = now.value(key)
            try:
                old = then.value(key) if BY_KEY[key].source in previous else None
            except MetricMissing:  # the release before this metric existed
                old = None
            numeric = all(isinstance(v, int | float) for v in (old, new))
            rows.append(
                {
                    "model": kind.upper(),
                    "name": now.name(key),
                    "old": "not published" if old is None else num(old),
                    "new": now.text(key),
                    "delta": f"{new - old:+.3f}" if numeric else "",
                }
            )
    return rows


def reference_rows(results: Results) -> list[dict]:
    """The calibration table: every metric with a published reference number."""
    rows = []
    for key in results.keys("calibration"):
        m = BY_KEY[key]
        rows.append(
            results.row(key)
            | {
                "value": results.text(key) + results.spread_text(key),
                "reference": m.reference.value
                + (f" ({m.reference.caveat})" if m.reference.caveat else ""),
                "reference_model": m.reference.model,
            }
        )
    return rows


def render_calibration(inputs: CardInputs, previous_tag: str | None, previous: dict) -> str:
    """RELEASE_CALIBRATION.md: this build's numbers against the reference numbers."""
    results = Results(inputs.metrics)
    results.check()
    context = card_context("av", inputs, f"{inputs.params.card.org}/x", None) | {
        "reference_rows": reference_rows(results),
        "vector_rows": results.rows("calibration:vector"),
        "sft_av": inputs.metrics["sft_av"],
        "previous_tag": previous_tag,
        "changes": changes_since(previous, inputs.metrics) if previous_tag else [],
        "names": repo_names(inputs.params, inputs.sidecars["av"]["base_model"]),
        "ar_warnings": warnings_for("ar", inputs.metrics["eval"]),
        "av_warnings": warnings_for("av", inputs.metrics["eval"]),
        "pipeline_commit": inputs.sidecars["av"].get("code_commit"),
        "ar_rows": results.rows("card:ar"),
        "levers": lever_rows(inputs.levers),
        "levers_meta": inputs.levers,
        # Whether the sweep trained on this build's labels and activations (by sha256).
        "levers_same_inputs": (inputs.levers or {}).get("inputs_sha256")
        == inputs.sidecars["av"].get("inputs_sha256"),
        "levers_path": C.LEVERS_PATH.as_posix(),
        "rl_levers": rl_lever_rows(inputs.rl_levers),
        "rl_levers_meta": inputs.rl_levers,
        "rl_levers_path": C.RL_LEVERS_PATH.as_posix(),
        "rl_lever_columns": RL_LEVER_COLUMNS,
        # The lever sweep is a benchmark's record (benchmarks/levers.json), not a metric.
        "num": num,
        "pct": pct,
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


RL_LEVER_COLUMNS = (
    ("round_trip_fve_cen", "round trip fve_cen"),
    ("explanation_share_cos", "share raw"),
    ("explanation_share_fve_cen", "share fve_cen"),
    ("identity_argmax_accuracy", "identity"),
    ("unique_output_rate", "unique"),
    ("round_trip_minus_mean_direction_cos", "− mean dir. raw"),
    ("round_trip_minus_mean_direction_fve_cen", "− mean dir. fve_cen"),
    ("round_trip_minus_centroid_fve_cen", "− centroid fve_cen"),
)
"""The RL lever table's number columns (registry keys) and their headers."""


def rl_lever_rows(sweep: dict | None) -> list[dict]:
    """One row per RL lever and AR (live, held-out): the numbers the bars read, with the
    paired interval where there is one, and the bars met of those the sweep measures."""
    rows = []
    for run in (sweep or {}).get("levers", []):
        for ar, label in (("live_ar", "live"), ("heldout_ar", "held-out SFT")):
            scored = run["score"][ar]
            cells = []
            for key, _ in RL_LEVER_COLUMNS:
                value = scored["numbers"][key]
                fmt = pct if key in ("identity_argmax_accuracy", "unique_output_rate") else num
                ci = value.get("ci95")
                cells.append(fmt(value["mean"]) + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else ""))
            rows.append(
                {
                    "name": run["name"],
                    "what": run["what"],
                    "steps": run["steps"],
                    "ar": label,
                    "cells": cells,
                    "met": f"{scored['bars_met_count']}/{len(scored['bars_met'])}",
                    "wall_s": num(run["wall_s"], 0),
                }
            )
    return rows

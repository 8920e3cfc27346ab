"""The metric registry: every published metric declared once, resolved strictly."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from nla_repro.evaluation import registry as R
from nla_repro.evaluation.report import eval_report

ROOT = Path(__file__).resolve().parents[1]
PLACES = {
    "report",
    "report:sae",
    "calibration",
    "calibration:vector",
    *(f"{p}:{k}" for p in ("index", "card") for k in ("av", "ar", "sae")),
}


@pytest.fixture
def metrics() -> dict[str, dict]:
    """The committed metrics files of the default build."""
    return {name: json.loads((ROOT / path).read_text()) for name, path in R.SOURCES.items()}


def test_declarations_are_consistent():
    keys = [m.key for m in R.METRICS]
    assert len(keys) == len(set(keys)), "duplicate metric keys"
    for m in R.METRICS:
        assert m.source in R.SOURCES, m.key
        assert set(m.shown) <= PLACES, (m.key, m.shown)
        for ref in re.findall(r"\{(\w+)\}", m.baseline):
            assert ref in R.BY_KEY, f"{m.key}: baseline names unknown metric {ref}"
        assert (m.reference is not None) == ("calibration" in m.shown), m.key
        assert (m.fmt == "fraction") == (m.count is not None), m.key
    for bar in R.QUALITY_BARS:
        assert bar.metric in R.BY_KEY and (bar.threshold_metric or "eval_n") in R.BY_KEY
    # No oracle is a bar: it selects with the target, so beating it is not the point.
    oracles = {p.name for p in R.PREDICTORS if p.kind == "oracle"}
    assert not any(b.metric.endswith(f"_{o}_cos") for b in R.QUALITY_BARS for o in oracles)


def test_every_baseline_is_a_bar_in_both_views_and_shown_in_the_report():
    bars = {b.metric for b in R.QUALITY_BARS}
    for p in R.PREDICTORS:
        if p.kind == "baseline":
            for view in ("cos", "fve_cen"):
                key = R.lead_key(p.name, view)
                assert key in bars and "report" in R.BY_KEY[key].shown, key
    assert "explanation_share_cos" in bars  # minus the empty string: the content test


def test_every_declared_metric_resolves_on_the_committed_build(metrics):
    results = R.Results(metrics)
    results.check()  # MetricMissing on any declared path the build does not have
    assert results.value("round_trip_cos") == metrics["eval"]["round_trip"]["cos"]["mean"]
    assert (
        results.value("best_of_k_fve_cen")
        == metrics["eval"]["predictors"]["best_of_k"]["fve_cen"]["mean"]
    )
    assert results.name("best_of_k_fve_cen") == "Best of 2 samples (oracle): fve_cen"
    assert results.name("round_trip_minus_best_of_k_cos").startswith("Round trip minus best of 2")


def test_a_missing_path_is_an_error_naming_file_and_path(metrics):
    del metrics["eval"]["vector_use"]["gap"]
    with pytest.raises(R.MetricMissing, match=r"metrics/eval\.json .*vector_use\.gap"):
        R.Results(metrics).value("vector_use_gap")
    with pytest.raises(R.MetricMissing):
        R.Results(metrics).check()
    with pytest.raises(R.MetricMissing, match=r"metrics/sae\.json among the inputs"):
        R.Results({"eval": metrics["eval"]}).value("l0")


def test_switched_off_features_drop_their_metrics_and_nulls_say_not_measured(metrics):
    ev = copy.deepcopy(metrics["eval"])
    ev["best_of_k"]["k_max"] = 0
    ev["judge"]["n"] = 0
    ev["predictors"]["paraphrase_ceiling"]["fve_cen"]["mean"] = None
    results = R.Results({"eval": ev})
    assert not results.applies("best_of_k_fve_cen")
    keys = results.keys("report")
    assert "best_of_k_fve_cen" not in keys and "judge_av_validity" not in keys
    assert results.text("paraphrase_ceiling_fve_cen") == "not measured"
    results.check(("eval",))


def test_formats_intervals_and_baselines(metrics):
    r = R.Results(metrics)
    ident = metrics["eval"]["identity"]["centred"]
    assert r.text("identity_argmax_accuracy") == (
        f"{ident['argmax_hits']}/{ident['n']} ({100 * ident['argmax_accuracy']:.1f}%)"
    )
    pred = metrics["eval"]["predictors"]
    floor, const = pred["random_floor"]["cos"]["mean"], pred["mean_direction"]["cos"]["mean"]
    assert r.baseline("round_trip_cos") == f"mean direction {const:.3f}; random floor {floor:.3f}"
    lo, hi = metrics["eval"]["round_trip"]["cos"]["ci95"]
    assert r.ci_text("round_trip_cos") == f"[{lo:.3f}, {hi:.3f}]"
    assert r.n_text("explained_variance") == f"{metrics['sae']['n_tokens']:,} tokens"


def test_the_console_report_shows_every_report_metric_with_its_baseline(metrics):
    rows = dict(eval_report(metrics["eval"]))
    results = R.Results(metrics)
    for key in results.keys("report"):
        assert rows[results.name(key)].startswith(results.text(key)), key
        if results.baseline(key):
            assert rows[results.name(key)].endswith(results.baseline(key)), key
    assert rows["verdict content_blind"] == str(metrics["eval"]["verdicts"]["content_blind"])
    assert sum(k.startswith("quality bar:") for k in rows) == len(R.QUALITY_BARS)


def test_templates_and_report_name_no_dotted_metric_paths():
    """Everything goes through the registry: no `lookup(` in a card template, and no module
    but the registry and the suite that computes them indexes eval metrics by path."""
    templates = ROOT / "src/nla_repro/card_templates"
    for path in templates.glob("*.j2"):
        assert "lookup(" not in path.read_text(), path.name

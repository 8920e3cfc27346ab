"""Two evaluations of the same rows: per-row quantities that average to the suite's metrics,
paired differences, and the AR-collusion verdict on constructed pairs."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_eval import (
    FakeAV,
    TableAR,
    constructed_rows,
    one_pair_chunk,
    with_baselines,
)

from nla_repro import config as C
from nla_repro.evaluation import compare as K
from nla_repro.evaluation.registry import Results
from nla_repro.evaluation.suite import compute_metrics
from nla_repro.nla import shuffled


def scored(ar_kind: str):
    """A validated rows table of the constructed rows, its metadata and its metrics."""
    rows = constructed_rows()
    av = FakeAV()
    targets = np.stack(rows["target"].to_list())
    mu = targets.mean(0)
    if ar_kind == "oracle":
        greedy = av.generate(torch.from_numpy(targets), 0, 0.0)
        keys = [re.search(r"row -?\d+", g).group(0) for g in greedy]
        ar = TableAR(dict(zip(keys, targets, strict=True)) | {"": mu})
    else:
        ar = TableAR({}, constant=mu + 1.0)
    cfg = replace(C.EvalConfig(samples=2, paraphrases=0, judge_backend="none", n_boot=300))
    vectors = torch.from_numpy(targets)
    part = one_pair_chunk(rows, shuffled(vectors), rows["text"].tolist(), av, ar, mu, cfg)
    part, meta = with_baselines(part, targets, mu)
    return part, meta, compute_metrics(part, meta)


@pytest.mark.parametrize("ar_kind", ["oracle", "constant"])
def test_each_compared_number_averages_to_the_suites_metric(ar_kind):
    rows, meta, metrics = scored(ar_kind)
    per_row = K.per_row(rows, meta)
    results = Results({"eval": metrics})
    for key in K.COMPARED:
        if key == "explanation_length_words":
            continue
        value = K.RATIOS[key](per_row[key]) if key in K.RATIOS else per_row[key].mean()
        assert value == pytest.approx(results.value(key), abs=1e-9), key


def test_a_table_against_itself_differs_by_zero_everywhere():
    rows, meta, _ = scored("oracle")
    found = K.compare(rows, rows, meta)
    for key, d in found.items():
        assert d["difference"]["mean"] == pytest.approx(0.0, abs=1e-12), key
        assert d["difference"]["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12), key


def test_compare_refuses_tables_of_other_rows():
    rows, meta, _ = scored("oracle")
    with pytest.raises(ValueError, match="different rows"):
        K.compare(rows, rows.iloc[::-1].reset_index(drop=True), meta)


def test_collusion_when_only_the_live_ar_improves():
    good, meta, _ = scored("oracle")
    blind, _, _ = scored("constant")
    # The live AR reads the RL AV's code, the held-out AR reads nothing: collusion.
    found = K.rl_comparison(good, blind, blind, meta)
    assert found["ar_collusion"] is True
    assert "round_trip_fve_cen" in found["ar_collusion_keys"]
    live = found["rl_minus_sft"]["round_trip_fve_cen"]
    assert live["difference"]["ci95"][0] > 0
    assert live["difference"]["mean"] == pytest.approx(live["a"] - live["b"])
    # Both ARs see the improvement: no collusion.
    honest = K.rl_comparison(good, blind, good, meta)
    assert honest["ar_collusion"] is False and honest["ar_collusion_keys"] == []
    assert "held-out AR" in honest["ar_collusion_evidence"]


def test_comparison_rows_and_bars_under_each_pair_read_the_comparison_block():
    good, meta, m_good = scored("oracle")
    blind, _, m_blind = scored("constant")
    eval_json = m_good | {
        "comparison": {
            "pairs": {"sft": m_blind, "rl_heldout_ar": m_blind},
            **K.rl_comparison(good, blind, blind, meta),
        }
    }
    rows = K.comparison_rows({"eval": eval_json})
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == set(K.COMPARED)
    assert by_key["identity_argmax_accuracy"]["rl"] == "100.0%"
    assert " pp" in by_key["identity_argmax_accuracy"]["rl_minus_sft"]
    bars = {b["key"]: b for b in K.bars_under_each_pair({"eval": eval_json})}
    assert bars["round_trip_minus_centroid_fve_cen"]["met"] == "yes"
    assert bars["round_trip_minus_centroid_fve_cen"]["met_heldout"] == "NO"
    assert bars["round_trip_minus_centroid_fve_cen"]["met_sft"] == "NO"
    assert K.comparison_rows({"eval": m_good}) == []

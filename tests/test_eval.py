"""eval stage and the metric suite: hand-computed metrics, verdicts on constructed ARs, the
stage on tiny trained models (rows.parquet -> eval.json exactly, resume, a pair by path)."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_rl import RL_SMALL
from test_sft import build_inputs, run_stage, sft_params

from nla_repro import config as C
from nla_repro import labeling as L
from nla_repro.errors import ConfigError, DataValidationError
from nla_repro.evaluation import baselines as B
from nla_repro.evaluation import measures as E
from nla_repro.evaluation import registry as R
from nla_repro.evaluation.chunk import Models
from nla_repro.evaluation.suite import compute_metrics
from nla_repro.labeling import judge as J
from nla_repro.nla import shuffled
from nla_repro.plots import CSV_NAMES, PNG_NAMES
from nla_repro.release.cards import warnings_for
from nla_repro.schemas import eval_rows_schema, read_eval_rows, validate
from nla_repro.stages import eval as S
from nla_repro.templates import claims, join_claims

# ---------------------------------------------------------------------------------------------
# Metrics on constructed vectors


def test_mse_nrm_is_2_for_orthogonal_and_0_for_identical():
    e = np.eye(4)
    assert E.mse_nrm_from_cos(E.cosine_rows(e[:2], e[2:])) == pytest.approx([2.0, 2.0])
    assert E.mse_nrm_from_cos(E.cosine_rows(e, 3 * e)) == pytest.approx([0.0] * 4)
    assert E.mse_nrm_from_cos(E.cosine_rows(e[:1], -e[:1])) == pytest.approx([4.0])


def test_fve_nrm_is_the_reference_definition_and_the_train_mean_scores_zero():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 8)) + np.array([4.0] + [0.0] * 7)
    targets = rng.normal(size=(50, 8)) + np.array([4.0] + [0.0] * 7)
    m = E.normalized(train).mean(axis=0)
    denom = ((E.normalized(targets) - m) ** 2).mean()
    assert E.fve_nrm_denominator(targets, m) == pytest.approx(denom)
    # Perfect reconstruction explains everything; the unnormalized mean m explains nothing.
    assert E.fve_nrm(np.zeros(50), targets, m) == pytest.approx(1.0)
    mse_of_m = ((E.normalized(targets) - m) ** 2).mean(axis=1)
    assert E.fve_nrm(mse_of_m, targets, m) == pytest.approx(0.0)
    # A normalized constant (the mean direction) cannot reach 0: mse_nrm normalizes it.
    mse_dir = E.mse_nrm_from_cos(E.cosine_rows(np.tile(m, (50, 1)), targets))
    assert E.fve_nrm(mse_dir, targets, m) < 0


def test_mean_direction_predictor_mse_nrm_is_2_1_minus_cos_with_the_mean():
    rng = np.random.default_rng(1)
    mean = np.zeros(16)
    mean[0] = 20.0
    train = mean + rng.normal(size=(200, 16))
    targets = mean + rng.normal(size=(30, 16))
    cols, meta = B.baseline_columns(targets, train, ["a"] * 200, train[:50], train.mean(0))
    pred = np.stack(cols["rec_mean_direction"])
    assert np.allclose(pred, train.mean(0), atol=1e-5)
    unit_mean = train.mean(0) / np.linalg.norm(train.mean(0))
    cos = targets @ unit_mean / np.linalg.norm(targets, axis=1)
    got = ((E.normalized(pred) - E.normalized(targets)) ** 2).mean(axis=1)
    assert got == pytest.approx(2 * (1 - cos), abs=1e-5)
    assert meta["centroid_k"] == 1 and meta["train_pool_n"] == 200


def test_centroid_predictor_recovers_planted_clusters():
    rng = np.random.default_rng(2)
    shared = np.zeros(32)
    shared[0] = 30.0
    centres = rng.normal(scale=3.0, size=(4, 32))
    fams = np.repeat(["w", "x", "y", "z"], 60)
    train = shared + centres[np.repeat(np.arange(4), 60)] + rng.normal(size=(240, 32))
    truth = rng.integers(0, 4, size=40)
    targets = shared + centres[truth] + rng.normal(size=(40, 32))
    cols, meta = B.baseline_columns(targets, train, fams, train, train.mean(0))
    assert meta["centroid_families"] == ["w", "x", "y", "z"] and meta["centroid_k"] == 4
    assert cols["centroid_family"] == [["w", "x", "y", "z"][t] for t in truth]
    assert np.allclose(cols["rec_centroid"][0], train[fams == cols["centroid_family"][0]].mean(0))
    # The nearest-train oracle returns a train vector of the right cluster.
    nn = np.stack(cols["rec_nearest_train"])
    which = np.abs(train[None, :, :] - nn[:, None, :]).max(axis=2).argmin(axis=1)
    assert np.allclose(train[which], nn, atol=1e-4)  # a train vector itself
    assert (fams[which] == np.array(["w", "x", "y", "z"])[truth]).all()


def test_pool_floor_is_the_mean_score_of_the_pool_and_about_half_centred():
    rng = np.random.default_rng(3)
    mean = np.zeros(64)
    mean[0] = 50.0
    pool = mean + rng.normal(size=(200, 64))
    targets = mean + rng.normal(size=(20, 64))
    raw, cen = B.pool_floor(targets, pool, pool.mean(0))
    assert raw[4] == pytest.approx(E.cosine_rows(np.tile(targets[4], (200, 1)), pool).mean())
    assert raw.mean() > 0.95 and cen.mean() == pytest.approx(0.5, abs=0.01)


def test_paired_difference_and_ratio_difference_by_hand():
    a, b = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.5, 0.9, 0.5, 0.5])
    d = E.paired_difference(a, b, seed=0, n_boot=500)
    assert d["mean"] == pytest.approx(0.15) and d["win_rate"] == pytest.approx(0.75)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    r = E.ratio_difference(np.array([1.0, 1.0]), np.array([2.0, 3.0]), np.array([4.0, 4.0]), 0, 50)
    assert r["mean"] == pytest.approx((5 - 2) / 8)


def test_stratified_sample_keeps_family_shares_and_is_seeded():
    groups = np.array(["pydoc"] * 107 + [f"g{i}" for i in range(10) for _ in range(3)])
    idx = E.stratified_sample(groups, 64, seed=5)
    assert len(set(idx.tolist())) == 64
    share = (groups[idx] == "pydoc").mean()
    assert abs(share - 107 / 137) < 0.03  # the first 64 in file order would be far off
    assert len(set(groups[idx])) == 11  # every family represented
    assert (E.stratified_sample(groups, 64, seed=5) == idx).all()
    assert sorted(E.stratified_sample(groups, 0, seed=5)) == list(range(137))


def test_centred_view_removes_the_shared_direction_that_inflates_raw_cosines():
    rng = np.random.default_rng(0)
    mean = np.zeros(64)
    mean[0] = 50.0
    pool = mean + rng.normal(size=(200, 64))
    a, b = pool[:100], pool[100:]
    # Unrelated vectors of an anisotropic pool: raw cosine near 1, centred near "knows nothing".
    assert E.cosine_rows(a, b).mean() > 0.95
    assert E.fve_cen_rows(a, b, pool.mean(0)).mean() == pytest.approx(0.5, abs=0.03)
    # The same vector back: 1 in both views.
    assert E.fve_cen_rows(a, a, pool.mean(0)) == pytest.approx(np.ones(100))


def test_identity_argmax_on_a_permuted_identity():
    targets = np.eye(6) + 0.01
    perm = [1, 0, 2, 3, 5, 4]  # two fixed points: rows 2 and 3
    out = E.identity(targets[perm], targets)
    assert out["argmax_hits"] == 2 and out["argmax_accuracy"] == pytest.approx(2 / 6)
    assert out["chance"] == pytest.approx(1 / 6)
    exact = E.identity(targets, targets)
    assert exact["argmax_accuracy"] == 1.0 and exact["p_value"] < 1e-4
    assert exact["margin"] == pytest.approx(exact["diag_mean"] - exact["offdiag_mean"])
    # One hit in n at chance 1/n: p = 1 - (1 - 1/n)^n.
    assert E.binomial_above_chance(1, 6, 1 / 6) == pytest.approx(1 - (5 / 6) ** 6)


def test_best_of_k_oracle_and_logprob_rerank_by_hand():
    scores = [[0.1, 0.5, 0.3, 0.2], [0.4, 0.0, 0.9, 0.1]]
    logprob = [[-1.0, -3.0, -0.5, -2.0], [-2.0, -1.0, -3.0, -0.1]]
    curve = {c["k"]: c for c in E.best_of_k(scores, logprob)}
    assert sorted(curve) == [1, 2, 4]
    assert curve[1]["oracle"] == pytest.approx((0.1 + 0.4) / 2)
    assert curve[2]["oracle"] == pytest.approx((0.5 + 0.4) / 2)
    assert curve[2]["logprob_rerank"] == pytest.approx((0.1 + 0.0) / 2)
    assert curve[4]["oracle"] == pytest.approx((0.5 + 0.9) / 2)
    assert curve[4]["logprob_rerank"] == pytest.approx((0.3 + 0.1) / 2)
    assert E.k_values(6) == [1, 2, 4, 6]
    rho = E.spearman_logprob_score([[1, 2, 3], [3, 2, 1]], [[1, 2, 3], [1, 2, 3]])
    assert rho["within_row_mean"] == pytest.approx(0.0) and rho["n_rows"] == 2


def test_template_diversity_counts_shared_prefixes_and_empties():
    texts = ["a" * 70 + "x", "a" * 70 + "y", "b", "", "b"]
    d = E.diversity(texts)
    assert d["unique_outputs"] == 4 and d["unique_rate"] == pytest.approx(4 / 5)
    assert d["empty_outputs"] == 1 and d["empty_rate"] == pytest.approx(1 / 5)
    # First 60 chars: both "a..." rows share, and the two "b" rows; 80: only the "b" rows.
    assert d["shared_prefix_60"] == pytest.approx(4 / 5)
    assert d["shared_prefix_80"] == pytest.approx(2 / 5)
    assert d["largest_prefix_group_60"] == 2


def test_claims_split_parsed_and_free_text():
    parsed = '<explanation>\n- a flood\n- a town\n- final token: "rain", a noun\n</explanation>'
    assert claims(parsed) == ["a flood", "a town", 'final token: "rain", a noun']
    assert claims("- one thing\n- another") == ["one thing", "another"]
    assert claims("It floods. The town is wet!") == ["It floods.", "The town is wet!"]
    assert claims("   ") == []
    assert join_claims(claims(parsed)) == parsed


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    v = np.random.default_rng(1).normal(0.3, 0.1, size=50)
    lo, hi = E.bootstrap_ci(v, seed=0, n_boot=500)
    assert lo < v.mean() < hi and hi - lo < 0.1
    assert E.bootstrap_ci(v, seed=0, n_boot=500) == [lo, hi]
    assert all(math.isnan(x) for x in E.bootstrap_ci([1.0], seed=0, n_boot=10))


# ---------------------------------------------------------------------------------------------
# The stage's chunk logic with constructed models: verdicts must catch a blind AR


D = 16


class FakeAV:
    """Writes a distinct explanation per vector; its loss uses the vector iff `reads`."""

    def __init__(self, reads: bool = True) -> None:
        self.reads = reads
        from conftest import tiny_tokenizer

        self.tokenizer = tiny_tokenizer()

    def generate(self, vectors, max_new_tokens, temperature):
        temps = temperature if isinstance(temperature, list) else [temperature] * len(vectors)
        return [
            f"- row {int(v[0] * 1000)}\n- value {int(v[1] * 1000)}"
            + ("" if t == 0 else f" s{torch.randint(0, 9, (1,)).item()}")
            for v, t in zip(vectors, temps, strict=True)
        ]

    def response_ids(self, text):
        return self.tokenizer(text)["input_ids"]

    def row_nll(self, texts, vectors):
        """Lower loss on row i's label given row i's vector (its index sits in v[3])."""
        n = torch.tensor([float(len(t.split()) + 1) for t in texts])
        rows = [int(m.group(1)) if (m := re.search(r"label (\d+)", t)) else -1 for t in texts]
        wrong = (vectors[:, 3].round() != torch.tensor(rows, dtype=torch.float32)).float()
        return n * (1.0 + (wrong if self.reads else 0.0)), n


class TableAR:
    """Oracle: the target of the row whose "row N" claim the text holds (the pool mean for
    the empty string, noise otherwise); `constant`: one vector whatever the text."""

    def __init__(self, lookup: dict[str, np.ndarray], constant: np.ndarray | None = None):
        self.lookup, self.constant = lookup, constant
        self.head = torch.nn.Linear(D, D)

    def encode(self, texts):
        return [t.split() for t in texts]

    def predict(self, texts):
        out = []
        for t in texts:
            key = re.search(r"row -?\d+", t)
            rng = np.random.default_rng(abs(hash(t)) % 2**32)
            if self.constant is not None:
                out.append(self.constant)
            elif not t:
                out.append(self.lookup[""])
            else:
                out.append(self.lookup.get(key.group(0) if key else t, rng.normal(size=D)))
        return torch.tensor(np.stack(out), dtype=torch.float32)


def constructed_rows(n: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    targets = (rng.normal(size=(n, D)) + 3.0).astype(np.float32)  # anisotropic: shared mean
    targets[:, 3] = np.arange(n)  # the row index, for FakeAV's loss
    return pd.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n)],
            "source_family": "test",
            "text": [f"document {i}" for i in range(n)],
            "label": [f"- label {i}\n- more" for i in range(n)],
            "target": list(targets),
        }
    )


def one_pair_chunk(rows, shuffled_BD, unrelated, av, ar, mu, cfg) -> pd.DataFrame:
    """evaluate_chunk on one pair, no judge or paraphraser, chunk 0."""
    models = Models({"av": av}, {"ar": ar})
    pairs = {S.PUBLISHED: ("av", "ar")}
    return S.evaluate_chunk(rows, shuffled_BD, unrelated, models, pairs, mu, cfg, 0, 0)[S.PUBLISHED]


def evaluate_constructed(ar_kind: str, reads: bool = True) -> dict:
    rows = constructed_rows()
    av = FakeAV(reads)
    targets = np.stack(rows["target"].to_list())
    mu = targets.mean(0)
    greedy = av.generate(torch.from_numpy(targets), 0, 0.0)
    if ar_kind == "oracle":
        keys = [re.search(r"row -?\d+", g).group(0) for g in greedy]
        ar = TableAR(dict(zip(keys, targets, strict=True)) | {"": mu})
    else:
        ar = TableAR({}, constant=mu + 1.0)
    params = replace(
        C.Params(), eval=C.EvalConfig(samples=3, paraphrases=0, judge_backend="none", n_boot=300)
    )
    vectors = torch.from_numpy(targets)
    part = one_pair_chunk(rows, shuffled(vectors), rows["text"].tolist(), av, ar, mu, params.eval)
    return score_constructed(part, targets, mu)


def with_baselines(part: pd.DataFrame, targets: np.ndarray, mu: np.ndarray):
    """The chunk's table with the baselines (a train pool of two families around the
    targets), validated, and its metadata."""
    rng = np.random.default_rng(7)
    train = np.concatenate([targets + rng.normal(scale=2.0, size=targets.shape)] * 2)
    fams = ["a"] * len(targets) + ["b"] * len(targets)
    cols, base_meta = B.baseline_columns(targets, train, fams, train[::3], mu)
    for column, values in cols.items():
        part[column] = values
    part = validate(part, eval_rows_schema(D), "constructed")
    meta = {
        "mu": mu.tolist(),
        "train_mean_nrm": E.normalized(train).mean(axis=0).tolist(),
        "seed": 0,
        "n_boot": 300,
        "baselines": base_meta,
    }
    return part, meta


def score_constructed(part: pd.DataFrame, targets: np.ndarray, mu: np.ndarray) -> dict:
    """Add the baselines and score."""
    return compute_metrics(*with_baselines(part, targets, mu))


def test_a_constant_ar_is_content_blind_and_at_chance():
    m = evaluate_constructed("constant")
    assert m["verdicts"]["content_blind"] is True
    assert m["predictors"]["empty"]["round_trip_minus"]["cos"]["mean"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert m["identity"]["raw"]["argmax_hits"] <= 1
    assert m["verdicts"]["identity_above_chance"] is False


def test_an_ar_that_outputs_the_mean_direction_is_flagged_as_not_beating_it():
    """The constant the default NLA loses to: an AR that always outputs the train mean ties
    the mean-direction predictor exactly, and a tie is not a win."""
    rows = constructed_rows()
    targets = np.stack(rows["target"].to_list())
    mu = targets.mean(0)
    rng = np.random.default_rng(7)
    train = np.concatenate([targets + rng.normal(scale=2.0, size=targets.shape)] * 2)
    ar = TableAR({}, constant=train.mean(0).astype(np.float32))
    params = replace(C.Params(), eval=C.EvalConfig(samples=2, paraphrases=0, judge_backend="none"))
    vectors = torch.from_numpy(targets)
    part = one_pair_chunk(
        rows,
        shuffled(vectors),
        rows["text"].tolist(),
        FakeAV(),
        ar,
        mu,
        params.eval,
    )
    m = score_constructed(part, targets, mu)
    lead = m["predictors"]["mean_direction"]["round_trip_minus"]
    assert lead["cos"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["verdicts"]["beats_mean_direction"] is False
    assert m["round_trip"]["cos_to_mean_direction"]["reconstruction"] == pytest.approx(1.0)
    bars = {b["key"]: b["met"] for b in R.bar_rows({"eval": m})}
    assert bars["round_trip_minus_mean_direction_cos"] == "NO"
    assert bars["round_trip_minus_mean_direction_fve_cen"] == "NO"
    assert "does not beat a constant" in " ".join(warnings_for("av", m))


def test_an_oracle_ar_is_not_flagged():
    m = evaluate_constructed("oracle")
    v = m["verdicts"]
    assert v["content_blind"] is False and v["identity_above_chance"] is True
    assert v["above_random_floor"] is True and v["template_collapse"] is False
    assert v["beats_mean_direction"] is True and v["beats_text_free_centroid"] is True
    bars = {b["key"]: b["met"] for b in R.bar_rows({"eval": m})}
    assert bars["round_trip_minus_centroid_fve_cen"] == "yes"
    # The oracle of the nearest train vector is scored, labelled, and not a bar.
    assert m["predictors"]["nearest_train"]["cos"]["n"] == 24
    assert "round_trip_minus_nearest_train_cos" not in bars
    assert m["round_trip"]["cos"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["identity"]["centred"]["argmax_accuracy"] == 1.0
    # Removing a claim the oracle keyed on makes the reconstruction worse.
    assert m["per_claim"]["delta_mse"]["mean"] > 0
    assert m["best_of_k"]["k_max"] == 3 and m["best_of_k"]["cos"][0]["k"] == 1


def test_an_av_that_ignores_the_vector_is_flagged():
    assert evaluate_constructed("oracle", reads=False)["verdicts"]["av_ignores_vector"] is True
    assert evaluate_constructed("oracle", reads=True)["verdicts"]["av_ignores_vector"] is False


def test_rows_schema_names_the_row_of_unequal_list_columns():
    rows = constructed_rows(4)
    ar = TableAR({}, constant=np.ones(D))
    params = replace(C.Params(), eval=C.EvalConfig(samples=2, paraphrases=0, judge_backend="none"))
    vectors = torch.from_numpy(np.stack(rows["target"].to_list()))
    part = one_pair_chunk(
        rows,
        vectors,
        rows["text"].tolist(),
        FakeAV(),
        ar,
        np.zeros(D),
        params.eval,
    )
    cols, _ = B.baseline_columns(
        np.stack(rows["target"].to_list()), np.ones((3, D)), ["a"] * 3, np.ones((3, D)), np.zeros(D)
    )
    for column, values in cols.items():
        part[column] = values
    validate(part, eval_rows_schema(D), "ok")
    part.at[2, "sample_cos"] = [0.1]
    part.at[1, "judge_validity"] = 7.0
    with pytest.raises(DataValidationError) as err:
        validate(part, eval_rows_schema(D), "data/eval/rows.parquet")
    text = str(err.value)
    assert "data/eval/rows.parquet" in text and "row(s) 2" in text
    assert "'judge_validity'" in text and "row(s) 1" in text


# ---------------------------------------------------------------------------------------------
# Judge and paraphraser


class CannedBackend(L.Backend):
    name, model, batch_size = "canned", "canned-1", 4

    def __init__(self, reply) -> None:
        self.reply, self.prompts = reply, []

    def complete(self, prompts, prefill, seed):
        self.prompts += prompts
        return [L.Completion(prefill + self.reply(p)) for p in prompts]


def test_judge_maps_a_b_back_to_av_or_label_whatever_the_order():
    rows = constructed_rows(12)
    av_texts = [f"AVTEXT {i}" for i in range(12)]

    def reply(prompt: str) -> str:
        if "Explanation A:" in prompt:  # always prefer the AV's explanation, wherever it is
            a_is_av = prompt.index("AVTEXT") < prompt.index("Explanation B:")
            return " A" if a_is_av else " B"
        return " 4\nSPECIFICITY: 2" if "AVTEXT" in prompt else " 5\nSPECIFICITY: 5"

    backend = CannedBackend(reply)
    got = J.judge(backend, rows, av_texts, seed=0, attempts=1)
    assert got["judge_preferred"] == ["av"] * 12
    assert got["judge_validity"] == [4.0] * 12 and got["judge_specificity"] == [2.0] * 12
    assert got["label_validity"] == [5.0] * 12
    pair_prompts = [p for p in backend.prompts if "Explanation A:" in p]
    firsts = [p.index("AVTEXT") < p.index("Explanation B:") for p in pair_prompts]
    assert 0 < sum(firsts) < 12  # the order was drawn per row


def test_unparseable_judge_answers_are_missing_not_invented():
    rows = constructed_rows(3)
    got = J.judge(CannedBackend(lambda p: " no idea"), rows, ["x"] * 3, seed=0, attempts=2)
    assert all(math.isnan(v) for v in got["judge_validity"])
    assert got["judge_preferred"] == [""] * 3
    assert J.parse_scores("VALIDITY: 3\nSPECIFICITY: 1") == J.JudgeScores(3.0, 1.0)
    assert J.parse_preference("PREFERRED: B").choice == "B"


class RewordingLocal(L.LocalBackend):
    """The local backend's paraphrase path without a model: rewrites each claim."""

    def __init__(self) -> None:
        self.batch_size, self.model = 8, "fake-local"

    def complete_scaffold(self, prompts, scaffold, fields, seed):
        return [L.Completion(f"reworded {f['claim']}") for f in fields]


def test_local_paraphrase_keeps_the_final_token_head():
    label = '<explanation>\n- a flood\n- final token: "rain", a noun\n</explanation>'
    (paras,) = J.paraphrase(RewordingLocal(), [label], n=2, seed=0, attempts=1)
    assert len(paras) == 2
    assert claims(paras[0]) == ["reworded a flood", 'final token: "rain", reworded a noun']


def test_local_judge_asks_each_scale_separately(tokenizer):
    from conftest import CHAT_TEMPLATE, tiny_llama

    tok = tokenizer
    tok.chat_template = CHAT_TEMPLATE
    backend = L.LocalBackend(tiny_llama(), tok, "tiny", L.BackendSettings(batch_size=4))
    got = J.judge(backend, constructed_rows(3), ["- a\n- b"] * 3, seed=0, attempts=1)
    assert all(1 <= v <= 5 for v in got["judge_validity"] + got["label_specificity"])
    assert set(got["judge_preferred"]) <= {"av", "label"}


# ---------------------------------------------------------------------------------------------
# The stage on tiny trained models


def eval_params(**kw) -> C.Params:
    base = sft_params()
    cfg = dict(
        split="val",
        pool_split="test",
        samples=3,
        paraphrases=1,
        max_new_tokens=12,
        batch_size=4,
        chunk_rows=2,
        n_boot=200,
    )
    return replace(base, rl=RL_SMALL, eval=C.EvalConfig(**(cfg | kw)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_inputs")
    build_inputs(root)
    cwd = Path.cwd()
    import os

    os.chdir(root)
    try:
        for stage in ("sft_av", "sft_ar", "rl"):
            assert run_stage(stage, eval_params()) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def repo(trained, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(trained, root)
    monkeypatch.chdir(root)
    return root


def test_eval_stage_writes_rows_metrics_and_plots_that_agree(repo):
    assert run_stage("eval", eval_params()) == 0
    rows, meta = read_eval_rows(C.EVAL_ROWS, 32)
    metrics = json.loads(C.EVAL_METRICS.read_text())
    # Every published number recomputes exactly from the per-row tables: the published
    # pair's, the SFT pair's and the held-out AR's, all on the same rows in the same order.
    paths = {
        S.PUBLISHED: C.EVAL_ROWS,
        S.SFT_PAIR: C.EVAL_DIR / "sft_rows.parquet",
        S.HELDOUT_AR: C.EVAL_DIR / "rl_heldout_ar_rows.parquet",
    }
    written = {name: read_eval_rows(path, 32) for name, path in paths.items()}
    assert S.eval_metrics(written) == metrics
    published = compute_metrics(rows, meta)
    assert {k: v for k, v in metrics.items() if k != "comparison"} == published | {
        "verdicts": published["verdicts"] | {"ar_collusion": metrics["verdicts"]["ar_collusion"]},
        "verdict_evidence": metrics["verdict_evidence"],
    }
    sft_rows, sft_meta = written[S.SFT_PAIR]
    held_rows, _ = written[S.HELDOUT_AR]
    assert metrics["comparison"]["pairs"]["sft"] == compute_metrics(sft_rows, sft_meta)
    assert sft_rows["doc_id"].tolist() == rows["doc_id"].tolist()
    # The held-out AR reads the RL AV's very outputs; the SFT pair has its own AV's.
    assert held_rows["explanation"].tolist() == rows["explanation"].tolist()
    assert meta["models"]["av"]["path"] == str(C.RL_AV_DIR)
    assert sft_meta["models"]["av"]["path"] == str(C.AV_DIR)
    assert written[S.HELDOUT_AR][1]["models"]["ar"]["path"] == str(C.AR_DIR)
    diff = metrics["comparison"]["rl_minus_sft"]["round_trip_cos"]
    assert diff["a"] == pytest.approx(metrics["round_trip"]["cos"]["mean"])
    assert diff["b"] == pytest.approx(
        metrics["comparison"]["pairs"]["sft"]["round_trip"]["cos"]["mean"]
    )
    assert diff["difference"]["mean"] == pytest.approx(diff["a"] - diff["b"])
    assert (C.EVAL_PLOTS / "rl_vs_sft.png").stat().st_size > 1000
    assert metrics["n"] == len(rows) >= 2
    assert metrics["judge"]["model"] == "tiny" and metrics["judge"]["n"] == len(rows)
    assert len(rows["samples"].iloc[0]) == 3
    assert metrics["vector_use"]["gap"] == pytest.approx(
        (rows["nll_shuffled"].sum() - rows["nll_true"].sum()) / rows["n_label_tokens"].sum()
    )
    assert meta["models"]["av"]["files_sha256"]["adapter_model.safetensors"]
    for name in PNG_NAMES:
        assert (C.EVAL_PLOTS / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert all((C.EVAL_PLOTS / f"{name}.csv").exists() for name in CSV_NAMES)
    k_curve = pd.read_csv(C.EVAL_PLOTS / "k_curve.csv")
    assert k_curve["k"].tolist() == [1, 2, 3]
    assert not (C.WORK_DIR / "eval").exists() or not any((C.WORK_DIR / "eval").iterdir())
    # eval.rows 0: every labeled row of the split, in a seeded random order.
    labels = pd.read_parquet(C.LABELS_PATH)
    split_ids = labels.loc[labels["split"] == "val", "doc_id"]
    assert sorted(rows["doc_id"]) == sorted(split_ids) and meta["split_rows"] == len(rows)
    assert metrics["sample"]["rule"] == "all rows"
    assert set(metrics["predictors"]) >= {"mean_direction", "centroid", "nearest_train", "replay"}
    # From the rows files alone: with every other input gone, the same numbers.
    alone = {name: repo.parent / f"alone_{name}.parquet" for name in paths}
    for name, path in paths.items():
        shutil.copyfile(path, alone[name])
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / "models")
    assert S.eval_metrics({n: read_eval_rows(p, 32) for n, p in alone.items()}) == metrics


def test_a_sample_of_the_split_is_seeded_and_drawn_from_it(repo):
    params = eval_params(rows=3, judge_backend="none", paraphrases=0, samples=0)
    inputs = S.eval_inputs(params.eval, 32, params.extract.layer)
    labels = pd.read_parquet(C.LABELS_PATH)
    split = labels[labels["split"] == "val"]
    assert len(inputs.rows) == 3 and inputs.split_rows == len(split)
    assert set(inputs.rows["doc_id"]) <= set(split["doc_id"])
    assert len(inputs.rows["doc_id"].unique()) == 3
    again = S.eval_inputs(params.eval, 32, params.extract.layer)
    assert again.rows["doc_id"].tolist() == inputs.rows["doc_id"].tolist()  # seeded


def test_interrupted_eval_resumes_without_redoing_chunks(repo, monkeypatch):
    params = eval_params(judge_backend="none", paraphrases=0)
    calls = []
    real = S.evaluate_chunk

    def crash_on_second(*args):
        calls.append(args[-1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(S, "evaluate_chunk", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_stage("eval", params)
    assert not C.EVAL_METRICS.exists()
    monkeypatch.setattr(S, "evaluate_chunk", lambda *a: calls.append(a[-1]) or real(*a))
    assert run_stage("eval", params) == 0
    assert calls[0] == 0 and 0 not in calls[2:]  # the finished chunk was kept
    resumed = C.EVAL_METRICS.read_text()
    C.EVAL_METRICS.unlink()
    monkeypatch.setattr(S, "evaluate_chunk", real)
    assert run_stage("eval", params) == 0
    assert C.EVAL_METRICS.read_text() == resumed  # same numbers as an uninterrupted run


def test_a_pair_given_by_path_is_evaluated_into_another_folder(repo):
    shutil.copytree(C.AV_DIR, repo / "release" / "av")
    shutil.copytree(C.AR_DIR, repo / "release" / "ar")
    shutil.rmtree(C.AV_DIR)
    params = eval_params(judge_backend="none", paraphrases=0, samples=0)
    Path("params.yaml").write_text(C.dump_params(params))
    from nla_repro.__main__ import main

    rc = main(["eval", "--av", "release/av", "--ar", "release/ar", "--out", "release/eval"])
    assert rc == 0
    metrics = json.loads((repo / "release/eval/eval.json").read_text())
    assert metrics["models"]["av"]["path"] == "release/av"
    assert metrics["best_of_k"]["k_max"] == 0 and metrics["judge"]["n"] == 0
    assert (repo / "release/eval/identity.png").exists() and not C.EVAL_METRICS.exists()


def test_a_pair_for_another_layer_is_refused(repo, capsys):
    params = eval_params()
    params = replace(params, extract=replace(params.extract, layer=1))
    assert run_stage("eval", params) == 2
    err = capsys.readouterr().err  # the activations are checked first: they are layer 2
    assert "activations.parquet: column 'layer' is [2] at row(s) 0, 1" in err
    assert "params extract.layer is 1" in err
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(C.ACTIVATIONS_PATH)
    at = table.schema.get_field_index("layer")
    ones = pa.array([1] * len(table), table.schema.field("layer").type)
    pq.write_table(table.set_column(at, table.schema.field("layer"), ones), C.ACTIVATIONS_PATH)
    assert run_stage("eval", params) == 2  # layer-1 vectors, but the pair was trained at 2
    assert "reads layer 2, but extract.layer is 1" in capsys.readouterr().err


def test_eval_params_are_validated():
    with pytest.raises(ConfigError, match="pool_split"):
        C.EvalConfig(split="val", pool_split="val").validate("eval")
    with pytest.raises(ConfigError, match="judge_model"):
        C.EvalConfig(judge_backend="openai").validate("eval")
    with pytest.raises(ConfigError, match="paraphrases need"):
        C.EvalConfig(judge_backend="none", paraphrases=2).validate("eval")


def test_chunks_of_other_params_are_not_reused(repo, monkeypatch):
    real = S.evaluate_chunk

    def crash_after_first(*args):
        if args[-1] == 1:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(S, "evaluate_chunk", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_stage("eval", eval_params(judge_backend="none", paraphrases=0, samples=3))
    assert any((C.WORK_DIR / "eval").rglob("chunk_000000.parquet"))
    monkeypatch.setattr(S, "evaluate_chunk", real)
    assert run_stage("eval", eval_params(judge_backend="none", paraphrases=0, samples=1)) == 0
    rows, _ = read_eval_rows(C.EVAL_ROWS, 32)
    assert rows["samples"].map(len).tolist() == [1] * len(rows)


@pytest.mark.parametrize(
    ("section", "change", "reused"),
    [
        ("eval", {"judge_max_new_tokens": 9}, False),  # an eval param: chunks discarded
        ("eval", {"judge_max_attempts": 2}, False),
        ("label", {"batch_size": 3, "max_attempts": 1}, True),  # not eval's: cannot reach it
    ],
)
def test_a_changed_eval_param_discards_saved_chunks_and_a_label_param_does_not(
    repo, monkeypatch, section, change, reused
):
    real = S.evaluate_chunk
    calls = []

    def crash_after_first(*args):
        calls.append(args[-1])
        if args[-1] == 1:
            raise KeyboardInterrupt
        return real(*args)

    params = eval_params(judge_rows=2, paraphrases=1)
    monkeypatch.setattr(S, "evaluate_chunk", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_stage("eval", params)
    changed = replace(params, **{section: replace(getattr(params, section), **change)})
    calls.clear()
    monkeypatch.setattr(S, "evaluate_chunk", lambda *a: calls.append(a[-1]) or real(*a))
    assert run_stage("eval", changed) == 0
    assert (0 not in calls) is reused, calls


def test_a_registry_metric_with_compute_lands_in_eval_json_and_the_report(monkeypatch):
    """The add-a-metric path: a function, one registry entry, nothing else."""
    from nla_repro.evaluation import registry as R
    from nla_repro.evaluation.report import eval_report

    median = R.Metric(
        "round_trip_fve_cen_median",
        "Round trip, centred, median",
        "eval",
        "round_trip.fve_cen_median",
        compute=lambda rows, meta: float(np.median(rows["fve_cen_greedy"])),
        shown=("report",),
    )
    monkeypatch.setattr(R, "METRICS", (*R.METRICS, median))
    monkeypatch.setitem(R.BY_KEY, median.key, median)
    m = evaluate_constructed("oracle")
    assert m["round_trip"]["fve_cen_median"] == pytest.approx(1.0, abs=1e-5)
    assert dict(eval_report(m))["Round trip, centred, median"] == "1.000"
    clash = R.Metric("clash", "clash", "eval", "round_trip.fve_nrm", compute=lambda r, m: 0.0)
    monkeypatch.setattr(R, "METRICS", (*R.METRICS, clash))
    with pytest.raises(ValueError, match="already computed by the eval suite"):
        evaluate_constructed("oracle")

"""`python -m nla_repro verify`: tiers, tolerances, the verdict, and the build record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import git

from nla_repro import build_record as B
from nla_repro import config as C
from nla_repro import reproducibility as R
from nla_repro.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PINNED = {
    "device": "cpu",
    "torch_threads": 1,
    "cpu_capability": "AVX512",
    "torch": "2.13.0+cpu",
    "outs": {},
}


@pytest.fixture
def published(tmp_path, monkeypatch) -> Path:
    """A checkout whose HEAD holds the repo's metrics files and a build record pinning one
    thread on this machine class; nothing rebuilt yet."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(ROOT / "dvc.lock", repo / "dvc.lock")
    for file in R.metric_files():
        (repo / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, repo / file)
    row = B.machine_row()
    stages = {
        s: {**PINNED, "cpu_capability": row["cpu_capability"], "torch": row["torch"]}
        for s in R.pipeline.stage_names()
    }
    (repo / B.BUILD_RECORD).write_text(json.dumps({"profile": "default", "stages": stages}))
    (repo / "params.yaml").write_text(C.dump_params(C.materialize_profile("default")))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "published")
    return repo


def rebuilt(stage: str, threads: int, device: str = "cpu") -> None:
    """A stage_times row as a rebuild of `stage` here would write it."""
    row = {**B.machine_row(), "torch_threads": threads, "device": device}
    C.STAGE_TIMES.parent.mkdir(parents=True, exist_ok=True)
    with C.STAGE_TIMES.open("a") as f:
        f.write(json.dumps({"stage": stage, "profile": "default", **row}) + "\n")


def nudge(file: str, path: list, by: float) -> None:
    data = json.loads(Path(file).read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] += by
    Path(file).write_text(json.dumps(data))


def test_an_untouched_checkout_reproduces_every_number_at_the_exact_tier(published):
    report = R.compare(C.load_params(), "HEAD")
    assert report.ok and report.tier == "exact"
    numbers = [leaf for leaf in report.leaves if leaf.delta is not None]
    assert len(numbers) > 3000 and all(leaf.delta == 0 for leaf in numbers)
    assert report.summary()["headline"] >= 20  # the model-index and calibration numbers


def test_exact_tier_fails_on_any_number_that_moved(published):
    rebuilt("sae", threads=1)  # as pinned: exact
    nudge("metrics/sae.json", ["training", "steps"], 0)  # unchanged: still fine
    nudge("metrics/sae.json", ["mse"], 1e-9)
    report = R.compare(C.load_params(), "HEAD")
    assert report.tiers["metrics/sae.json"][0] == "exact"
    assert not report.ok and [leaf.path for leaf in report.failures] == ["mse"]


def test_numerical_tier_allows_measured_variation_and_fails_a_headline_beyond_it(published):
    rebuilt("sae", threads=2)
    ev = json.loads(Path("metrics/sae.json").read_text())["explained_variance"]
    bound = R.tolerance_for("metrics/sae.json", "explained_variance").bound(ev)
    nudge("metrics/sae.json", ["explained_variance"], 0.5 * bound)
    params = C.load_params()
    report = R.compare(params, "HEAD")
    tier, reasons = report.tiers["metrics/sae.json"]
    assert tier == "numerical" and reasons == ["sae: torch_threads 2 (published: 1)"]
    assert report.ok and report.tier == "numerical"
    nudge("metrics/sae.json", ["explained_variance"], bound)  # 1.5x the bound in all
    report = R.compare(params, "HEAD")
    [failure] = report.failures
    assert (failure.path, failure.headline) == ("explained_variance", "Explained variance")
    table = R.render(report)
    assert "NOT REPRODUCED at the numerical tier" in table
    assert "Explained variance" in table and " NO" in table


def test_a_stage_upstream_sets_the_tier_of_the_files_after_it(published):
    rebuilt("extract", threads=2)  # sft, rl, sae and eval read its activations
    report = R.compare(C.load_params(), "HEAD")
    assert report.tiers["metrics/eval.json"][0] == "numerical"
    assert report.tiers["data/corpus_stats.json"][0] == "exact"  # corpus is upstream of extract


def test_gpu_tier_is_looser_and_judge_numbers_never_fail(published):
    rebuilt("eval", threads=1, device="cuda")
    nudge("metrics/eval.json", ["judge", "n"], 7)  # a judge number: reported only
    report = R.compare(C.load_params(), "HEAD")
    assert report.tiers["metrics/eval.json"][0] == "gpu"
    judge = [leaf for leaf in report.leaves if leaf.path == "judge.n"]
    assert judge[0].tier == "judge" and judge[0].reproduced and report.ok
    tol = R.tolerance_for("metrics/eval.json", "round_trip")
    leaf = next(x for x in report.leaves if x.headline and x.file == "metrics/eval.json")
    assert leaf.tolerance == pytest.approx(tol.bound(leaf.published) * R.GPU_FACTOR)


def test_an_output_hash_that_moved_fails_the_exact_tier_only(published):
    lock = Path("dvc.lock")
    sae_hash = B.lock_outs(lock.read_text())["sae"]["models/sae"]
    assert R.compare(C.load_params(), "HEAD").summary()["outputs_equal"] > 20
    lock.write_text(lock.read_text().replace(sae_hash, "0" * len(sae_hash)))
    report = R.compare(C.load_params(), "HEAD")
    assert [o.path for o in report.hash_failures] == ["models/sae"] and not report.ok
    assert "moved models/sae (exact)" in R.render(report)
    rebuilt("sae", threads=2)  # another thread count: other bytes are expected
    report = R.compare(C.load_params(), "HEAD")
    assert report.hash_failures == [] and report.ok and report.tier == "numerical"
    assert "moved models/sae (numerical)" in R.render(report)


def test_a_missing_metrics_file_is_not_reproduced(published):
    Path("metrics/rl.json").unlink()
    report = R.compare(C.load_params(), "HEAD")
    assert not report.ok and report.missing == ["metrics/rl.json"]
    assert "metrics/rl.json: MISSING" in R.render(report)


def test_the_cli_exits_1_on_a_miss_and_names_an_unknown_ref(published, capsys):
    assert main(["verify"]) == 0
    assert "REPRODUCED at the exact tier" in capsys.readouterr().out
    assert json.loads((C.WORK_DIR / "verify.json").read_text())["reproduced"] is True
    rebuilt("sae", threads=2)
    nudge("metrics/sae.json", ["l0"], 5)
    assert main(["verify"]) == 1
    assert main(["verify", "--release", "v9.9.99"]) == 2
    assert "no git tag v9.9.99" in capsys.readouterr().err


def test_stage_tier_names_every_difference():
    row = {**PINNED, "torch_threads": 2, "cpu_capability": "AVX2"}
    tier, reasons = B.stage_tier(row, PINNED)
    assert tier == "numerical"
    assert reasons == ["torch_threads 2 (published: 1)", "cpu_capability AVX2 (published: AVX512)"]
    assert B.stage_tier(None, PINNED) == ("exact", [])  # not rebuilt: the published bytes
    assert B.stage_tier(dict(PINNED), PINNED) == ("exact", [])
    assert B.stage_tier({**PINNED, "device": "cuda:0"}, PINNED)[0] == "gpu"
    intel = {**PINNED, "cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"}
    amd = {**intel, "cpu_model": "AMD EPYC 9B14"}  # the same AVX-512, other kernels
    assert B.stage_tier(amd, intel) == (
        "numerical",
        [f"cpu_model AMD EPYC 9B14 (published: {intel['cpu_model']})"],
    )


def test_a_library_release_that_writes_other_bytes_is_the_numerical_tier():
    pinned = {**PINNED, "transformers": "5.24.0", "pyarrow": "26.0.1"}
    row = {**pinned, "transformers": "5.25.0"}  # config.json records transformers_version
    assert B.stage_tier(row, pinned) == ("numerical", ["transformers 5.25.0 (published: 5.24.0)"])
    assert B.stage_tier(row, PINNED) == ("exact", [])  # a record without the key: not compared
    assert set(B.BYTE_LIBRARIES) <= set(B.machine_row())
    assert B.machine_row()["pyarrow"] is not None  # installed: every parquet footer names it


def test_pin_needs_every_stage_and_records_the_lock(published):
    params = C.load_params()
    rebuilt("base", threads=1)
    with pytest.raises(R.NlaError, match="no run of corpus, label"):
        B.pin(params)
    for stage in R.pipeline.stage_names():
        rebuilt(stage, threads=1)
    shutil.copy2(ROOT / "dvc.lock", "dvc.lock")
    record = B.pin(params)
    assert B.pinned_threads(record) == 1
    assert B.record_mismatches(record, Path("dvc.lock").read_text()) == []


def test_the_committed_build_record_matches_the_committed_lock():
    """metrics/build.json is what `verify` and `invoke repro --deterministic` trust; a re-pin
    of dvc.lock without it would make them describe another build."""
    record = B.read_record(path=ROOT / B.BUILD_RECORD)
    assert record, f"{B.BUILD_RECORD} missing: run `python -m nla_repro verify --pin`"
    assert B.record_mismatches(record, (ROOT / "dvc.lock").read_text()) == []
    assert B.pinned_threads(record) is not None  # one thread count for --deterministic


def test_every_tolerance_names_a_metrics_file_the_pipeline_writes():
    files = set(R.metric_files())
    assert {f for f, _ in R.TOLERANCES} == files
    assert all(t.abs >= 0 and t.rel >= 0 for t in R.TOLERANCES.values())


def test_the_docs_state_the_tolerances_the_code_uses():
    text = (ROOT / "docs/operations/reproducibility.md").read_text()
    for (file, prefix), tol in R.TOLERANCES.items():
        label = f"`{file}`" + (f" `{prefix}*`" if prefix else "")
        assert f"| {label} | {tol.abs:g} | {tol.rel:g} |" in text, label


def test_the_release_record_carries_the_tier_of_the_build(published):
    params = C.load_params()
    assert B.build_tier(params)["tier"] == "exact"  # nothing rebuilt here: the pinned bytes
    rebuilt("sft_av", threads=4)
    tier = B.build_tier(params)
    assert tier["tier"] == "numerical" and tier["stages_rebuilt_here"] == ["sft_av"]
    assert tier["reasons"] == ["sft_av: torch_threads 4 (published: 1)"]
    Path(B.BUILD_RECORD).unlink()
    assert B.build_tier(params)["tier"] == "unknown"

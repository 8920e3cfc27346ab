"""End to end: `dvc repro` of the smoke profile in a fresh temporary git + DVC repo."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import files_under, listed_files
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nla_repro import config as C
from nla_repro.__main__ import STAGES
from nla_repro.evaluation.suite import compute_metrics
from nla_repro.nla import load_ar
from nla_repro.plots import CSV_NAMES
from nla_repro.release.cards import KINDS
from nla_repro.sae import load_sae
from nla_repro.schemas import CORPUS, LABELS, activations_schema, read_parquet
from nla_repro.schemas import read_eval_rows as read_rows
from nla_repro.stages.eval import eval_metrics

ROOT = Path(__file__).resolve().parents[1]
REPO_FILES = [
    "dvc.yaml",
    "benchmarks/levers.json",  # deps of the card stage
    "benchmarks/rl_levers.json",
    ".dvcignore",
    ".gitignore",
    ".gitattributes",
    ".dvc/config",
    ".dvc/.gitignore",
    "src",
    "tasks.py",
]


def run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def verify_run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command whose exit code the test checks itself."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"} | (env or {})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def params_k(repo: Path) -> int:
    return yaml.safe_load((repo / "params.yaml").read_text())["sae"]["k"]


def copy_repo_files(repo: Path) -> None:
    """The project's pipeline files (REPO_FILES) into a new folder: a user's checkout, without
    build outputs. The fault drill (tests/fault_drill.py) builds its repos the same way."""
    repo.mkdir(parents=True)
    for name in REPO_FILES:
        src, dst = ROOT / name, repo / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_dvc_repro_smoke_profile_in_a_fresh_repo(tmp_path):
    repo = tmp_path / "repo"
    copy_repo_files(repo)
    run(["git", "init", "-q"], repo)
    run(["python", "-m", "nla_repro", "profile", "smoke"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)

    first = run(["dvc", "repro"], repo)
    ran = stages_run(first)
    assert ran[:2] == ["base", "corpus"] and sorted(ran) == sorted(STAGES)
    assert ran.index("rl") > max(ran.index("sft_av"), ran.index("sft_ar"))
    assert ran.index("eval") > ran.index("rl")
    corpus = read_parquet(repo / C.CORPUS_PATH, CORPUS)
    acts = read_parquet(repo / C.ACTIVATIONS_PATH, activations_schema(576))
    assert len(acts) == len(corpus) >= 20  # one last-token vector per document
    assert set(corpus["source_family"]) >= {*C.GENERATED_FAMILIES, "pydoc"}
    meta = yaml.safe_load((repo / C.ACTIVATIONS_META).read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["layer"], meta["d_model"], meta["n_layers"]) == (20, 576, 30)
    # The residual stream of this model has a large shared direction (mean norm ~238 at layer 20).
    assert 150 < meta["mean_norm"] < 350
    labels = read_parquet(repo / C.LABELS_PATH, LABELS)
    assert labels["doc_id"].tolist() == corpus["doc_id"].tolist()
    summary = json.loads((repo / C.LABEL_METRICS_PATH).read_text())
    assert summary["stopped_by"] == "complete" and summary["backend"] == "local"
    assert summary["accepted"] + summary["corrected"] + summary["rejected"] == len(corpus)
    assert (repo / C.LABEL_CHUNKS_DIR).is_dir()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for name, out in (("av", C.AV_DIR), ("ar", C.AR_DIR)):
        sidecar = yaml.safe_load((repo / out / "nla_meta.yaml").read_text())
        assert sidecar["step"] == 4 and sidecar["layer"] == 20
        assert sorted(p.name for p in (repo / out / "checkpoints").iterdir()) == [
            "step_2",
            "step_4",
        ]
        assert json.loads((repo / C.SFT_METRICS[name]).read_text())["released_step"] == 4
    assert (repo / C.AV_DIR / "adapter_model.safetensors").exists()
    assert (repo / C.AR_DIR / "head.safetensors").exists()
    # Validation ran from step 0 on, with the vector-use gap, and `dvc plots` reads the curves.
    av_val = pd.read_csv(repo / C.AV_DIR / "val_curve.csv")
    assert av_val["step"].tolist() == [0, 2, 4] and av_val["vector_use_gap"].notna().all()
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo))["data"]
    for name in ("av/train_curve", "av/val_curve", "ar/train_curve", "ar/val_curve"):
        assert plots[f"models/{name}.csv"], name
    # Eval: every number recomputes from the rows table; the verdicts are there; plots too.
    rows, meta = read_rows(repo / C.EVAL_ROWS, 576)
    metrics = json.loads((repo / C.EVAL_METRICS).read_text())
    written = {
        name: read_rows(repo / C.EVAL_DIR / f"{name}_rows.parquet", 576)
        for name in ("sft", "rl_heldout_ar")
    } | {"published": (rows, meta)}
    assert eval_metrics(written) == metrics and metrics["n"] == len(rows) >= 2
    assert compute_metrics(rows, meta)["round_trip"] == metrics["round_trip"]
    assert set(metrics["comparison"]["pairs"]) == {"sft", "rl_heldout_ar"}
    assert isinstance(metrics["verdicts"]["ar_collusion"], bool)
    rl = json.loads((repo / C.RL_METRICS).read_text())
    assert rl["released_step"] == 2 and rl["rollouts"] == 2 * 2 * 2
    assert plots["models/rl/train_curve.csv"] and plots["plots/eval/rl_vs_sft.csv"]
    assert set(metrics["verdicts"]) >= {"content_blind", "av_ignores_vector", "template_collapse"}
    assert metrics["judge"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in CSV_NAMES:
        assert plots[f"plots/eval/{name}.csv"], name
    assert plots["plots/eval/identity.png"]
    # SAE: held-out metrics, SAELens-layout folder, curves for dvc plots.
    sae = json.loads((repo / C.SAE_METRICS).read_text())
    assert 0 < sae["l0"] <= params_k(repo) and sae["n_tokens"] > 0
    assert sae["loss_recovered"]["zero_ablation"] > sae["loss_recovered"]["clean"]
    sae_cfg = json.loads((repo / C.SAE_DIR / "cfg.json").read_text())
    assert sae_cfg["metadata"]["hook_name"] == "blocks.20.hook_resid_post"
    assert plots["models/sae/train_curve.csv"] and plots["plots/sae/density.csv"]
    # Cards: the last stage; their model-index is the metrics just measured.
    assert ran[-1] == "card"
    av_card = ModelCard.load(repo / C.CARDS_DIR / "av/README.md")
    # The published pair is the RL pair, shown beside the SFT pair and under the held-out AR.
    assert "### SFT → RL" in av_card.text and "under the held-out SFT AR" in av_card.text
    assert "## SFT → RL" in (repo / C.CALIBRATION_PATH).read_text()
    published = {r.metric_type: r.metric_value for r in av_card.data.eval_results}
    assert published["vector_use_gap"] == metrics["vector_use"]["gap"]
    sae_card = ModelCard.load(repo / C.CARDS_DIR / "sae/README.md")
    assert {r.metric_type: r.metric_value for r in sae_card.data.eval_results}["l0"] == sae["l0"]
    assert "first release" in (repo / C.CALIBRATION_PATH).read_text()

    second = run(["dvc", "repro"], repo)
    assert stages_run(second) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract"]["layer"] = 12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = pd.read_parquet(repo / C.CORPUS_PATH)
    third = run(["dvc", "repro"], repo)
    assert sorted(stages_run(third)) == [
        "card",
        "eval",
        "extract",
        "rl",
        "sae",
        "sft_ar",
        "sft_av",
    ]
    sae_cfg = json.loads((repo / C.SAE_DIR / "cfg.json").read_text())
    assert sae_cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
    assert yaml.safe_load((repo / C.ACTIVATIONS_META).read_text())["layer"] == 12
    # The persisted checkpoints of layer 20 were discarded, not resumed.
    ar_meta = yaml.safe_load((repo / C.AR_DIR / "checkpoints/step_2/nla_meta.yaml").read_text())
    assert (ar_meta["layer"], ar_meta["ar_num_layers"]) == (12, 13)
    assert pd.read_parquet(repo / C.CORPUS_PATH).equals(before)
    assert run(["dvc", "status"], repo).strip().endswith("Data and pipelines are up to date.")

    # Remote round trip: push from this clone, fresh `git clone` elsewhere, pull: clean status
    # and nothing to reproduce.
    remote = tmp_path / "remote"
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm"]
    run(["git", "add", "-A"], repo)
    run([*commit, "layer 12"], repo)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], repo)
    pushed = run(["invoke", "push"], repo)
    assert re.search(r"dvc push: \d+ files pushed \(default remote\)", pushed), pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], clone)
    assert "dvc pull: " in run(["invoke", "pull"], clone)
    assert run(["dvc", "status"], clone).strip().endswith("Data and pipelines are up to date.")
    assert stages_run(run(["dvc", "repro"], clone)) == []
    assert (clone / C.SAE_DIR / "sae_weights.safetensors").read_bytes() == (
        repo / C.SAE_DIR / "sae_weights.safetensors"
    ).read_bytes()

    # Release dry run of the committed pipeline: the plan lists exactly what is staged.
    planned = run(["python", "-m", "nla_repro", "release", "--version", "v0.0.01"], repo)
    dist = repo / C.DIST_DIR / "v0.0.01"
    listed = listed_files(planned)
    assert sorted(listed) == sorted(f"nla-repro/nla-smollm2-135m-instruct-l12-{k}" for k in KINDS)
    for repo_id, files in listed.items():
        assert files == files_under(dist / repo_id.rsplit("-", 1)[1]), repo_id
    # The released folders load back: PEFT on the AV folder, the AR with its head, the SAE.
    base = AutoModelForCausalLM.from_pretrained(repo / C.BASE_DIR)
    peft_av = PeftModel.from_pretrained(base, dist / "av")
    assert peft_av.peft_config["default"].r == 4
    ar = load_ar(dist / "ar", repo / C.BASE_DIR)
    assert ar.predict(["<explanation>a test</explanation>"]).shape == (1, 576)
    head = load_file(repo / C.RL_AR_DIR / "head.safetensors")  # the published pair: after RL
    assert all(torch.equal(ar.head.state_dict()[k], v) for k, v in head.items())
    sae_model, sae_cfg = load_sae(dist / "sae")
    assert sae_cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
    assert torch.equal(sae_model.W_dec, load_sae(repo / C.SAE_DIR)[0].W_dec)
    # ... and the eval stage evaluates them by path to the pipeline's own numbers.
    out = tmp_path / "released_eval"
    evaluate = ["python", "-m", "nla_repro", "eval", "--av", str(dist / "av"), "--ar"]
    run([*evaluate, str(dist / "ar"), "--out", str(out)], repo)
    released = json.loads((out / "eval.json").read_text())
    pipeline = json.loads((repo / C.EVAL_METRICS).read_text())
    assert released["models"]["av"]["path"] == str(dist / "av")
    for key in ("round_trip", "vector_use", "predictors", "per_family", "diversity"):
        assert released[key] == pipeline[key], key
    assert run(["git", "status", "--porcelain"], repo) == ""

    # A queued sweep: two SAE widths of k run as DVC experiments; only the sae stage reruns.
    for k in (2, 4):
        run(["dvc", "exp", "run", "--queue", "-S", f"sae.k={k}"], repo)
    run(["dvc", "queue", "start", "-j", "1"], repo)
    deadline = time.time() + 600
    while re.search(r"Queued|Running", run(["dvc", "queue", "status"], repo)):
        assert time.time() < deadline, run(["dvc", "queue", "status"], repo)
        time.sleep(2)
    run(["dvc", "queue", "stop"], repo)
    status = run(["dvc", "queue", "status"], repo)
    assert status.count("Success") == 2, status
    exps = json.loads(run(["dvc", "exp", "show", "--json"], repo))
    results = {
        rev["data"]["params"]["params.yaml"]["data"]["sae"]["k"]: rev["data"]["metrics"][
            "metrics/sae.json"
        ]["data"]
        for commit_ in exps
        for exp in commit_.get("experiments") or []
        for rev in exp["revs"]
    }
    assert sorted(results) == [2, 4]
    assert all(0 < m["l0"] <= k for k, m in results.items())

    # verify: pin this build as the published one; the same checkout reproduces it exactly,
    # a rerun on another thread count within tolerance, a tampered headline number does not.
    run(["python", "-m", "nla_repro", "verify", "--pin"], repo)
    run(["git", "add", "metrics/build.json"], repo)
    run([*commit, "pin the build"], repo)
    exact = run(["python", "-m", "nla_repro", "verify"], repo)
    assert "verdict: REPRODUCED at the exact tier" in exact, exact
    pinned = json.loads((repo / "metrics/build.json").read_text())["stages"]["sae"]
    other = "1" if pinned["torch_threads"] != 1 else "2"
    threads = {"OMP_NUM_THREADS": other, "MKL_NUM_THREADS": other}
    rerun = verify_run(["dvc", "repro", "--force", "--single-item", "sae"], repo, threads)
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and "sae: tier: numerical (sae: torch_threads" in said, said
    numerical = verify_run(["python", "-m", "nla_repro", "verify"], repo)
    assert numerical.returncode == 0, numerical.stdout + numerical.stderr
    assert "REPRODUCED at the numerical tier" in numerical.stdout
    sae_metrics = json.loads((repo / C.SAE_METRICS).read_text())
    sae_metrics["explained_variance"] += 0.5
    (repo / C.SAE_METRICS).write_text(json.dumps(sae_metrics))
    tampered = verify_run(["python", "-m", "nla_repro", "verify"], repo)
    assert tampered.returncode == 1 and "NOT REPRODUCED" in tampered.stdout
    assert re.search(r"Explained variance .* NO", tampered.stdout), tampered.stdout
    # DVC deleted it before a rerun that failed: `restore` brings back the last good copy.
    (repo / C.SAE_METRICS).unlink()
    restored = run(["python", "-m", "nla_repro", "restore", "sae"], repo)
    assert f"restored {C.SAE_METRICS} from .nla_work/last_good" in restored
    assert verify_run(["python", "-m", "nla_repro", "verify"], repo).returncode == 0

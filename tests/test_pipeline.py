"""End to end: `dvc repro` of the smoke profile in a fresh temporary git + DVC repo."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nla_repro import config as C
from nla_repro.schemas import CORPUS, LABELS, activations_schema, read_parquet

ROOT = Path(__file__).resolve().parents[1]
REPO_FILES = ["dvc.yaml", ".dvcignore", ".gitignore", ".gitattributes", ".dvc/config", "src"]


def run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_dvc_repro_smoke_profile_in_a_fresh_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in REPO_FILES:
        src, dst = ROOT / name, repo / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    run(["git", "init", "-q"], repo)
    run(["python", "-m", "nla_repro", "profile", "smoke"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)

    first = run(["dvc", "repro"], repo)
    ran = stages_run(first)
    assert ran[:2] == ["base", "corpus"] and sorted(ran[2:]) == ["extract", "label"]
    corpus = read_parquet(repo / C.CORPUS_PATH, CORPUS)
    acts = read_parquet(repo / C.ACTIVATIONS_PATH, activations_schema(576))
    assert len(acts) == len(corpus) >= 20  # one last-token vector per document
    assert set(corpus["source_family"]) >= {*C.GENERATED_FAMILIES, "pydoc"}
    meta = yaml.safe_load((repo / C.ACTIVATIONS_META).read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["layer"], meta["d_model"], meta["n_layers"]) == (20, 576, 30)
    # The residual stream of this model has a large shared direction (DESIGN.md: norm ~238).
    assert 150 < meta["mean_norm"] < 350
    labels = read_parquet(repo / C.LABELS_PATH, LABELS)
    assert len(labels) == 16 and labels["doc_id"].isin(corpus["doc_id"]).all()  # max_rows
    summary = json.loads((repo / C.LABEL_METRICS_PATH).read_text())
    assert summary["stopped_by"] == "max_rows" and summary["backend"] == "local"
    assert summary["accepted"] + summary["corrected"] + summary["rejected"] == 16
    assert (repo / C.LABEL_CHUNKS_DIR).is_dir()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"base", "corpus", "label", "extract"}

    second = run(["dvc", "repro"], repo)
    assert stages_run(second) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract"]["layer"] = 12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = pd.read_parquet(repo / C.CORPUS_PATH)
    third = run(["dvc", "repro"], repo)
    assert stages_run(third) == ["extract"]
    assert yaml.safe_load((repo / C.ACTIVATIONS_META).read_text())["layer"] == 12
    assert pd.read_parquet(repo / C.CORPUS_PATH).equals(before)
    assert run(["dvc", "status"], repo).strip().endswith("Data and pipelines are up to date.")

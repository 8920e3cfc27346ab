"""tests/fault_drill.py's comparison and stage graph on constructed repos (the drill itself
kills real `dvc repro` runs and takes most of an hour: run it by hand, see its docstring)."""

from __future__ import annotations

import json

import fault_drill as drill
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file


def make_repo(root, files: dict[str, object]):
    """A repo with a dvc.lock naming each top-level output once, and the files under it."""
    outs: dict[str, list[str]] = {}
    for path, content in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, pa.Table):
            pq.write_table(content, full)
        elif isinstance(content, dict) and path.endswith(".safetensors"):
            save_file(content, full)
        elif isinstance(content, dict):
            full.write_text(json.dumps(content))
        else:
            full.write_text(content)
        stage, out = path.split("/")[0], "/".join(path.split("/")[:2])
        outs.setdefault(stage, [])
        if out not in outs[stage]:
            outs[stage].append(out)
    lock = {
        "schema": "2.0",
        "stages": {s: {"outs": [{"path": o} for o in paths]} for s, paths in outs.items()},
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root


def rows(doc_ids: list[str], latency: list[float] | None = None) -> pa.Table:
    cols = {"doc_id": doc_ids, "explanation": [f"about {d}" for d in doc_ids]}
    return pa.table(cols | ({"latency_s": latency} if latency else {}))


def checks_by_path(ref, other, strict: bool = False) -> dict[str, drill.FileCheck]:
    return {c.path: c for c in drill.compare_repos(ref, other, strict)}


def test_identical_repos_pass_and_every_lock_output_file_is_compared(tmp_path):
    files = {
        "data/labels.parquet": rows(["a", "b", "c"]),
        "data/meta.yaml": "n_rows: 3\n",
        "models/av/adapter.safetensors": {"w": torch.ones(2, 2)},
        "models/av/checkpoints/step_2/history.json": {"train": [{"step": 1, "loss": 2.0}]},
    }
    ref = make_repo(tmp_path / "ref", files)
    other = make_repo(tmp_path / "other", files)
    checks = checks_by_path(ref, other)
    assert set(checks) == set(files)
    assert all(c.ok and c.how == "identical" for c in checks.values())


def test_lost_extra_duplicated_and_changed_files_are_mismatches(tmp_path):
    ref = make_repo(
        tmp_path / "ref",
        {
            "data/labels.parquet": rows(["a", "b", "c"]),
            "models/av/checkpoints/step_2/history.json": {"loss": 2.0},
            "models/av/checkpoints/step_4/history.json": {"loss": 1.5},
            "models/av/adapter.safetensors": {"w": torch.ones(2, 2)},
            "metrics/sft.json": {"val": 0.5},
        },
    )
    other = make_repo(
        tmp_path / "other",
        {
            "data/labels.parquet": rows(["a", "b", "b"]),  # a chunk done twice, one lost
            "models/av/checkpoints/step_2/history.json": {"loss": 2.0},
            "models/av/checkpoints/step_6/history.json": {"loss": 1.0},
            "models/av/adapter.safetensors": {"w": torch.zeros(2, 2)},
            "metrics/sft.json": {"val": 0.25},
        },
    )
    checks = checks_by_path(ref, other)
    assert "duplicated doc_id" in checks["data/labels.parquet"].detail
    assert checks["models/av/checkpoints/step_4/history.json"].how == "lost"
    assert checks["models/av/checkpoints/step_6/history.json"].how == "extra"
    assert checks["models/av/adapter.safetensors"].detail == "tensors differ: ['w']"
    assert checks["metrics/sft.json"].detail == "differs at val"
    assert checks["models/av/checkpoints/step_2/history.json"].ok
    assert sum(not c.ok for c in checks.values()) == 5


def test_only_the_label_latency_is_compared_after_removal(tmp_path):
    ref = make_repo(tmp_path / "ref", {"data/label_chunks/c0.parquet": rows(["a"], [1.25])})
    other = make_repo(tmp_path / "other", {"data/label_chunks/c0.parquet": rows(["a"], [3.5])})
    check = checks_by_path(ref, other)["data/label_chunks/c0.parquet"]
    assert check.ok and check.how == "equal without timing keys" and "latency_s" in check.detail
    assert not checks_by_path(ref, other, strict=True)["data/label_chunks/c0.parquet"].ok
    # Any other column, or the same values in other bytes, is a mismatch: DVC hashes bytes.
    changed = make_repo(tmp_path / "changed", {"data/label_chunks/c0.parquet": rows(["z"], [1.25])})
    assert not checks_by_path(ref, changed)["data/label_chunks/c0.parquet"].ok
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"x": 1, "y": 2}')
    b.write_text('{"y": 2, "x": 1}')
    assert drill.compare_file(a, b, drill.TIMING_KEYS) == (
        "mismatch",
        "equal values, different bytes",
    )


def test_torch_state_with_equal_values_in_other_bytes_is_still_a_mismatch(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"step": 3, "m": torch.ones(3)}, a)
    torch.save({"m": torch.ones(3), "step": 3}, b)
    assert a.read_bytes() != b.read_bytes()
    assert drill.compare_file(a, b, drill.TIMING_KEYS) == (
        "mismatch",
        "loaded values equal, bytes differ",
    )


def test_stage_graph_parents_follow_outputs_into_folders(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "extract": {"deps": ["src/x.py"], "outs": ["data/acts.parquet"]},
                    "sft_av": {
                        "deps": ["data/acts.parquet"],
                        "outs": [{"models/av": {"persist": True}}],
                        "metrics": [{"metrics/av.json": {"cache": False}}],
                    },
                    "eval": {"deps": ["models/av/adapter.safetensors", "data/acts.parquet"]},
                }
            }
        )
    )
    graph = drill.stage_graph(tmp_path)
    assert graph["sft_av"]["outs"] == ["models/av", "metrics/av.json"]
    assert drill.parents(graph, "eval") == ["extract", "sft_av"]
    assert drill.parents(graph, "extract") == []


@pytest.mark.parametrize("torn", [True, False])
def test_stage_times_skip_a_line_torn_by_a_kill(tmp_path, torn):
    path = tmp_path / drill.STAGE_TIMES
    path.parent.mkdir(parents=True)
    lines = [json.dumps({"stage": "corpus", "wall_s": 3.0})]
    path.write_text("\n".join(lines + (['{"stage": "lab'] if torn else [])) + "\n")
    assert [r["stage"] for r in drill.stage_times(tmp_path)] == ["corpus"]

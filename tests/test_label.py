"""Label stage with the offline local backend, the explanation format, and restart safety."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import save_model_dir, slow_stage_script, tiny_llama, write_corpus

from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.io import sha256_file
from nla_repro.schemas import LABELS, read_parquet
from nla_repro.stages import label
from nla_repro.templates import (
    format_explanation,
    load_template,
    parse_explanation,
    parse_verdict,
)

GOOD = "<explanation>\n- a news report\n- names a town\n- final token: a comma\n</explanation>"


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (GOOD, ""),
        ("I think:\n" + GOOD + "\nthanks", ""),
        (GOOD.replace("</explanation>", ""), "missing closing </explanation> tag"),
        (GOOD.replace("<explanation>", ""), "missing <explanation> tag"),
        ("<explanation>\n- final token: x\n</explanation>", "fewer than 2 features (1)"),
        (GOOD.replace("- a news", "- a\n- b\n- a news"), "more than 3 features (5)"),
        (GOOD.replace("final token: a comma", "a comma"), "not about the final token"),
    ],
)
def test_parse_explanation_is_strict_and_says_why(response, error):
    parsed = parse_explanation(response)
    if error:
        assert error in parsed.error and not parsed.ok and parsed.text == ""
    else:
        assert parsed.ok
        assert parsed.features == ("a news report", "names a town", "final token: a comma")
        assert parse_explanation(parsed.text).features == parsed.features  # round trip


def test_parse_verdict_reads_accept_reject_and_corrections():
    assert parse_verdict("VERDICT: accept").verdict == "accept"
    rejected = parse_verdict("VERDICT: Reject\nREASON: the text is about cats")
    assert (rejected.verdict, rejected.reason) == ("reject", "the text is about cats")
    fixed = parse_verdict("VERDICT: corrected\n" + GOOD)
    assert fixed.verdict == "corrected" and fixed.corrected.features[0] == "a news report"
    assert "corrected explanation unusable" in parse_verdict("VERDICT: corrected\nnope").error
    assert parse_verdict("looks fine to me").error.startswith("no VERDICT")


def test_templates_are_versioned_with_their_sha256():
    t = load_template("labeler.v1")
    assert t.version == "labeler.v1" and len(t.sha256) == 64
    assert "{text}" in t.prompt and "{final_token}" in t.prompt
    rendered = t.render(text="Rain fell.", final_token=".")
    assert "Rain fell." in rendered and '"."' in rendered
    assert t.render(local=True, text="Rain fell.", final_token=".") != rendered
    assert load_template("auditor.v1").sha256 != t.sha256
    assert format_explanation(["a", "final token: b"]).count("\n- ") == 2


def setup_label_repo(root: Path, texts: list[str] | None = None) -> None:
    save_model_dir(tiny_llama(n_layers=2), root / C.BASE_DIR)
    write_corpus(root, *([texts] if texts else []))


def label_params(**overrides) -> C.Params:
    cfg = replace(
        C.LabelConfig(
            mode="two-pass", max_new_tokens=8, batch_size=4, chunk_size=3, max_attempts=2
        ),
        **overrides,
    )
    extract = replace(C.ExtractConfig(), max_length=16)
    return replace(
        C.Params(), label=cfg, extract=extract, base=replace(C.BaseConfig(), device="cpu")
    )


def test_local_backend_labels_the_corpus_offline(in_tmp):
    setup_label_repo(in_tmp)
    summary = label.run(label_params())
    labels = read_parquet(C.LABELS_PATH, LABELS)
    corpus = pd.read_parquet(C.CORPUS_PATH)
    assert labels["doc_id"].tolist() == corpus["doc_id"].tolist()  # every row once, in order
    assert summary["n_rows"] == len(corpus)
    assert summary["accepted"] + summary["corrected"] + summary["rejected"] == len(corpus)
    timing = summary.pop("timing")  # for stage_times.jsonl, not for the metrics file
    assert json.loads(C.LABEL_METRICS_PATH.read_text()) == summary
    assert timing["llm_latency_s_total"] > 0 and "latency_s" not in labels.columns
    for row in labels.itertuples():
        if row.status == "accepted":
            assert parse_explanation(row.explanation).ok and row.verdict == "accept"
        else:
            assert row.explanation == "" and row.reason
    assert set(labels["labeler_prompt_sha256"]) == {load_template("labeler.v1").sha256}
    assert set(labels["backend"]) == {"local"} and set(labels["labeler_model"]) == {"tiny"}
    assert (labels["input_tokens"] > 0).all() and (labels["attempts"] >= 1).all()
    # The labeler saw the text as the extractor does: cut at extract.max_length tokens.
    assert all(
        len(t) < len(c) for t, c in zip(labels["text"], corpus["text"], strict=True) if len(c) > 80
    )


def test_source_text_mode_targets_the_text_itself(in_tmp):
    setup_label_repo(in_tmp)
    summary = label.run(label_params(mode="source_text"))
    labels = pd.read_parquet(C.LABELS_PATH)
    assert (labels["explanation"] == labels["text"]).all()
    assert summary["accepted"] == len(labels) and set(labels["labeler_model"]) == {"none"}


def test_single_pass_mode_skips_the_auditor(in_tmp):
    setup_label_repo(in_tmp)
    label.run(label_params(mode="single-pass"))
    labels = pd.read_parquet(C.LABELS_PATH)
    assert set(labels["verdict"]) == {"none"} and set(labels["auditor_model"]) == {"none"}
    assert set(labels["status"]) <= {"accepted", "rejected"}


def test_max_rows_budget_stops_cleanly(in_tmp):
    setup_label_repo(in_tmp)
    summary = label.run(label_params(mode="source_text", max_rows=3))
    assert summary["n_rows"] == 3 and summary["stopped_by"] == "max_rows"
    assert summary["n_selected"] == len(pd.read_parquet(C.CORPUS_PATH))


SLOW_LABEL = slow_stage_script("label", pause_s=0.5)

MANY = [
    f"Document {i} is about {w} and what happened next." for i, w in enumerate("abcdefghijklmnop")
]


@pytest.mark.slow
def test_kill_9_mid_label_then_rerun_labels_every_row_once(tmp_path, monkeypatch):
    setup_label_repo(tmp_path, MANY)
    (tmp_path / "params.yaml").write_text(C.dump_params(label_params(chunk_size=2)))
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_LABEL], cwd=tmp_path, env=os.environ | {"PYTHONPATH": ""}
    )
    chunk_glob = f"{C.LABEL_CHUNKS_DIR}/*/chunk_*.parquet"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob(chunk_glob))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(tmp_path.glob(chunk_glob))
    assert 3 <= len(finished) < len(MANY) // 2, "the kill should land mid-stage"
    assert not (tmp_path / C.LABELS_PATH).exists()
    before = {p.name: p.read_bytes() for p in finished}

    monkeypatch.chdir(tmp_path)
    asked = []
    real = label.label_rows
    monkeypatch.setattr(
        label, "label_rows", lambda rows, *a, **k: asked.append(len(rows)) or real(rows, *a, **k)
    )
    assert main(["label"]) == 0
    assert sum(asked) == len(MANY) - 2 * len(finished)  # finished chunks were not relabeled
    for p in finished:
        assert p.read_bytes() == before[p.name]
    labels = pq.read_table(tmp_path / C.LABELS_PATH).to_pandas()
    corpus = pd.read_parquet(tmp_path / C.CORPUS_PATH)
    assert labels["doc_id"].tolist() == corpus["doc_id"].tolist()


def test_raising_max_rows_reuses_whole_chunks_and_labels_the_rest(in_tmp, monkeypatch):
    setup_label_repo(in_tmp)
    first = label.run(label_params(mode="source_text", max_rows=4, chunk_size=3))
    assert first["n_rows"] == 4  # chunks of 3 cover rows 0..5; the output is trimmed
    asked = []
    real = label.label_rows
    monkeypatch.setattr(
        label, "label_rows", lambda rows, *a, **k: asked.append(len(rows)) or real(rows, *a, **k)
    )
    second = label.run(label_params(mode="source_text", max_rows=7, chunk_size=3))
    labels = pd.read_parquet(C.LABELS_PATH)
    corpus = pd.read_parquet(C.CORPUS_PATH)
    assert labels["doc_id"].tolist() == corpus["doc_id"].tolist()[:7]
    assert second["n_rows"] == 7 and asked == [2]  # only the third chunk (rows 6..7) is new


def test_local_labels_are_byte_identical_when_rebuilt_from_scratch(in_tmp):
    # Sampling is seeded per chunk and no clock reading reaches labels.parquet or the label
    # metrics, so DVC's hash of a rebuild equals the committed one.
    setup_label_repo(in_tmp)
    label.run(label_params())
    first = (sha256_file(C.LABELS_PATH), C.LABEL_METRICS_PATH.read_bytes())
    shutil.rmtree(C.LABEL_CHUNKS_DIR)
    C.LABELS_PATH.unlink()
    label.run(label_params())
    assert (sha256_file(C.LABELS_PATH), C.LABEL_METRICS_PATH.read_bytes()) == first

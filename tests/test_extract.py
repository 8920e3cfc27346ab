import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import (
    SAMPLE_TEXTS,
    TINY_MODELS,
    save_model_dir,
    slow_stage_script,
    tiny_llama,
    write_corpus,
)

from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.errors import DataValidationError
from nla_repro.io import vectors_from_table, vectors_to_arrow
from nla_repro.models import adapt, pad_batch, residual_at_layer, tokenize
from nla_repro.schemas import activations_schema, read_parquet
from nla_repro.stages import extract

ATOL = 1e-4


def reference_hidden(model, tokenizer, text: str, layer: int, max_length: int) -> torch.Tensor:
    """HF's own hidden_states[layer + 1] for one unpadded text: (T, d)."""
    ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_residual_at_layer_equals_hf_hidden_states(tiny_model, tokenizer, side):
    texts = SAMPLE_TEXTS[:5]
    tokens = tokenize(tokenizer, texts, 64)
    ids, mask, offsets, _ = pad_batch(tokens, tokenizer.pad_token_id, side)
    assert len({len(t) for t in tokens}) > 1  # the batch really is padded
    for layer in (0, 1, 2):
        hidden = residual_at_layer(tiny_model, ids, mask, layer)
        for row, text in enumerate(texts):
            ref = reference_hidden(tiny_model, tokenizer, text, layer, 64)
            got = hidden[row, offsets[row] : offsets[row] + len(tokens[row])]
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
            # The convention is hidden_states[L + 1], not [L]: an off-by-one must not pass.
            wrong = reference_hidden(tiny_model, tokenizer, text, layer - 1, 64) if layer else None
            if wrong is not None:
                assert (got - wrong).abs().max() > 10 * ATOL


def test_last_layer_is_the_block_output_before_the_final_norm(tiny_model, tokenizer):
    # HF's last hidden_states entry is the final-normed output; block L's output is not.
    arch = adapt(tiny_model)
    ids = torch.tensor([tokenize(tokenizer, SAMPLE_TEXTS[:1], 64)[0]])
    hidden = residual_at_layer(tiny_model, ids, torch.ones_like(ids), arch.n_layers - 1)
    ref = reference_hidden(tiny_model, tokenizer, SAMPLE_TEXTS[0], arch.n_layers - 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(arch.final_norm(hidden)[0], ref, atol=ATOL, rtol=0)


def test_forward_stops_after_the_captured_block(tiny_model, tokenizer):
    arch = adapt(tiny_model)
    ran = []
    handles = [
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
        for i, block in enumerate(arch.layers)
    ]
    handles.append(arch.final_norm.register_forward_hook(lambda *_: ran.append("norm")))
    handles.append(
        tiny_model.get_output_embeddings().register_forward_hook(lambda *_: ran.append("head"))
    )
    ids, mask, _, _ = pad_batch(tokenize(tokenizer, SAMPLE_TEXTS[:2], 32), 0, "right")
    residual_at_layer(tiny_model, ids, mask, 1)
    for h in handles:
        h.remove()
    assert ran == [0, 1]


def test_random_positions_are_in_range_distinct_and_seeded_per_doc():
    cfg = C.ExtractConfig(positions="random", k_positions=4, min_offset=3, seed=7)
    pos = extract.pick_positions(20, "doc-a", cfg)
    assert len(pos) == 4 and len(set(pos)) == 4 and all(3 <= p < 20 for p in pos)
    assert pos == extract.pick_positions(20, "doc-a", cfg)
    assert pos != extract.pick_positions(20, "doc-a", replace(cfg, seed=8))
    # Short documents: as many positions as fit, never past the end.
    assert extract.pick_positions(5, "doc-b", cfg) == [3, 4]
    assert extract.pick_positions(2, "doc-c", cfg) == [1]
    assert extract.pick_positions(20, "d", C.ExtractConfig()) == [19]


def setup_repo(root: Path, model_name: str = "llama", texts: list[str] = SAMPLE_TEXTS) -> None:
    save_model_dir(TINY_MODELS[model_name](), root / C.BASE_DIR)
    write_corpus(root, texts)


def extract_params(**overrides) -> C.Params:
    cfg = replace(C.ExtractConfig(layer=2, batch_size=3, chunk_batches=1), **overrides)
    return replace(C.Params(), extract=cfg, base=replace(C.BaseConfig(), device="cpu"))


@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
@pytest.mark.parametrize(
    ("side", "positions"), [("right", "last"), ("left", "random"), ("left", "last")]
)
def test_extract_stage_equals_hf_hidden_states(in_tmp, tokenizer, model_name, side, positions):
    setup_repo(in_tmp, model_name)
    params = extract_params(padding_side=side, positions=positions, min_offset=2, k_positions=3)
    extract.run(params)

    model = TINY_MODELS[model_name]()
    table = pq.read_table(C.ACTIVATIONS_PATH)
    df = table.to_pandas()
    vectors = vectors_from_table(table)
    corpus = pd.read_parquet(C.CORPUS_PATH)
    assert list(dict.fromkeys(df["doc_id"])) == corpus["doc_id"].tolist()  # corpus order kept
    if positions == "last":
        assert len(df) == len(corpus)
    for row, (doc_id, position) in enumerate(zip(df["doc_id"], df["position"], strict=True)):
        text = corpus.set_index("doc_id").loc[doc_id, "text"]
        ref = reference_hidden(model, tokenizer, text, 2, params.extract.max_length)
        np.testing.assert_allclose(vectors[row], ref[position].numpy(), atol=ATOL, rtol=0)
        assert df["n_tokens"].iloc[row] == ref.shape[0]
        if positions == "last":
            assert position == ref.shape[0] - 1
    np.testing.assert_allclose(df["norm"], np.linalg.norm(vectors, axis=1), rtol=1e-5)
    assert (df["layer"] == 2).all()
    assert vectors.dtype == np.float32 and table.schema.field("vector").type.list_size == 32

    meta = yaml.safe_load(C.ACTIVATIONS_META.read_text())
    assert meta["layer"] == 2 and meta["hidden_states_index"] == 3 and meta["d_model"] == 32
    assert meta["n_rows"] == len(df)
    assert set(meta["inputs_sha256"]) == {"data/corpus.parquet"}

    stats = json.loads(C.POOL_STATS_PATH.read_text())
    train = vectors[df["split"] == "train"].astype(np.float64)
    normed = train * math.sqrt(32) / np.linalg.norm(train, axis=1, keepdims=True)
    assert stats["n"] == len(train)
    assert stats["rawvar"] == pytest.approx(normed.var(axis=0).mean(), rel=1e-9)
    np.testing.assert_allclose(stats["mean"], train.mean(axis=0), rtol=1e-9, atol=1e-12)
    assert not (in_tmp / C.WORK_DIR / "extract").exists()  # chunks removed once merged


def test_layer_out_of_range_exits_nonzero_without_output(in_tmp, capsys):
    setup_repo(in_tmp)
    C.PARAMS_FILE.write_text(C.dump_params(extract_params(layer=4)))
    assert main(["extract"]) == 2
    assert "extract.layer=4 is out of range" in capsys.readouterr().err
    assert not C.ACTIVATIONS_PATH.exists()


def corrupt_corpus(kind: str) -> None:
    df = pd.read_parquet(C.CORPUS_PATH)
    if kind == "missing column":
        df = df.drop(columns="text")
    elif kind == "empty text":
        df.loc[3, "text"] = "   "
    elif kind == "duplicate doc_id":
        df.loc[5, "doc_id"] = df.loc[1, "doc_id"]
    elif kind == "bad split":
        df.loc[2, "split"] = "dev"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), C.CORPUS_PATH)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing column", "missing column(s): 'text'"),
        ("empty text", "column 'text': text is empty at row(s) 3"),
        ("duplicate doc_id", "column 'doc_id': field_uniqueness at row(s) 1, 5"),
        ("bad split", "column 'split': isin"),
    ],
)
def test_corrupted_corpus_stops_extract_with_a_clear_error(in_tmp, capsys, kind, expected):
    setup_repo(in_tmp)
    C.PARAMS_FILE.write_text(C.dump_params(extract_params()))
    corrupt_corpus(kind)
    assert main(["extract"]) == 2
    err = capsys.readouterr().err
    assert "data/corpus.parquet: does not match the corpus schema" in err
    assert expected in err
    assert not C.ACTIVATIONS_PATH.exists() and not C.POOL_STATS_PATH.exists()


def as_rows(vectors: np.ndarray | pa.Array) -> np.ndarray:
    if isinstance(vectors, pa.Array):
        return vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1)
    return np.asarray(vectors, np.float64)


def write_activations(path: Path, vectors: np.ndarray | pa.Array) -> None:
    n = len(vectors)
    table = pa.table(
        {
            "doc_id": [f"d{i}" for i in range(n)],
            "split": ["train"] * n,
            "position": pa.array([3] * n, pa.int32()),
            "token_id": pa.array([5] * n, pa.int64()),
            "token": ["x"] * n,
            "n_tokens": pa.array([4] * n, pa.int32()),
            "layer": pa.array([2] * n, pa.int32()),
            "norm": pa.array(np.linalg.norm(as_rows(vectors), axis=1), pa.float32()),
            "vector": vectors if isinstance(vectors, pa.Array) else vectors_to_arrow(vectors),
        }
    )
    pq.write_table(table, path)


def test_activation_schema_accepts_good_vectors(tmp_path):
    path = tmp_path / "acts.parquet"
    write_activations(path, np.ones((4, 8), np.float32))
    assert len(read_parquet(path, activations_schema(8))) == 4


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda v: (v.__setitem__((2, 5), np.nan), v)[1], "vector has NaN or inf at row(s) 2"),
        (lambda v: (v.__setitem__((1, 0), np.inf), v)[1], "vector has NaN or inf at row(s) 1"),
        (lambda v: v[:, :6], "vector width is not d_model=8 at row(s) 0, 1, 2, 3"),
        (
            lambda v: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1).astype("f8")), 8),
            "vector is not a float32 array at row(s) 0, 1, 2, 3",
        ),
    ],
)
def test_activation_schema_names_file_column_and_rows(tmp_path, make, expected):
    path = tmp_path / "acts.parquet"
    write_activations(path, make(np.ones((4, 8), np.float32)))
    with pytest.raises(DataValidationError) as err:
        read_parquet(path, activations_schema(8))
    assert str(err.value).startswith(f"{path}: does not match the activations schema")
    assert f"column 'vector': {expected}" in str(err.value)


def test_missing_or_unreadable_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataValidationError, match="not found"):
        read_parquet(tmp_path / "nope.parquet", activations_schema(8))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataValidationError, match="not a readable parquet file"):
        read_parquet(tmp_path / "junk.parquet", activations_schema(8))


def test_nan_vectors_from_the_model_stop_extract_without_output(in_tmp, capsys, monkeypatch):
    # E.g. an fp16 overflow: the stage validates its own output before writing anything.
    setup_repo(in_tmp)
    C.PARAMS_FILE.write_text(C.dump_params(extract_params()))
    real_batch = extract.extract_batch

    def poisoned(*args, **kwargs):
        vectors = real_batch(*args, **kwargs)
        vectors[0, 3] = np.nan
        return vectors

    monkeypatch.setattr(extract, "extract_batch", poisoned)
    assert main(["extract"]) == 2
    err = capsys.readouterr().err
    assert "data/activations.parquet: does not match the activations schema" in err
    assert "column 'vector': vector has NaN or inf at row(s)" in err
    assert not C.ACTIVATIONS_PATH.exists() and not C.ACTIVATIONS_META.exists()


def test_validate_command_checks_any_stage_file(in_tmp, capsys):
    setup_repo(in_tmp)
    path = in_tmp / "data" / "activations.parquet"
    write_activations(path, np.ones((3, 32), np.float32))
    assert main(["validate", str(path)]) == 0  # d_model 32 read from models/base
    assert "3 rows match the schema" in capsys.readouterr().out
    vectors = np.ones((3, 32), np.float32)
    vectors[1, 0] = np.nan
    write_activations(path, vectors)
    assert main(["validate", str(path)]) == 2
    assert "vector has NaN or inf at row(s) 1" in capsys.readouterr().err
    assert main(["validate", str(path), "--d-model", "16"]) == 2
    assert "vector width is not d_model=16" in capsys.readouterr().err
    assert main(["validate", "data/corpus.parquet"]) == 0
    assert main(["validate", "params.yaml"]) == 2
    assert "no schema for this file" in capsys.readouterr().err


SLOW_EXTRACT = slow_stage_script("extract", pause_s=0.4)

MANY_TEXTS = [
    f"Document number {i} talks about {w} and more."
    for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 2)
]


@pytest.mark.slow
def test_kill_9_during_extract_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    model = tiny_llama()
    for root in (clean, killed):
        save_model_dir(model, root / C.BASE_DIR)
        write_corpus(root, MANY_TEXTS)
        (root / "params.yaml").write_text(C.dump_params(extract_params(batch_size=4)))

    monkeypatch.chdir(clean)
    assert main(["extract"]) == 0

    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT], cwd=killed, env=env)
    chunk_dir = killed / C.WORK_DIR / "extract"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunk_dir.glob("*/chunk_*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(chunk_dir.glob("*/chunk_*.parquet")))
    n_chunks = math.ceil(len(MANY_TEXTS) / 4)
    assert 3 <= finished < n_chunks, "the kill should land mid-stage"
    assert not (killed / C.ACTIVATIONS_PATH).exists()

    monkeypatch.chdir(killed)
    computed = []
    real_batch = extract.extract_batch
    monkeypatch.setattr(
        extract, "extract_batch", lambda *a, **k: computed.append(1) or real_batch(*a, **k)
    )
    assert main(["extract"]) == 0
    assert len(computed) == n_chunks - finished  # finished chunks were not recomputed

    a, b = pq.read_table(clean / C.ACTIVATIONS_PATH), pq.read_table(killed / C.ACTIVATIONS_PATH)
    assert a.equals(b)
    assert (clean / C.POOL_STATS_PATH).read_text() == (killed / C.POOL_STATS_PATH).read_text()

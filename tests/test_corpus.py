"""corpus stage: splits, cleaning and dedup, input files, pydoc prose, seeded and resumable
generation with a tiny base model, a local dataset, and the stage end to end."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import save_model_dir, tiny_llama

from nla_repro import config as C
from nla_repro.errors import SourceError
from nla_repro.schemas import CORPUS, SPLITS, read_parquet
from nla_repro.stages import corpus


def cfg_of(**kwargs) -> C.CorpusConfig:
    """A corpus config with no source switched on except the ones named."""
    return C.CorpusConfig(**{"families": [], "pydoc_docs": 0, **kwargs})


def smoke_cfg(**kwargs) -> C.CorpusConfig:
    """Three families, three docs each, in batches of 4, 4 and 1."""
    defaults = {
        "families": ["news", "science", "code"],
        "docs_per_family": 3,
        "max_new_tokens": 6,
        "gen_batch_size": 4,
        "pydoc_docs": 0,
    }
    return C.CorpusConfig(**(defaults | kwargs))


CPU = C.BaseConfig(device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Generation with a tiny model is dozens of tiny matmuls: on a busy 2-core machine, two
    torch threads contend and run them 10-30x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base_dir(in_tmp) -> Path:
    """A tiny Llama as the base stage leaves it, at models/base under the temporary repo root;
    the tiny tokenizer gets a chat template, which generation renders prompts with."""
    return save_model_dir(tiny_llama(n_layers=2), in_tmp / C.BASE_DIR)


# --- split_of ----------------------------------------------------------------------------------


def test_split_of_is_deterministic_and_60_20_20():
    ids = [f"doc-{i}" for i in range(5000)]
    splits = [corpus.split_of(d) for d in ids]
    assert splits == [corpus.split_of(d) for d in ids]
    counts = collections.Counter(splits)
    assert set(counts) == set(SPLITS)
    for name, expected in {"train": 0.6, "val": 0.2, "test": 0.2}.items():
        assert abs(counts[name] / len(ids) - expected) < 0.03, (name, counts)


# --- clean_text and assemble --------------------------------------------------------------------


def test_clean_text_collapses_whitespace_and_cuts_at_a_word():
    assert corpus.clean_text("  a\n\n b\t c  ", 100) == "a b c"
    assert corpus.clean_text("alpha beta gamma", 12) == "alpha beta"
    assert corpus.clean_text("abcdefghij", 4) == "abcd"


def test_assemble_cleans_drops_short_and_case_insensitive_duplicates():
    long = "The river rose three metres overnight and flooded the lower town."
    frames = [
        pd.DataFrame(
            {
                "source_family": ["news", "news", "news", "news"],
                "text": ["  " + long.replace(" ", "\n  ", 2), "too short", long.upper(), " "],
            }
        ),
        pd.DataFrame(
            {"source_family": ["science"], "text": ["Photosynthesis stores sunlight in sugar."]}
        ),
        pd.DataFrame(columns=["source_family", "text"]),  # an empty source is skipped
    ]
    df, stats = corpus.assemble(frames, cfg_of(min_chars=20))

    assert df["text"].tolist() == [long, "Photosynthesis stores sunlight in sugar."]
    assert list(df.columns) == ["doc_id", "source_family", "text", "split"]
    assert stats["raw_by_family"] == {"news": 4, "science": 1}
    assert stats["dropped_short"] == 2  # "too short" and the blank one
    assert stats["dropped_duplicate"] == 1  # the upper-case copy; the first one is kept
    assert stats["n_docs"] == 2
    assert sum(stats["raw_by_family"].values()) == (
        stats["n_docs"] + stats["dropped_short"] + stats["dropped_duplicate"]
    )
    assert sum(stats["by_split"].values()) == sum(stats["by_family"].values()) == 2
    assert df["split"].tolist() == [corpus.split_of(d) for d in df["doc_id"]]
    CORPUS.validate(df)


def test_assemble_doc_ids_are_unique_and_stable():
    texts = [f"Document number {i} talks about a different topic entirely." for i in range(30)]
    frame = pd.DataFrame({"source_family": "news", "text": texts})
    df, _ = corpus.assemble([frame], cfg_of())
    assert df["doc_id"].is_unique
    assert all(d.startswith("news-") for d in df["doc_id"])
    # The same text gets the same id whatever else is in the corpus and in whatever order.
    shuffled = frame.sample(frac=1, random_state=1).iloc[:20]
    df2, _ = corpus.assemble([shuffled], cfg_of())
    ids = dict(zip(df["text"], df["doc_id"], strict=True))
    assert all(ids[t] == d for t, d in zip(df2["text"], df2["doc_id"], strict=True))
    # The family is part of the id.
    df3, _ = corpus.assemble([frame.assign(source_family="science")], cfg_of())
    assert set(df3["doc_id"]).isdisjoint(df["doc_id"])


def test_assemble_keeps_given_doc_ids_and_fills_missing_ones():
    given = pd.DataFrame(
        {
            "source_family": ["mine", "mine"],
            "text": ["A user document with an id of its own.", "Another user document, no id."],
            "doc_id": ["user-7", None],
        }
    )
    generated = pd.DataFrame({"source_family": ["news"], "text": ["A generated news paragraph."]})
    df, _ = corpus.assemble([given, generated], cfg_of(min_chars=10))
    assert df["doc_id"].iloc[0] == "user-7"
    assert df["doc_id"].iloc[1] == corpus.make_doc_id("mine", "Another user document, no id.")
    assert df["doc_id"].iloc[2] == corpus.make_doc_id("news", "A generated news paragraph.")
    assert df["split"].iloc[0] == corpus.split_of("user-7")


def test_assemble_with_no_documents_is_a_source_error():
    empty = pd.DataFrame(columns=["source_family", "text"])
    with pytest.raises(SourceError, match="no documents"):
        corpus.assemble([empty, empty], cfg_of())


# --- read_text_file -----------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_text_file_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "notes.jsonl",
        [
            {"body": "First note, long enough to be kept.", "doc_id": 17},
            {"body": "Second note from another family.", "source_family": "memo"},
        ],
    )
    path.write_text(path.read_text() + "\n")  # a trailing blank line is allowed

    df = corpus.read_text_file(path, "body")

    assert df["text"].tolist() == [
        "First note, long enough to be kept.",
        "Second note from another family.",
    ]
    assert df["doc_id"].iloc[0] == "17"  # not "17.0": an int id with gaps stays an int
    assert pd.isna(df["doc_id"].iloc[1])  # a missing id is left for assemble to fill
    assert df["source_family"].iloc[1] == "memo"
    out, _ = corpus.assemble([df], cfg_of(min_chars=10))
    assert out["doc_id"].iloc[0] == "17"
    assert out["doc_id"].iloc[1] == corpus.make_doc_id("memo", "Second note from another family.")


def test_read_text_file_parquet_uses_the_file_stem_as_family(tmp_path):
    path = tmp_path / "essays.parquet"
    pd.DataFrame({"text": ["One essay here.", "Two essays here."], "n": [1, 2]}).to_parquet(path)
    df = corpus.read_text_file(path, "text")
    assert df["text"].tolist() == ["One essay here.", "Two essays here."]
    assert df["source_family"].tolist() == ["essays", "essays"]
    assert "doc_id" not in df.columns


def test_read_text_file_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "essays.parquet"
    pd.DataFrame({"body": ["x"]}).to_parquet(path)
    with pytest.raises(SourceError, match=r"essays\.parquet: no column 'text'.*'body'"):
        corpus.read_text_file(path, "text")


def test_read_text_file_parquet_int_doc_ids_with_gaps_stay_ints(tmp_path):
    path = tmp_path / "ids.parquet"
    ids = pa.array([17, None], pa.int64())  # a nullable int column, as other tools write it
    pq.write_table(pa.table({"text": ["first text", "second text"], "doc_id": ids}), path)
    df = corpus.read_text_file(path, "text")
    assert df["doc_id"].iloc[0] == "17"
    assert pd.isna(df["doc_id"].iloc[1])


@pytest.mark.parametrize(
    ("suffix", "where"), [("jsonl", r"line\(s\) \[4, 6\]"), ("parquet", r"row\(s\) \[2, 3\]")]
)
def test_read_text_file_empty_text_names_the_row(tmp_path, suffix, where):
    rows = [{"text": "fine"}, {"text": "also fine"}, {"text": "   "}, {"text": None}]
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        # Line numbers count blank lines, so they are not the row numbers.
        lines = [json.dumps(r) for r in rows]
        path.write_text("\n".join([lines[0], "", lines[1], lines[2], "", lines[3]]) + "\n")
    else:
        pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(SourceError, match=rf"data\.{suffix}: column 'text' .* at {where}$"):
        corpus.read_text_file(path, "text")


def test_read_text_file_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok line"}\n\n{"text": "unterminated\n{"text": "ok"}\n')
    with pytest.raises(SourceError, match=r"broken\.jsonl: line 3: not valid JSON"):
        corpus.read_text_file(path, "text")
    path.write_text('{"text": "ok line"}\n["a", "list"]\n')
    with pytest.raises(SourceError, match=r"broken\.jsonl: line 2: expected a JSON object"):
        corpus.read_text_file(path, "text")


def test_read_text_file_refuses_missing_files_and_other_formats(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        corpus.read_text_file(tmp_path / "absent.jsonl", "text")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(SourceError, match=r"\.jsonl or \.parquet"):
        corpus.read_text_file(tmp_path / "data.csv", "text")


# --- pydoc_paragraphs ---------------------------------------------------------------------------


def test_pydoc_paragraphs_are_prose_of_the_requested_count():
    cfg = cfg_of(pydoc_docs=25, min_chars=80, max_chars=600)
    df = corpus.pydoc_paragraphs(cfg)
    assert len(df) == 25
    assert set(df["source_family"]) == {"pydoc"}
    assert df["text"].is_unique
    for text in df["text"]:
        assert 80 <= len(text) <= 600
        assert text == corpus.clean_text(text, 600)  # already cleaned: one line, no runs
        assert ">>>" not in text and "::=" not in text


def test_pydoc_paragraphs_are_seeded():
    a = corpus.pydoc_paragraphs(cfg_of(pydoc_docs=20, seed=0))
    b = corpus.pydoc_paragraphs(cfg_of(pydoc_docs=20, seed=0))
    c = corpus.pydoc_paragraphs(cfg_of(pydoc_docs=20, seed=1))
    assert a["text"].tolist() == b["text"].tolist()
    assert a["text"].tolist() != c["text"].tolist()
    assert corpus.pydoc_paragraphs(cfg_of(pydoc_docs=0)).empty


def test_pydoc_code_samples_are_not_prose():
    assert not corpus._looks_like_prose("   >>> print(1)\n   1")
    assert not corpus._looks_like_prose(">>> x = [1, 2, 3]\nThis shows a list.")
    prose = "The interactive interpreter shows the value of an expression statement. " * 3
    assert corpus._looks_like_prose(prose)
    assert not corpus._looks_like_prose(prose + "\n   >>> help(len)")
    assert not corpus._looks_like_prose("target ::= identifier | '(' target ')'")
    assert corpus._looks_like_prose("The while statement repeats a block while a test holds.")


# --- generation ---------------------------------------------------------------------------------


def test_generation_jobs_cycle_topics_per_family():
    cfg = smoke_cfg(families=["news", "code"], docs_per_family=14)
    jobs = corpus.generation_jobs(cfg)
    prompts = C.family_prompts()
    assert [f for f, _ in jobs] == ["news"] * 14 + ["code"] * 14
    for family, offset in (("news", 0), ("code", 14)):
        spec = prompts[family]
        n = len(spec["topics"])
        assert n < 14, "the test needs more docs than topics to see the cycle"
        for i in range(14):
            assert jobs[offset + i][1] == spec["prompt"].format(topic=spec["topics"][i % n])
        assert len({p for _, p in jobs[offset : offset + n]}) == n
    assert corpus.generation_jobs(smoke_cfg(families=[])) == []


def test_generate_families_gives_docs_per_family_and_is_seeded(base_dir, tmp_path):
    cfg = smoke_cfg()
    df = corpus.generate_families(cfg, CPU, tmp_path / "work")
    assert list(df.columns) == ["source_family", "text"]
    assert df["source_family"].tolist() == ["news"] * 3 + ["science"] * 3 + ["code"] * 3
    assert all(isinstance(t, str) for t in df["text"])
    assert not list((tmp_path / "work" / "corpus").glob("*/chunk_*")), "chunks left behind"

    again = corpus.generate_families(cfg, CPU, tmp_path / "work")
    pd.testing.assert_frame_equal(df, again)
    other_seed = corpus.generate_families(smoke_cfg(seed=1), CPU, tmp_path / "work")
    assert other_seed["text"].tolist() != df["text"].tolist()


def test_generate_families_resumes_without_regenerating_finished_batches(
    base_dir, tmp_path, monkeypatch
):
    cfg = smoke_cfg()
    real = corpus._generate_batch
    uninterrupted = corpus.generate_families(cfg, CPU, tmp_path / "work_a")

    calls: list[int] = []

    def crash_after_first(model, tokenizer, batch, cfg, seed):
        if calls:
            raise RuntimeError("interrupted")
        calls.append(seed)
        return real(model, tokenizer, batch, cfg, seed=seed)

    monkeypatch.setattr(corpus, "_generate_batch", crash_after_first)
    with pytest.raises(RuntimeError, match="interrupted"):
        corpus.generate_families(cfg, CPU, tmp_path / "work_b")
    assert calls == [0]
    assert len(list((tmp_path / "work_b" / "corpus").glob("*/chunk_*.parquet"))) == 1

    resumed_calls: list[int] = []

    def counting(model, tokenizer, batch, cfg, seed):
        resumed_calls.append(seed)
        return real(model, tokenizer, batch, cfg, seed=seed)

    monkeypatch.setattr(corpus, "_generate_batch", counting)
    resumed = corpus.generate_families(cfg, CPU, tmp_path / "work_b")
    assert resumed_calls == [1, 2]  # batch 0 came from its chunk
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_generate_families_does_not_reuse_chunks_of_other_params(base_dir, tmp_path, monkeypatch):
    calls: list[int] = []

    def stale_then_crash(model, tokenizer, batch, cfg, seed):
        if calls:
            raise RuntimeError("interrupted")
        calls.append(seed)
        return ["stale"] * len(batch)

    monkeypatch.setattr(corpus, "_generate_batch", stale_then_crash)
    with pytest.raises(RuntimeError):
        corpus.generate_families(smoke_cfg(), CPU, tmp_path / "work")

    fresh_calls: list[int] = []

    def fresh(model, tokenizer, batch, cfg, seed):
        fresh_calls.append(seed)
        return [f"fresh {cfg.temperature}"] * len(batch)

    monkeypatch.setattr(corpus, "_generate_batch", fresh)
    df = corpus.generate_families(smoke_cfg(temperature=0.5), CPU, tmp_path / "work")
    assert fresh_calls == [0, 1, 2]
    assert set(df["text"]) == {"fresh 0.5"}


# --- hf_dataset_texts (a local dataset folder stands in for the Hub) ---------------------------


@pytest.fixture
def local_dataset(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds_cache")
    folder = tmp_path / "tiny_stories"
    folder.mkdir()
    texts = [f"Story {i}: a fox walked through the quiet forest at dawn." for i in range(7)]
    pd.DataFrame({"story": texts, "id": range(7)}).to_parquet(folder / "train.parquet")
    return folder


def test_hf_dataset_texts_reads_the_first_rows_of_a_local_dataset(local_dataset):
    cfg = cfg_of(
        hf_dataset=str(local_dataset), hf_revision="main", hf_text_column="story", hf_max_docs=5
    )
    df = corpus.hf_dataset_texts(cfg)
    assert df["text"].tolist() == [
        f"Story {i}: a fox walked through the quiet forest at dawn." for i in range(5)
    ]
    assert set(df["source_family"]) == {"tiny_stories"}
    assert len(corpus.hf_dataset_texts(dataclasses.replace(cfg, hf_max_docs=100))) == 7


def test_hf_dataset_texts_missing_column_is_a_source_error(local_dataset):
    cfg = cfg_of(hf_dataset=str(local_dataset), hf_revision="main", hf_text_column="text")
    with pytest.raises(SourceError, match=r"no column 'text' \(\['story', 'id'\]\)"):
        corpus.hf_dataset_texts(cfg)


def test_hf_dataset_texts_empty_text_names_the_row(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds_cache")
    folder = tmp_path / "gappy"
    folder.mkdir()
    texts = ["A fine first row of text.", None, "Third row.", "  "]
    pd.DataFrame({"text": texts}).to_parquet(folder / "train.parquet")
    cfg = cfg_of(hf_dataset=str(folder), hf_revision="main")
    with pytest.raises(
        SourceError, match=r"column 'text' is empty or not text at row\(s\) \[1, 3\]"
    ):
        corpus.hf_dataset_texts(cfg)


# --- run() --------------------------------------------------------------------------------------


def test_run_writes_a_valid_corpus_and_consistent_stats(base_dir, local_dataset):
    long = "A user supplied paragraph about tides and the moon, long enough to keep."
    notes = write_jsonl(
        base_dir.parents[1] / "notes.jsonl",
        [
            {"text": long, "doc_id": "note-1"},
            {"text": "short"},
            # The same text as a dataset row, up to case: dropped as a duplicate.
            {"text": "STORY 3: a fox walked through the quiet forest at dawn."},
        ],
    )
    params = C.params_from_dict(
        {
            "base": {"device": "cpu"},
            "corpus": {
                "families": ["news", "code"],
                "docs_per_family": 2,
                "max_new_tokens": 24,
                "gen_batch_size": 4,
                "pydoc_docs": 6,
                "files": [str(notes)],
                "hf_dataset": str(local_dataset),
                "hf_revision": "main",
                "hf_text_column": "story",
                "min_chars": 20,
            },
        }
    )

    stats = corpus.run(params)

    df = read_parquet(C.CORPUS_PATH, CORPUS)
    assert json.loads(C.CORPUS_STATS_PATH.read_text()) == stats
    assert stats["n_docs"] == len(df)
    assert stats["raw_by_family"] == {
        "code": 2,
        "news": 2,
        "notes": 3,
        "pydoc": 6,
        "tiny_stories": 7,
    }
    assert stats["dropped_short"] >= 1  # "short"; generated texts may be short too
    assert stats["dropped_duplicate"] == 1
    assert sum(stats["raw_by_family"].values()) == (
        stats["n_docs"] + stats["dropped_short"] + stats["dropped_duplicate"]
    )
    assert stats["by_family"] == df["source_family"].value_counts().sort_index().to_dict()
    assert stats["by_split"] == df["split"].value_counts().sort_index().to_dict()
    assert sum(stats["by_split"].values()) == len(df)
    # Sources are deduplicated in order: the file's copy is kept, the dataset's dropped.
    assert (stats["by_family"]["notes"], stats["by_family"]["tiny_stories"]) == (2, 6)
    assert stats["by_family"]["pydoc"] == 6
    assert df.loc[df["text"] == long, "doc_id"].tolist() == ["note-1"]
    assert not (Path(C.WORK_DIR) / "corpus").exists() or not list(
        (Path(C.WORK_DIR) / "corpus").rglob("chunk_*")
    )


def test_run_with_no_sources_is_a_source_error(in_tmp):
    params = dataclasses.replace(C.Params(), corpus=cfg_of())
    with pytest.raises(SourceError, match="no documents"):
        corpus.run(params)
    assert not C.CORPUS_PATH.exists()

"""corpus stage: data/corpus.parquet (doc_id, source_family, text, split).

Sources, in this order: families the base model writes from topic prompts, paragraphs of
CPython's own documentation (pydoc_data topics: human-written prose that every install ships),
jsonl/parquet files, and a Hugging Face dataset. Texts are cleaned, deduplicated across all
sources and split 60/20/20 by a hash of their doc_id. Generation is resumable per batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.errors import SourceError
from nla_repro.generation import decode, stop_ids
from nla_repro.io import ChunkStore, fingerprint, sha256_file, write_json, write_parquet
from nla_repro.models import load_base, read_base_meta, render_chat
from nla_repro.pipeline import code_sha256, stage_view
from nla_repro.schemas import CORPUS, validate
from nla_repro.seeds import derive_seed

log = logging.getLogger(__name__)

SPLIT_EDGES = (0.6, 0.8)  # train < 0.6 <= val < 0.8 <= test


def split_of(doc_id: str) -> str:
    """Deterministic 60/20/20 split from a hash of the doc_id alone."""
    u = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "train" if u < SPLIT_EDGES[0] else "val" if u < SPLIT_EDGES[1] else "test"


def clean_text(text: str, max_chars: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[: cut.rfind(" ")] if " " in cut else cut
    return text


def make_doc_id(family: str, text: str) -> str:
    return f"{family}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def generation_jobs(cfg: C.CorpusConfig) -> list[tuple[str, str]]:
    """(family, prompt) per document to generate, in a fixed order."""
    prompts = C.family_prompts()
    jobs = []
    for family in cfg.families:
        spec = prompts[family]
        for i in range(cfg.docs_per_family):
            topic = spec["topics"][i % len(spec["topics"])]
            jobs.append((family, spec["prompt"].format(topic=topic)))
    return jobs


def generate_families(cfg: C.CorpusConfig, base: C.BaseConfig, work_root: Path) -> pd.DataFrame:
    jobs = generation_jobs(cfg)
    if not jobs:
        return pd.DataFrame(columns=["source_family", "text"])
    meta = read_base_meta(C.BASE_DIR)
    prompts_sha = sha256_file(Path(C.__file__).parent / "prompts" / "corpus_families.yaml")
    store = ChunkStore(
        work_root / "corpus",
        fingerprint(
            meta["files"],
            cfg,
            base.quantization,
            base.compute_dtype,
            prompts_sha,
            code_sha256("corpus"),
        ),
    )
    batches = [jobs[i : i + cfg.gen_batch_size] for i in range(0, len(jobs), cfg.gen_batch_size)]
    todo = [i for i in range(len(batches)) if not store.done(i)]
    if todo:
        model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        done = sum(len(batches[i]) for i in range(len(batches)) if i not in todo)
        bar = tqdm(total=len(jobs), initial=done, unit="doc", desc="corpus: generating")
        for index in todo:
            texts = _generate_batch(model, tokenizer, batches[index], cfg, seed=index)
            families = [family for family, _ in batches[index]]
            store.write(index, pa.table({"source_family": families, "text": texts}))
            bar.update(len(texts))
        bar.close()
    table = store.read(range(len(batches))).to_pandas()
    store.clear()
    return table


def _generate_batch(model, tokenizer, batch, cfg: C.CorpusConfig, seed: int) -> list[str]:
    rendered = [render_chat(tokenizer, prompt) for _, prompt in batch]
    enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(model.device)
    # Seeded per batch, so a resumed run draws the same samples as an uninterrupted one.
    torch.manual_seed(derive_seed(cfg.seed, 0, seed))
    got = decode(
        model,
        enc["attention_mask"],
        [cfg.temperature] * len(batch),
        cfg.max_new_tokens,
        stop_ids(model, tokenizer),
        top_p=cfg.top_p,
        input_ids=enc["input_ids"],
    )
    return tokenizer.batch_decode(got.tokens, skip_special_tokens=True)


def _looks_like_prose(paragraph: str) -> bool:
    lines = [ln for ln in paragraph.splitlines() if ln.strip()]
    if not lines or all(ln.startswith("   ") for ln in lines):
        return False  # code samples and grammar rules are indented
    if any(ln.lstrip().startswith((">>>", "...", "::=", "|")) for ln in lines):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters / len(paragraph) > 0.85


def pydoc_paragraphs(cfg: C.CorpusConfig) -> pd.DataFrame:
    """Paragraphs of prose from the Python documentation topics shipped with CPython."""
    if cfg.pydoc_docs == 0:
        return pd.DataFrame(columns=["source_family", "text"])
    from pydoc_data.topics import topics

    paragraphs = sorted(
        {
            clean_text(p, cfg.max_chars)
            for key in sorted(topics)
            for p in re.split(r"\n\s*\n", topics[key])
            if _looks_like_prose(p)
        }
    )
    paragraphs = [p for p in paragraphs if len(p) >= cfg.min_chars]
    rng = np.random.default_rng(cfg.seed)
    take = sorted(rng.choice(len(paragraphs), min(cfg.pydoc_docs, len(paragraphs)), replace=False))
    return pd.DataFrame({"source_family": "pydoc", "text": [paragraphs[i] for i in take]})


def check_texts(texts, where: str, labels: list[int], unit: str) -> None:
    """Every text must be a non-blank string; the error lists the offending rows or lines."""
    bad = [labels[i] for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise SourceError(f"{where} is empty or not text at {unit} {bad[:8]}{more}")


def read_text_file(path: Path, text_column: str) -> pd.DataFrame:
    """Rows of a user's jsonl or parquet file; errors name the file, row and column."""
    if not path.exists():
        raise SourceError(f"{path}: corpus file not found")
    if path.suffix == ".parquet":
        # integer_object_nulls: an int column with gaps stays int (doc_id 17, not "17.0").
        df = pq.read_table(path).to_pandas(integer_object_nulls=True)
        unit, labels = "row(s)", list(range(len(df)))
    elif path.suffix in (".jsonl", ".json"):
        rows, labels = [], []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}: line {lineno}: expected a JSON object")
            rows.append(row)
            labels.append(lineno)
        # dtype=object: ints stay ints when some rows lack the key (no float upcast).
        df = pd.DataFrame(rows, dtype=object)
        unit = "line(s)"
    else:
        raise SourceError(f"{path}: corpus files must be .jsonl or .parquet")
    if text_column not in df.columns:
        raise SourceError(f"{path}: no column {text_column!r} (columns: {list(df.columns)})")
    texts = df[text_column]
    check_texts(texts, f"{path}: column {text_column!r}", labels, unit)
    family = df["source_family"] if "source_family" in df.columns else path.stem
    out = pd.DataFrame({"source_family": family, "text": texts})
    if "doc_id" in df.columns:
        # Rows without a doc_id stay None (assemble gives them one); astype(str) would turn
        # them into the literal strings "nan" / "None" on pandas 2.
        out["doc_id"] = [
            str(d) if ok else None for d, ok in zip(df["doc_id"], df["doc_id"].notna(), strict=True)
        ]
    return out


def hf_dataset_texts(cfg: C.CorpusConfig) -> pd.DataFrame:
    """Rows of a Hugging Face dataset at a pinned revision (needs network or a local copy)."""
    import datasets

    ds = datasets.load_dataset(cfg.hf_dataset, revision=cfg.hf_revision, split=cfg.hf_split)
    if cfg.hf_text_column not in ds.column_names:
        raise SourceError(
            f"dataset {cfg.hf_dataset}: no column {cfg.hf_text_column!r} ({ds.column_names})"
        )
    ds = ds.select(range(min(cfg.hf_max_docs, len(ds))))
    texts = list(ds[cfg.hf_text_column])
    check_texts(
        texts,
        f"dataset {cfg.hf_dataset} column {cfg.hf_text_column!r}",
        range(len(texts)),
        "row(s)",
    )
    family = cfg.hf_dataset.rstrip("/").split("/")[-1]
    return pd.DataFrame({"source_family": family, "text": texts})


def assemble(frames: list[pd.DataFrame], cfg: C.CorpusConfig) -> tuple[pd.DataFrame, dict]:
    """Clean, drop short texts, deduplicate, assign doc_ids and splits; count every drop."""
    frames = [f for f in frames if len(f)]
    if not frames:  # pd.concat([]) would raise a bare ValueError
        raise SourceError("corpus: no documents from any source; check the corpus params")
    df = pd.concat(frames, ignore_index=True)
    if "doc_id" not in df.columns:
        df["doc_id"] = None
    df["text"] = [clean_text(t, cfg.max_chars) for t in df["text"]]
    stats: dict = {"raw_by_family": df["source_family"].value_counts().sort_index().to_dict()}
    short = df["text"].str.len() < cfg.min_chars
    stats["dropped_short"] = int(short.sum())
    df = df[~short]
    key = df["text"].str.lower()
    dup = key.duplicated()
    stats["dropped_duplicate"] = int(dup.sum())
    df = df[~dup].copy()
    df["doc_id"] = [
        str(d) if isinstance(d, str) and d else make_doc_id(f, t)
        for d, f, t in zip(df["doc_id"], df["source_family"], df["text"], strict=True)
    ]
    df["split"] = [split_of(d) for d in df["doc_id"]]
    df = df[["doc_id", "source_family", "text", "split"]].reset_index(drop=True)
    stats["n_docs"] = len(df)
    stats["by_family"] = df["source_family"].value_counts().sort_index().to_dict()
    stats["by_split"] = df["split"].value_counts().sort_index().to_dict()
    return df, stats


def run(params: C.Params, out: Path = C.CORPUS_PATH, work_root: Path = C.WORK_DIR) -> dict:
    params = stage_view(params, "corpus")
    cfg = params.corpus
    frames = [generate_families(cfg, params.base, work_root), pydoc_paragraphs(cfg)]
    frames += [read_text_file(Path(f), cfg.text_column) for f in cfg.files]
    if cfg.hf_dataset:
        frames.append(hf_dataset_texts(cfg))
    df, stats = assemble(frames, cfg)
    if df.empty:
        raise SourceError("corpus: no documents left after cleaning; check the corpus params")
    df = validate(df, CORPUS, out)
    write_parquet(pa.Table.from_pandas(df, preserve_index=False), out)
    write_json(stats, C.CORPUS_STATS_PATH)
    log.info(
        "corpus: %d docs %s, splits %s", stats["n_docs"], stats["by_family"], stats["by_split"]
    )
    return stats

"""extract stage: residual-stream vectors at layer L -> data/activations.parquet.

Documents are tokenized once, sorted by length (less padding), and run in batches with a
hook that captures block L's output and stops the forward there: no block after L and no LM
head is computed. Finished chunks of batches are kept under .nla_work/extract/ so an
interrupted run resumes; the merged output is ordered by corpus row and position, so it does
not depend on batching.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.io import (
    ChunkStore,
    code_commit,
    fingerprint,
    sha256_file,
    vectors_from_table,
    vectors_to_arrow,
    write_json,
    write_parquet,
    write_yaml,
)
from nla_repro.models import (
    adapt,
    load_base,
    pad_batch,
    read_base_meta,
    residual_at_layer,
    tokenize,
)
from nla_repro.pipeline import code_sha256, stage_view
from nla_repro.schemas import CORPUS, activations_schema, read_parquet, validate

log = logging.getLogger(__name__)

NORMALIZATION = "norm(v) = v * sqrt(d) / ||v|| (fp32)"


def pick_positions(n_tokens: int, doc_id: str, cfg: C.ExtractConfig) -> list[int]:
    """Token positions to read in one document (indices into its unpadded tokens)."""
    if cfg.positions == "last":
        return [n_tokens - 1]
    lo = min(cfg.min_offset, n_tokens - 1)
    # Seeded per document: a doc's positions do not depend on which other docs are present.
    seed = int(hashlib.sha256(f"{cfg.seed}:{doc_id}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    k = min(cfg.k_positions, n_tokens - lo)
    return sorted(int(p) for p in rng.choice(np.arange(lo, n_tokens), size=k, replace=False))


def extract_batch(
    model, token_lists: list[list[int]], positions: list[list[int]], layer: int, pad_id: int, side
) -> np.ndarray:
    """Vectors (sum of positions, d) for one batch, in row-then-position order."""
    ids, mask, offsets, _ = pad_batch(token_lists, pad_id, side)
    device = next(model.parameters()).device
    hidden_BTD = residual_at_layer(model, ids.to(device), mask.to(device), layer)
    rows = torch.tensor([r for r, pos in enumerate(positions) for _ in pos])
    cols = torch.tensor([offsets[r] + p for r, pos in enumerate(positions) for p in pos])
    return hidden_BTD[rows.to(device), cols.to(device)].float().cpu().numpy()


def pool_stats(vectors_ND: np.ndarray) -> dict:
    """Statistics of the training pool that the metrics need as baselines."""
    v = vectors_ND.astype(np.float64)
    d = v.shape[1]
    norms = np.linalg.norm(v, axis=1)
    normed = v * math.sqrt(d) / norms[:, None]
    return {
        "n": len(v),
        "d_model": d,
        "mean_norm": float(norms.mean()),
        # Per-element variance of norm(v): the predict-the-mean baseline of fve_nrm.
        "rawvar": float(normed.var(axis=0).mean()),
        "mean": v.mean(axis=0).tolist(),
        "mean_normalized": normed.mean(axis=0).tolist(),
    }


def run(params: C.Params, work_root: Path = C.WORK_DIR) -> dict:
    params = stage_view(params, "extract")
    cfg, base = params.extract, params.base
    corpus = read_parquet(C.CORPUS_PATH, CORPUS)
    meta = read_base_meta(C.BASE_DIR)
    cfg.check_layer(meta["n_layers"], meta["source"]["name"])
    corpus_sha = sha256_file(C.CORPUS_PATH)

    model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    arch = adapt(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = tokenize(tokenizer, corpus["text"].tolist(), cfg.max_length)
    positions = [
        pick_positions(len(t), d, cfg) for t, d in zip(tokens, corpus["doc_id"], strict=True)
    ]
    order = sorted(range(len(tokens)), key=lambda i: (-len(tokens[i]), i))
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    chunks = [batches[i : i + cfg.chunk_batches] for i in range(0, len(batches), cfg.chunk_batches)]
    store = ChunkStore(
        work_root / "extract",
        fingerprint(
            corpus_sha,
            meta["files"],
            cfg,
            base.quantization,
            base.compute_dtype,
            code_sha256("extract"),
        ),
    )

    total = sum(len(t) for t in tokens)
    done_tokens = sum(
        len(tokens[i]) for c, ch in enumerate(chunks) if store.done(c) for b in ch for i in b
    )
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, desc="extract")
    for c, chunk in enumerate(chunks):
        if store.done(c):
            continue
        parts = []
        for batch in chunk:
            vecs = extract_batch(
                model,
                [tokens[i] for i in batch],
                [positions[i] for i in batch],
                cfg.layer,
                pad_id,
                cfg.padding_side,
            )
            pos = [p for i in batch for p in positions[i]]
            src = [i for i in batch for _ in positions[i]]
            token_ids = [tokens[i][p] for i, p in zip(src, pos, strict=True)]
            parts.append(
                pa.table(
                    {
                        "row": pa.array(src, pa.int64()),
                        "position": pa.array(pos, pa.int32()),
                        "token_id": pa.array(token_ids, pa.int64()),
                        "vector": vectors_to_arrow(vecs),
                    }
                )
            )
            bar.update(sum(len(tokens[i]) for i in batch))
        store.write(c, pa.concat_tables(parts))
    bar.close()

    table = store.read(range(len(chunks))).sort_by(
        [("row", "ascending"), ("position", "ascending")]
    )
    rows = table.column("row").to_numpy()
    vectors = vectors_from_table(table)
    token_ids = table.column("token_id").to_numpy()
    df = pd.DataFrame(
        {
            "doc_id": corpus["doc_id"].to_numpy()[rows],
            "split": corpus["split"].to_numpy()[rows],
            "position": table.column("position").to_numpy(),
            "token_id": token_ids,
            "token": tokenizer.convert_ids_to_tokens(token_ids.tolist()),
            "n_tokens": np.array([len(tokens[r]) for r in rows], dtype=np.int32),
            "layer": np.full(len(rows), cfg.layer, dtype=np.int32),
            "norm": np.linalg.norm(vectors, axis=1).astype(np.float32),
            "vector": list(vectors),
        }
    )
    validate(df, activations_schema(arch.d_model), C.ACTIVATIONS_PATH)
    out = pa.Table.from_pandas(df.drop(columns="vector"), preserve_index=False)
    out = out.append_column("vector", vectors_to_arrow(vectors))

    train = vectors[df["split"].to_numpy() == "train"]
    stats = pool_stats(train if len(train) else vectors)
    stats["pool"] = "train" if len(train) else "all (no train rows)"
    stats["layer"] = cfg.layer

    write_parquet(out, C.ACTIVATIONS_PATH)
    write_json(stats, C.POOL_STATS_PATH)
    sidecar = {
        "base_model": meta["source"]["name"],
        "base_source": meta["source"],
        "base_files_sha256": meta["files"],
        "architecture": meta["architecture"],
        "d_model": arch.d_model,
        "n_layers": arch.n_layers,
        "layer": cfg.layer,
        "hidden_states_index": cfg.layer + 1,
        "position_rule": cfg.positions
        if cfg.positions == "last"
        else f"random k={cfg.k_positions} from min_offset={cfg.min_offset}, seed={cfg.seed}",
        "max_length": cfg.max_length,
        "quantization": base.quantization,
        "compute_dtype": base.compute_dtype,
        "normalization": NORMALIZATION,
        "n_rows": len(df),
        "n_docs": len(corpus),
        "mean_norm": stats["mean_norm"],
        "inputs_sha256": {str(C.CORPUS_PATH): corpus_sha},
        "code_commit": code_commit(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    write_yaml(sidecar, C.ACTIVATIONS_META)
    store.clear()
    log.info("extract: %d vectors of width %d at layer %d", len(df), arch.d_model, cfg.layer)
    return sidecar
